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

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (StableDiffusion(),)}


def family_for(settings) -> ModelFamily:
    """The family that trains ``settings``' base model (SD 1.x/2.x is the only one so far)."""
    return FAMILIES["sd"]


__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "family_for", "split_conditioning",
           "stack_conditioning"]
