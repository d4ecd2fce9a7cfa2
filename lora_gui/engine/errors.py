"""The engine's own exceptions; ``explain`` turns every exception into a sentence."""

import errno
from collections.abc import Sequence
from pathlib import Path

from lora_gui import events as ev


class EngineError(ValueError):
    """A problem the user can fix; the message is one sentence that names the setting."""


class Diverged(RuntimeError):
    """The loss or the LoRA weights stopped being finite numbers."""


LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def explain(exc: BaseException, saved: Sequence[Path] = (), out_dir: Path | None = None) -> str:
    """One sentence the user can act on. ``saved``: the files the run wrote, in order (a full
    disk names the last LoRA, which atomic writes leave whole); ``out_dir``: the output folder."""
    from lora_gui.dataset.images import ImageReadError
    from lora_gui.dataset.scan import DatasetError
    from lora_gui.engine.model_files import ModelLoadError
    from lora_gui.engine.optim import OptimizerSettingError
    from lora_gui.engine.sampling import PromptLineError

    if isinstance(exc, (EngineError, Diverged, ModelLoadError, DatasetError, OptimizerSettingError,
                        PromptLineError, FileExistsError, ImageReadError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return disk_full(exc, saved, out_dir)
    if ev.is_gpu_out_of_memory(f"{type(exc).__name__}: {exc}"):
        return ev.GPU_OOM
    if isinstance(exc, FileNotFoundError):
        return f"A file or folder is missing: {exc.filename or exc}. Check the paths in the settings."
    if isinstance(exc, PermissionError):
        return f"lora-gui may not write {exc.filename or exc}: choose a folder you can write to."
    return f"Training failed: {type(exc).__name__}: {exc}"


def disk_full(exc: OSError, saved: Sequence[Path], out_dir: Path | None) -> str:
    """The full-disk sentence: where it happened and which earlier LoRA is intact."""
    target = Path(exc.filename).parent if exc.filename else out_dir
    where = f"in {target}" if target else "for this run"
    loras = [Path(p) for p in saved if Path(p).suffix in LORA_SUFFIXES and Path(p).is_file()]
    if loras:
        kept = (f"The last LoRA saved before, {loras[-1]}, is complete and intact (files are "
                "written whole or not at all).")
    else:
        kept = "No LoRA had been saved yet in this run."
    return (f"The disk is full: lora-gui could not write {where} ({exc.strerror or exc}). {kept} "
            "Free some space (or choose an output folder on another disk) and start again.")
