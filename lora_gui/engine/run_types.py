"""What a run is and where it stands: the result ``run_training`` returns, the position saved in every
state, and the imports a warm trainer does before Start. Kept apart from the loop (``train.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainingResult:
    status: str  # finished | stopped | failed
    step: int = 0
    output_path: Path | None = None
    state_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    message: str = ""
    losses: list[float] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunPosition:
    """Where the run is; saved in every state so a resume continues at the exact batch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch of ``epoch``

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]


def preload() -> None:
    """Import what a run imports lazily (the diffusers and transformers model classes, the
    sampling pipeline: seconds), so that a warm trainer (worker/warm.py) has done it before Start."""
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.optimization import get_scheduler  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
