"""What a run leaves on disk and reads back: the output name, the run files (settings copy, tag
report, the metadata facts), the LoRA saves, the training state folders (``state_files``: no pickle) and resuming from one."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui import events as ev
from lora_gui.dataset.captions import write_tag_report
from lora_gui.engine import distributed, evaluation, state_files
from lora_gui.engine.errors import Diverged, EngineError
from lora_gui.engine.metadata import build_metadata, gather_facts, with_hashes
from lora_gui.engine.optim import averaged_weights
from lora_gui.settings import io as settings_io

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def output_name(t, out_dir: Path) -> str:
    """The output name, or name_2, name_3...: existing files are never overwritten."""
    m = t.settings.model
    base, ext = m.output_name, m.save_as
    resuming = bool(m.load_previous_save_state.strip())
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}_{n}"
        taken = (out_dir / f"{name}.{ext}").exists()
        if not resuming:
            taken = taken or any(out_dir.glob(f"{name}-[0-9s]*")) \
                or (out_dir / f"{name}_settings.json").exists()
        if not taken:
            if n > 1:
                t.log(f"{base}.{ext} already exists in {out_dir}: this run saves as {name}.{ext}.", "warning")
            return name
    raise EngineError(f"model.output_name: too many runs named {base} in {out_dir}: choose another name.")


def write_run_files(t) -> None:
    """The settings copy and the tag report beside the LoRA; the facts every save's metadata needs."""
    s = t.settings
    if t.is_main:
        settings_file = t.out_dir / f"{t.name}_settings.json"
        if not settings_file.exists():
            t.files.append(settings_io.save_settings(s, settings_file))
        if s.runs.save_json_folder.strip():  # the one settings copy rule (settings/io.py)
            settings_io.save_settings_copy(s, name=t.name)
        if s.labels.tag_occurrence_txt_file:
            report = t.out_dir / f"{t.name}_tags.txt"
            if not report.exists():
                t.files.append(write_tag_report(
                    report, t.info, alphabetical=s.labels.sort_tag_occurrence_alphabetically))
    t.facts = gather_facts(t)


def save(t, stem: str, *, state: bool, final: bool = False) -> tuple[Path, Path | None]:
    """Save the LoRA as ``stem`` (and the training state as ``stem-state``); (path, state folder).
    Each save carries its validation loss (when the run holds images out); the periodic ones
    (``save_epoch``, ``save_step``) may later be deleted by the retention rules (``Retention``)."""
    from lora_gui.engine.network import save_lora

    m, p = t.settings.model, t.progress
    path = t.out_dir / f"{stem}.{m.save_as}"
    state_dir = t.out_dir / f"{stem}-state"
    if path in t.saved:  # saved at this very step already (decided alike on every process)
        if state and state_dir not in t.saved:  # e.g. a Stop right after a step save without state
            t.saved.add(state_dir)
            state_files.save_state(t, state_dir)
            t.files.append(state_dir)
            t.log(f"Saved the state {state_dir}")
        return path, (state_dir if state_dir in t.saved else None)
    t.saved.add(path)
    t.acc.wait_for_everyone()
    with averaged_weights(t.optimizer):  # schedule-free: save the averaged weights
        tensors = t.family.lora_file_tensors(t.model, t.network, t.settings, SAVE_DTYPES[m.save_precision])
    if not all(torch.isfinite(v.float()).all() for v in tensors.values()):
        raise Diverged("The LoRA weights are no longer finite numbers (NaN/inf): the learning rate "
                       "is probably too high. Lower training.learning_rate; the last saved "
                       "checkpoint is kept.")
    if t.is_main:
        metadata = None
        if m.save_as == "safetensors":
            metadata = build_metadata(t.settings, t.facts, epoch=p.epoch, step=p.step, final=final)
            # sd-scripts' LoRANetwork.save_weights adds the sshs_* hashes even with no_metadata.
            metadata = with_hashes(tensors, metadata)
        path = save_lora(path, tensors, metadata, m.save_as)
        t.files.append(path)
    if state:
        t.saved.add(state_dir)
        state_files.save_state(t, state_dir)
        t.files.append(state_dir)
    loss = validation_now(t)
    t.emit(ev.CheckpointSaved(step=p.step, epoch=p.epoch, path=str(path),
                              state_dir=str(state_dir) if state else None, final=final,
                              validation_loss=loss))
    t.log(f"Saved {path}" + (f" and its state {state_dir}" if state else "")
          + (f" (validation loss {loss:.4f})" if loss is not None else ""))
    return path, (state_dir if state else None)


def validation_now(t) -> float | None:
    """The validation loss of the LoRA as it is now: the one measured at this step, else measured
    now; None when the run holds no images out."""
    step = t.progress.step
    if not (t.validation_losses and t.validation_losses[-1][0] == step):
        if not t.dataset.validation_batches():
            return None
        evaluation.validate(t)
    return t.validation_losses[-1][1]


def save_epoch(t, epoch: int) -> None:
    """The per-epoch save NAME-0000EE (and its state), then the retention rules (``Retention``):
    sd-scripts' save_last_n_epochs(_state) and keep_best_checkpoints together."""
    stem = f"{t.name}-{epoch:06d}"
    path, state_dir = save(t, stem, state=t.settings.model.save_state)
    _register(t, "epoch", epoch, path, state_dir, validation_now(t) if t.settings.images.keep_best_checkpoints
              else None)


def save_step(t, step: int) -> None:
    """The per-step save NAME-stepSSSSSS (and its state), then the retention rules (``Retention``):
    sd-scripts' save_last_n_steps(_state)."""
    path, state_dir = save(t, f"{t.name}-step{step:06d}", state=t.settings.model.save_state)
    _register(t, "step", step, path, state_dir, None)


@dataclass
class _Save:
    """One periodic save the retention rules look after (None once that part is deleted)."""

    kind: str  # "epoch" or "step"
    number: int  # its epoch or step
    path: Path | None
    state_dir: Path | None
    loss: float | None  # validation loss (epoch saves with keep_best_checkpoints)


class Retention:
    """Which periodic saves (LoRA files and state folders) the retention settings still keep.

    The rules: ``keep_best_checkpoints`` (the N epoch saves with the lowest validation loss),
    ``save_last_n_epochs`` / ``_state`` (sd-scripts train_util.get_remove_epoch_no: drop the saves of
    epochs <= newest - save_every_n_epochs x N) and ``save_last_n_steps`` / ``_state``
    (train_util.get_remove_step_no: drop the saves at steps <= newest - N - 1 floored to a multiple
    of save_every_n_steps). A file is deleted only when every active rule that governs it drops it;
    a file no active rule governs is kept. Only registered saves are candidates: the final LoRA and
    its state, a Stop's and a Save-now's files are never registered. A deleted file leaves the
    ledger, so it is never deleted twice. Dropping is for good: a rule never wants a file back."""

    def __init__(self, images):
        self.images = images
        self.saves: list[_Save] = []
        self.newest = {"epoch": 0, "step": 0}

    def add(self, kind: str, number: int, path: Path | None, state_dir: Path | None,
            loss: float | None = None) -> None:
        if any(s.kind == kind and s.number == number for s in self.saves):
            return  # the same save registered twice (e.g. resumed at that very save)
        self.saves.append(_Save(kind, number, path, state_dir, loss))
        self.newest[kind] = max(self.newest[kind], number)

    def to_delete(self) -> list[tuple[Path, list[str]]]:
        """(file, the rules that dropped it) for each registered file every active rule drops; they
        leave the ledger."""
        gone = []
        for save in self.saves:
            for part in ("path", "state_dir"):
                target = getattr(save, part)
                verdicts = self._verdicts(save, state=part == "state_dir") if target else []
                if verdicts and all(drop for drop, _ in verdicts):
                    gone.append((target, [why for _, why in verdicts]))
                    setattr(save, part, None)
        self.saves = [s for s in self.saves if s.path or s.state_dir]
        return gone

    def _verdicts(self, save: _Save, *, state: bool) -> list[tuple[bool, str]]:
        """(drops it, why) of each active rule governing this save's LoRA (or its state)."""
        img, verdicts = self.images, []
        if save.kind == "epoch" and img.keep_best_checkpoints and save.loss is not None:
            n = img.keep_best_checkpoints
            verdicts.append((save not in self._best(n), f"not among the {n} best by validation loss "
                             f"({save.loss:.4f}; images.keep_best_checkpoints)"))
        field = f"save_last_n_{save.kind}s"
        last_n, name = getattr(img, field), field
        if state and getattr(img, field + "_state"):
            last_n, name = getattr(img, field + "_state"), field + "_state"
        if last_n:
            newest = self.newest[save.kind]
            if save.kind == "epoch":
                limit = newest - img.save_every_n_epochs * last_n
            else:
                limit = newest - last_n - 1
                limit -= limit % max(img.save_every_n_steps, 1)
            verdicts.append((save.number <= limit, f"older than the last {last_n} {save.kind} saves "
                             f"(images.{name})"))
        return verdicts

    def _best(self, n: int) -> list[_Save]:
        ranked = [s for s in self.saves if s.kind == "epoch" and s.loss is not None]
        return sorted(ranked, key=lambda s: s.loss)[:n]  # stable: on a tie the earlier save


def _register(t, kind: str, number: int, path: Path, state_dir: Path | None, loss: float | None) -> None:
    """Hand a periodic save to the retention rules and delete what they all drop (main process)."""
    if t.retention is None:
        t.retention = Retention(t.settings.images)
        if t.settings.model.load_previous_save_state.strip():
            _earlier_saves(t, t.retention)
    t.retention.add(kind, number, path, state_dir, loss)
    for target, reasons in t.retention.to_delete():
        _delete(t, target, reasons)


def _earlier_saves(t, retention: Retention) -> None:
    """A resumed run's periodic saves from before the resume (names on the save cadence), which
    sd-scripts' retention, deleting by name, would find too."""
    img, ext = t.settings.images, t.settings.model.save_as
    pattern = re.compile(rf"{re.escape(t.name)}-(step)?(\d{{6}})(\.{re.escape(ext)}|-state)")
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for entry in sorted(t.out_dir.iterdir()):
        m = pattern.fullmatch(entry.name)
        kind = "step" if m and m.group(1) else "epoch"
        every = img.save_every_n_steps if kind == "step" else img.save_every_n_epochs
        if m and every and int(m.group(2)) % every == 0:
            found.setdefault((kind, int(m.group(2))), {})[m.group(3)] = entry
    for (kind, number), parts in sorted(found.items()):
        retention.add(kind, number, parts.get(f".{ext}"), parts.get("-state"))


def _delete(t, target: Path, reasons: list[str]) -> None:
    """Delete one dropped save (its LoRA file or state folder) and say why, in one log line."""
    final = {t.out_dir / f"{t.name}.{t.settings.model.save_as}", t.out_dir / f"{t.name}-state"}
    if not t.is_main or target in final or not target.exists():
        return
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    t.files = [f for f in t.files if f != target]
    t.log(f"Deleted {target.name}: " + " and ".join(reasons))
    t.emit(ev.CheckpointDeleted(path=str(target), reason=" and ".join(reasons)))


def resume(t, state_dir: Path) -> None:
    """Continue from a state folder; read without unpickling anything (see ``state_files``)."""
    distributed.check_state_processes(t.acc, state_dir)
    state_files.load_state(t, state_dir)
    t.log(f"Resumed from {state_dir} at step {t.progress.step}")
