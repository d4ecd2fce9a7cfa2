"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a U-Net conditioned on its hidden states,
the DDPM objective (epsilon or v-prediction) and kohya's ``lora_unet_`` / ``lora_te_`` file keys."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_gui.engine.families.base import Conditioning, ModelFamily
from lora_gui.engine.noise import training_target, zero_terminal_snr

# ModelSpec architecture of each base version (sai_model_spec 1.0.1).
ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1/lora",
    "sd_v2": "stable-diffusion-v2-512/lora",
    "sd_v2_v": "stable-diffusion-v2-768-v/lora",
}


def model_version(base_version: str, v_parameterization: bool) -> str:
    """kohya's ss_base_model_version: sd_v1 / sd_v2, with "_v" for v-prediction (sd_v1_v, sd_v2_v)."""
    family = "sd_v1" if base_version == "sd_v1" else "sd_v2"
    return family + ("_v" if v_parameterization else "")


class StableDiffusion(ModelFamily):
    name = "sd"

    def load(self, settings):
        from lora_gui.engine.model_load import load_base_model

        m = settings.model
        return self._with_schedule(load_base_model(m.base_model, vae_path=m.vae.strip() or None, v2=m.v2,
                                                   v_parameterization=m.v_parameterization), settings)

    def _with_schedule(self, model, settings):
        """The training schedule, rescaled to zero terminal SNR when the setting asks for it."""
        if settings.advanced.zero_terminal_snr:
            model.noise_scheduler = zero_terminal_snr(model.noise_scheduler)
        return model

    def text_encoders(self, model) -> list[torch.nn.Module]:
        return [model.text_encoder]

    def encode_text(self, model, captions, settings, device) -> Conditioning:
        from lora_gui.engine.text import encode_prompts

        return encode_prompts(model.tokenizer, model.text_encoder, captions,
                              max_token_length=settings.labels.max_token_length,
                              clip_skip=settings.training.clip_skip, device=device,
                              weighted=settings.labels.weighted_captions)

    def num_train_timesteps(self, model) -> int:
        return model.noise_scheduler.config.num_train_timesteps

    def add_noise(self, model, latents, noise, timesteps):
        return model.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, model, latents, noise, timesteps):
        return training_target(model.noise_scheduler, latents, noise, timesteps)

    def predict(self, model, noisy, timesteps, text, extra, dtype):
        return model.unet(noisy.to(dtype), timesteps, text.to(dtype)).sample

    def snr(self, model, timesteps):
        from diffusers.training_utils import compute_snr

        return compute_snr(model.noise_scheduler, timesteps)

    def v_prediction(self, model) -> bool:
        return model.noise_scheduler.config.prediction_type == "v_prediction"

    def apply_network(self, model, spec):
        from lora_gui.engine.network_lycoris import apply_network

        return apply_network(model.unet if spec.train_unet else None,
                             model.text_encoder if spec.train_text_encoder else None, spec)

    def generate_samples(self, model, prompts, settings, *, encode, out_dir: Path, stem: str, device,
                         dtype) -> list[tuple[Path, str]]:
        from lora_gui.engine.sampling import generate_samples

        return generate_samples(
            unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
            scheduler_config=model.noise_scheduler.config, prompts=prompts,
            sampler=settings.samples.sample_sampler, seed=settings.samples.test_seed, out_dir=out_dir,
            stem=stem, encode=encode, device=device, dtype=dtype)

    def write_demo_model(self, model_dir: Path, single_file: Path, seed: int) -> None:
        from lora_gui.engine.families.sd_demo import write_tiny_sd

        write_tiny_sd(model_dir, single_file, seed)

    def metadata_versions(self, model, settings) -> dict[str, str]:
        return {"ss_v2": "False" if model.version == "sd_v1" else "True",
                "ss_base_model_version": model_version(model.version, settings.model.v_parameterization),
                "modelspec.architecture": ARCHITECTURES[model.version]}
