"""Where the training curves go (``model.log_with``): TensorBoard, Weights & Biases or both, set up
as sd-scripts' ``train_util.init_trackers`` does: the tracker name (``log_tracker_name``, the W&B
project and the TensorBoard sub-folder), per-tracker options from a TOML file
(``log_tracker_config``: a ``[wandb]`` and/or ``[tensorboard]`` table) and, with ``log_config``, the
run's settings without its machine paths (``get_sanitized_config_or_none``).

W&B runs offline unless this machine is logged in (``WANDB_API_KEY`` or a ``wandb login`` entry
in ~/.netrc) or ``WANDB_MODE`` says otherwise: training never waits for a network, and an offline
run is uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

import tomllib

from lora_gui.engine.errors import EngineError
from lora_gui.settings import GROUPS, TrainingSettings


class Trackers:
    """The writers of one run behind SummaryWriter's two calls (``add_scalar``, ``close``)."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    def add_scalar(self, name: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(name, value, step)

    def add_scalars(self, values: dict[str, float], step: int) -> None:
        """Several scalars of one step at once: one TensorBoard event whose summary holds a value
        per tag (what add_scalar writes one event each for; the writer's thread wakes once, not
        per scalar) and one W&B log call."""
        for writer in self.writers:
            if isinstance(writer, _WandbWriter):
                writer.run.log({"global_step": step, **values})
            else:
                _tensorboard_scalars(writer, values, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _tensorboard_scalars(writer, values: dict[str, float], step: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import scalar

    summary = Summary(value=[v for name, value in values.items() for v in scalar(name, value).value])
    writer._get_file_writer().add_summary(summary, step)


class _WandbWriter:
    """A W&B run with SummaryWriter's calls. Every value is logged against ``global_step`` (a
    metric of its own), so a validation loss may arrive before the buffered losses of earlier
    steps without W&B dropping them as out of order."""

    def __init__(self, run) -> None:
        self.run = run
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.run.log({"global_step": step, name: value})

    def close(self) -> None:
        self.run.finish()


def sanitized_config(settings: TrainingSettings) -> dict[str, Any]:
    """The settings as 'group.name' -> value, without the folder and file paths (sd-scripts leaves
    the paths out of the logged config: they are machine-specific and may be private)."""
    config: dict[str, Any] = {}
    for group, cls in GROUPS.items():
        values = getattr(settings, group)
        for name, info in cls.model_fields.items():
            if (info.json_schema_extra or {}).get("widget") in ("folder", "file"):
                continue
            value = getattr(values, name)
            config[f"{group}.{name}"] = value if isinstance(value, (bool, int, float, str)) or \
                value is None else str(value)
    return config


def tracker_options(path: str) -> dict[str, dict]:
    """The ``log_tracker_config`` TOML: {"wandb": {...}, "tensorboard": {...}} (both optional)."""
    if not path.strip():
        return {}
    file = Path(path).expanduser()
    try:
        options = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EngineError(f"model.log_tracker_config: {file} could not be read as TOML ({exc}): "
                          "fix the file or clear the setting.") from None
    unknown = [k for k, v in options.items() if k not in ("wandb", "tensorboard") or not isinstance(v, dict)]
    if unknown:
        raise EngineError(f"model.log_tracker_config: {file} has {', '.join(map(repr, unknown))}: "
                          "use a [wandb] and/or a [tensorboard] table of options.")
    return options


def wandb_mode() -> str:
    """'online' only when this machine can log in without asking; otherwise 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def open_trackers(settings: TrainingSettings, log_root: Path, run_name: str, log) -> Trackers:
    """The trackers ``log_with`` asks for, writing under ``log_root``; ``log(message)`` says where."""
    m = settings.model
    name = m.log_tracker_name.strip() or run_name
    options = tracker_options(m.log_tracker_config)
    config = sanitized_config(settings) if m.log_config else None
    writers: list = []
    if m.log_with in ("tensorboard", "all"):
        writers.append(_tensorboard(log_root / name, options.get("tensorboard", {}), config))
    if m.log_with in ("wandb", "all"):
        writers.append(_wandb(log_root, name, run_name, options.get("wandb", {}), config, log))
    return Trackers(writers)


def _tensorboard(folder: Path, options: dict, config: dict | None):
    from torch.utils.tensorboard import SummaryWriter

    try:
        writer = SummaryWriter(log_dir=str(folder), **options)
    except TypeError as exc:
        raise EngineError(f"model.log_tracker_config: the [tensorboard] options were refused ({exc}): "
                          "use SummaryWriter's options (comment, flush_secs, max_queue, "
                          "filename_suffix).") from None
    if config is not None:
        writer.add_text("config", "```json\n" + json.dumps(config, indent=1) + "\n```", 0)
    return writer


def _wandb(log_root: Path, project: str, run_name: str, options: dict, config: dict | None, log):
    try:
        import wandb
    except ImportError:
        raise EngineError("model.log_with: logging to Weights & Biases needs the wandb package: "
                          "install it (pip install wandb) or log with tensorboard.") from None
    log_root.mkdir(parents=True, exist_ok=True)
    kwargs = {"project": project, "name": run_name, "dir": str(log_root), "mode": wandb_mode(),
              "config": config, **options}
    try:
        run = wandb.init(**kwargs)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"model.log_tracker_config: W&B refused the [wandb] options ({exc}): use "
                          "wandb.init's options (entity, tags, notes, group...).") from None
    if kwargs["mode"] == "offline":
        log(f"W&B logs offline to {log_root / 'wandb'} (this machine is not logged in): upload "
            "them later with 'wandb sync'.")
    return _WandbWriter(run)
