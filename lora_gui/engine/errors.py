"""The engine's own exceptions; ``train.explain`` turns every exception into a sentence."""


class EngineError(ValueError):
    """A problem the user can fix; the message is one sentence that names the setting."""


class Diverged(RuntimeError):
    """The loss or the LoRA weights stopped being finite numbers."""
