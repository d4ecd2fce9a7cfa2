"""What differs between model families (SD 1.x/2.x today; SDXL and Flux next), behind one interface.

The training loop, the data path, caching, saving, resume, validation and events are the same for
every family; they call a ``ModelFamily`` for everything that is not. A family works on the loaded
model object its ``load`` returns (``unet``, ``vae``, ``noise_scheduler``, ``version`` and ``notes`` are
common to all; tokenizers and text encoders are the family's own business, reached through
``text_encoders`` and ``encode_text``).

Conditioning is what a family's denoiser needs besides the noisy latents and the timesteps: one
tensor (SD: the text encoder's hidden states) or a tuple of tensors (SDXL: hidden states and pooled
embedding), each batched along dimension 0, so the loop can cache it per caption without knowing
its shape.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from lora_gui.engine.noise import sample_timesteps

if TYPE_CHECKING:
    from lora_gui.engine.network import LoraNetwork, NetworkSpec
    from lora_gui.engine.sampling import SamplePrompt
    from lora_gui.settings import TrainingSettings

Conditioning = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def split_conditioning(cond: Conditioning) -> list[Conditioning]:
    """One item per batch row (what the text cache stores per caption)."""
    if isinstance(cond, torch.Tensor):
        return list(cond)
    return [tuple(rows) for rows in zip(*cond)]


def stack_conditioning(items: list[Conditioning]) -> Conditioning:
    """The inverse of ``split_conditioning``: a batch from one item per row."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return tuple(torch.stack(parts) for parts in zip(*items))


class ModelFamily(ABC):
    """One family of base models. Stateless: every method gets the loaded model and, where a
    setting matters, the settings (so a caller may change settings between calls)."""

    name: str  # the registry key

    # --- loading ---------------------------------------------------------------------------------

    @abstractmethod
    def load(self, settings: TrainingSettings):
        """The frozen base model from ``settings.model`` (folder or single file, offline)."""

    @abstractmethod
    def text_encoders(self, model) -> list[torch.nn.Module]:
        """Every text encoder of the model (frozen, moved, cast and LoRA-trained together)."""

    # --- conditioning ----------------------------------------------------------------------------

    @abstractmethod
    def encode_text(self, model, captions: list[str], settings: TrainingSettings,
                    device: torch.device) -> Conditioning:
        """The text conditioning of a batch of captions, exactly as training and sampling use it."""

    def batch_conditioning(self, model, batch, device: torch.device) -> Conditioning | None:
        """Conditioning a batch carries besides its captions (SDXL: sizes and crops); none here."""
        return None

    def meta_extra(self, batch_size: int) -> Conditioning | None:
        """``batch_conditioning``'s shapes on the meta device (for the memory estimate's trace)."""
        return None

    def with_unet(self, model, unet):
        """The loaded model with another U-Net (the memory estimate traces a meta-device copy)."""
        return dataclasses.replace(model, unet=unet)

    # --- objective -------------------------------------------------------------------------------

    @abstractmethod
    def num_train_timesteps(self, model) -> int:
        """Timesteps are drawn from range(num_train_timesteps)."""

    def sample_timesteps(self, model, latents: torch.Tensor, generator: torch.Generator,
                         settings: TrainingSettings) -> torch.Tensor:
        """One training timestep per sample (on the CPU, drawn from ``generator``): uniform over
        [min_timestep, min(max_timestep, num_train_timesteps)) here (sd-scripts ``get_timesteps``);
        flow-matching families draw a shifted sigma."""
        adv = settings.advanced
        return sample_timesteps(latents.shape[0], adv.min_timestep,
                                min(adv.max_timestep, self.num_train_timesteps(model)), generator)

    def loss_weights(self, model, timesteps: torch.Tensor, settings: TrainingSettings) -> torch.Tensor | None:
        """Per-sample loss weights of the family's own weighting scheme (None: none; Min-SNR and
        the other SNR weights are ``engine.loss``'s, from ``snr``)."""
        return None

    @abstractmethod
    def add_noise(self, model, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The noisy latents at ``timesteps``."""

    @abstractmethod
    def target(self, model, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict."""

    @abstractmethod
    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, text: Conditioning,
                extra: Conditioning | None, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's prediction for the noisy latents."""

    @abstractmethod
    def snr(self, model, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample signal-to-noise ratio of ``timesteps`` (the loss weights and Huber schedules
        of ``engine.loss`` are functions of it)."""

    @abstractmethod
    def v_prediction(self, model) -> bool:
        """Whether the denoiser predicts the velocity (the SNR weights differ for it)."""

    # --- the LoRA --------------------------------------------------------------------------------

    @abstractmethod
    def apply_network(self, model, spec: NetworkSpec) -> LoraNetwork:
        """Inject the LoRA into the family's targets, named as the family's LoRA files name them."""

    def lora_file_tensors(self, model, network: LoraNetwork, settings: TrainingSettings,
                          dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file as the family's tools name them (kohya's keys here)."""
        return network.state_dict_kohya(dtype)

    def lora_from_file(self, model, network: LoraNetwork, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA file's tensors in the names ``network.load_state_dict_kohya`` reads."""
        return tensors

    def meta_denoiser(self, model) -> torch.nn.Module:
        """A meta-device copy of the denoiser (the memory estimate traces it)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(model.unet.config)

    def meta_network(self, meta_model, spec) -> None:
        """Put the run's network (its ranks) on ``meta_denoiser``'s copy, for the estimate's trace;
        a LyCORIS network is traced as the LoRA of the same ranks (its activations are of that size)."""
        from lora_gui.engine.network import LoraNetwork, NetworkSpec

        LoraNetwork.apply(meta_model.unet, None, NetworkSpec(
            rank=spec.rank, alpha=spec.alpha, conv_rank=spec.conv_rank, conv_alpha=getattr(spec, "conv_alpha", None),
            train_text_encoder=False))

    def latent_channels(self, model) -> int:
        """Channels of the latents ``predict`` takes."""
        return model.unet.config.in_channels

    # --- samples and metadata --------------------------------------------------------------------

    @abstractmethod
    def generate_samples(self, model, prompts: list[SamplePrompt], settings: TrainingSettings, *,
                         encode, out_dir: Path, stem: str, device: torch.device,
                         dtype: torch.dtype) -> list[tuple[Path, str]]:
        """Render the sample prompts with the family's pipeline; (path, prompt) per image written."""

    @abstractmethod
    def write_demo_model(self, model_dir: Path, single_file: Path, seed: int) -> None:
        """Save the family's tiny random demo model as a diffusers folder and as a single file."""

    @abstractmethod
    def metadata_versions(self, model, settings: TrainingSettings) -> dict[str, str]:
        """The LoRA file's version strings: ss_v2, ss_base_model_version, modelspec.architecture."""
