"""The files of a queue folder: add, list, reorder, remove, load, file away. No client here.

The ``*.json`` files directly in the folder are the pending items, run in sorted order. A finished
file moves to ``complete/``; a failed or invalid one to ``failed/`` with ``<name>.reason.txt``.
While a file is trained it stays in the folder and ``.queue-current.json`` names it and its run
(several at once with ``launch.gpu_per_run``: ``{"runs": [...]}``).
Both the client (the GUI's queue in ``runs_root/queue/``) and the runner (queue.py) use this module;
it imports neither of them. No torch here: the GUI imports it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_gui.settings import TrainingSettings
from lora_gui.settings import io as settings_io
from lora_gui.settings.foreign import load_any

COMPLETE_DIR = "complete"
FAILED_DIR = "failed"
CURRENT_FILE = ".queue-current.json"


@dataclass(frozen=True)
class QueueItem:
    name: str  # the file name in the queue folder (its position: items are run in sorted order)
    path: Path
    output_name: str  # from the file, or "" when it cannot be read (it will fail when its turn comes)
    running: bool = False
    gpu: int | None = None  # the GPU it trains on (launch.gpu_per_run), while running


def pending_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))


def current_entries(folder: Path) -> list[dict]:
    """``{"file", "run_id", "gpu", ...}`` of each file being trained, from ``.queue-current.json``
    (``{"runs": [...]}``, or one entry as an older queue wrote it)."""
    try:
        data = json.loads((folder / CURRENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = data.get("runs", []) if isinstance(data, dict) and "runs" in data else [data]
    return [e for e in entries if isinstance(e, dict) and "file" in e and "run_id" in e] \
        if isinstance(entries, list) else []


def queue_items(folder: str | os.PathLike) -> list[QueueItem]:
    folder = Path(folder)
    running = {e["file"]: e.get("gpu") for e in current_entries(folder)}
    items = []
    for path in pending_files(folder):
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
            name = str(model.get("output_name", "")) if isinstance(model, dict) else ""
        except (OSError, ValueError, AttributeError):
            name = ""
        gpu = running.get(path.name)
        items.append(QueueItem(path.name, path, name, running=path.name in running,
                               gpu=gpu if isinstance(gpu, int) else None))
    return items


def enqueue(folder: str | os.PathLike, settings: TrainingSettings) -> Path:
    """Add the settings at the end of the queue, as ``NNNN-<output name>.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in pending_files(folder)
               if (m := re.match(r"(\d+)-", p.name))]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", settings.model.output_name).strip("-")[:60] or "run"
    path = folder / f"{max(numbers, default=0) + 1:04d}-{slug}.json"
    return settings_io.save_settings(settings, path)


def _movable(folder: Path, name: str) -> list[Path]:
    running = {e["file"] for e in current_entries(folder)}
    if name in running:
        raise ValueError(f"{name} is being trained now: stop its run instead.")
    files = [p for p in pending_files(folder) if p.name not in running]
    if name not in [p.name for p in files]:
        raise FileNotFoundError(f"{name} is not in the queue {folder}.")
    return files


def queue_remove(folder: str | os.PathLike, name: str) -> None:
    folder = Path(folder)
    _movable(folder, name)
    (folder / name).unlink()


def queue_move(folder: str | os.PathLike, name: str, delta: int) -> list[QueueItem]:
    """Move an item ``delta`` places (negative = earlier). The order is the sorted file names: with
    ``NNNN-name.json`` files the moved items swap their numbers and keep their names; other files
    swap names."""
    folder = Path(folder)
    files = _movable(folder, name)
    i = [p.name for p in files].index(name)
    j = max(0, min(len(files) - 1, i + delta))
    if i == j:
        return queue_items(folder)
    slots = files[min(i, j):max(i, j) + 1]
    moved = slots[1:] + slots[:1] if j > i else slots[-1:] + slots[:-1]  # the new order
    numbered = [re.match(r"(\d+)-(.+)", p.name) for p in slots]
    if all(numbered):
        prefix = {slot: m.group(1) for slot, m in zip(slots, numbered)}
        rest = {slot: m.group(2) for slot, m in zip(slots, numbered)}
        targets = [folder / f"{prefix[slot]}-{rest[item]}" for slot, item in zip(slots, moved)]
    else:
        targets = slots
    temps = {p: p.with_name(f".{p.name}.move") for p in slots}
    for p in slots:
        os.replace(p, temps[p])
    for target, item in zip(targets, moved):
        os.replace(temps[item], target)
    return queue_items(folder)


def load_queue_file(path: Path) -> TrainingSettings:
    """A settings file of ours (sparse is fine) or a kohya_ss config; SettingsError if invalid."""
    return load_any(settings_io.read_json(path))[0]


def file_away(file: Path, dest: Path, reason: str | None = None) -> Path:
    """Move a queue file into ``dest`` (complete/ or failed/) under a free name; ``reason`` goes
    into ``<name>.reason.txt`` beside it."""
    dest.mkdir(parents=True, exist_ok=True)
    target, n = dest / file.name, 1
    while target.exists():
        target, n = dest / f"{file.stem}-{n}{file.suffix}", n + 1
    os.replace(file, target)
    if reason is not None:
        (dest / f"{target.stem}.reason.txt").write_text(reason.rstrip() + "\n", encoding="utf-8")
    return target
