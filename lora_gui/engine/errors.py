"""The engine's own exceptions; ``explain`` turns every exception into a sentence."""

from lora_gui import events as ev


class EngineError(ValueError):
    """A problem the user can fix; the message is one sentence that names the setting."""


class Diverged(RuntimeError):
    """The loss or the LoRA weights stopped being finite numbers."""


def explain(exc: BaseException) -> str:
    """One sentence the user can act on."""
    from lora_gui.dataset.scan import DatasetError
    from lora_gui.engine.model_files import ModelLoadError
    from lora_gui.engine.optim import OptimizerSettingError
    from lora_gui.engine.sampling import PromptLineError

    if isinstance(exc, (EngineError, Diverged, ModelLoadError, DatasetError, OptimizerSettingError,
                        PromptLineError, FileExistsError)):
        return str(exc)
    if ev.is_gpu_out_of_memory(f"{type(exc).__name__}: {exc}"):
        return ev.GPU_OOM
    if isinstance(exc, FileNotFoundError):
        return f"A file or folder is missing: {exc.filename or exc}. Check the paths in the settings."
    if isinstance(exc, PermissionError):
        return f"lora-gui may not write {exc.filename or exc}: choose a folder you can write to."
    return f"Training failed: {type(exc).__name__}: {exc}"
