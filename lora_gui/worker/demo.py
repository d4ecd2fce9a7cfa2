"""Which demo folder the settings point at: THE rule the page and the command line share.

Torch-free (the web process imports it). The layout is the one ``lora_gui.engine.demo.build_demo``
writes: ``X/model/`` (diffusers folder), ``X/model.safetensors`` (single file), ``X/dataset/``.
"""

from __future__ import annotations

from pathlib import Path

from lora_gui.settings import TrainingSettings

DEMO_MODEL_NAMES = ("model", "model.safetensors")
DEMO_DATASET_NAME = "dataset"


def demo_family(settings: TrainingSettings) -> str:
    """The family of the tiny demo model to build: the settings' explicit family (SD for auto)."""
    return "sd" if settings.model.family == "auto" else settings.model.family


def demo_dir_for(settings: TrainingSettings) -> Path | None:
    """The demo folder ``X`` to build, when the base model is ``X/model`` or ``X/model.safetensors``,
    the image folder is ``X/dataset``, and the base model is missing; else None (a real model, or a
    demo that is already built)."""
    if not settings.model.base_model.strip() or not settings.model.img_folder.strip():
        return None
    base = Path(settings.model.base_model).expanduser()
    if base.name not in DEMO_MODEL_NAMES or base.exists():
        return None
    dataset = Path(settings.model.img_folder).expanduser()
    if dataset.resolve() != (base.parent / DEMO_DATASET_NAME).resolve():
        return None
    return base.parent
