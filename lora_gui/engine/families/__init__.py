"""Model families: one module per family, picked by name; the training loop never branches on it.

Adding a family is one module with a ``ModelFamily`` subclass plus one line in ``FAMILIES``.
"""

from __future__ import annotations

from lora_gui.engine.families.base import (
    Conditioning,
    ModelFamily,
    split_conditioning,
    stack_conditioning,
)
from lora_gui.engine.families.sd import StableDiffusion
from lora_gui.engine.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusion(), StableDiffusionXL())}
_DETECTED = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}


def detect_family(base_model: str) -> str | None:
    """The family of a base model from its keys and shapes (a file's header, a folder's configs);
    None when it cannot be told (missing, unreadable, not a model): loading then says why."""
    from lora_gui.engine.model_detect import inspect_checkpoint

    if not base_model.strip():
        return None
    try:
        return _DETECTED.get(inspect_checkpoint(base_model.strip()))
    except Exception:  # noqa: BLE001 - the family's loader reports the problem as a sentence
        return None


def family_for(settings) -> ModelFamily:
    """The chosen family, or with ``auto`` the detected one (SD when nothing can be detected).

    With an explicit choice the family's loader refuses a model of another family, naming it."""
    chosen = settings.model.family
    if chosen != "auto":
        return FAMILIES[chosen]
    return FAMILIES[detect_family(settings.model.base_model) or "sd"]


__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "detect_family", "family_for", "split_conditioning",
           "stack_conditioning"]
