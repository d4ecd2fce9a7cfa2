"""Noise and loss helpers of the training step, each a small pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def host_to(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor.to(device)`` without a host sync. On CUDA a plain ``.to()`` from pageable host memory
    waits for all the GPU work queued so far (several stalls per training step); from pinned memory
    with ``non_blocking`` it does not (same values; PyTorch keeps the pinned buffer until the copy
    is done). Elsewhere it is ``.to()``."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator, *,
                 random_strength: bool = False, adaptive_scale: float = 0.0,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
    """Noise offset (Guttenberg 2023, "Diffusion with offset noise"): add offset * N(0, 1) per sample
    and channel, so the model can learn to change an image's mean brightness. As sd-scripts
    (``get_noise_noisy_latents_and_timesteps`` + ``apply_noise_offset``): with ``random_strength``
    the offset is U(0, 1) * offset, one draw per batch; with ``adaptive_scale`` the offset of each
    sample and channel grows by adaptive_scale * |mean of that latent channel| (clamped at 0).
    Nothing happens when ``offset`` is 0, whatever the other two say."""
    if offset <= 0:
        return noise
    strength: float | torch.Tensor = offset
    if random_strength:
        strength = torch.rand(1, generator=generator).item() * offset
    if adaptive_scale and latents is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        strength = torch.clamp(strength + adaptive_scale * channel_mean, min=0.0)
    shift = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=noise.dtype)
    return noise + strength * host_to(shift, noise.device)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023), as sd-scripts ``pyramid_noise_like``:
    for i = 0 .. iterations-1, add noise drawn at resolution size / r^i (r uniform in [2, 4), drawn
    per level), up-sampled bilinearly and weighted discount^i, then renormalise to unit std. Level 0
    is a second full-resolution noise at weight 1; the loop stops after the first 1-pixel level."""
    if iterations <= 0:
        return noise
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        factor = float(2 + 2 * torch.rand((), generator=generator)) ** i
        hn, wn = max(1, int(h / factor)), max(1, int(w / factor))
        coarse = host_to(torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype), noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def input_perturbation(noise: torch.Tensor, gamma: float, generator: torch.Generator,
                       random_strength: bool = False) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models"), as sd-scripts ``ip_noise_gamma``: the noisy latents are made with
    noise + gamma * N(0, 1) while the target stays ``noise``. With ``random_strength`` gamma is
    U(0, 1) * gamma, one draw per batch. Returns the noise to give to ``add_noise``."""
    if gamma <= 0:
        return noise
    strength = torch.rand(1, generator=generator).item() * gamma if random_strength else gamma
    extra = torch.randn(noise.shape, generator=generator, dtype=noise.dtype)
    return noise + strength * host_to(extra, noise.device)


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep) (sd-scripts ``get_timesteps``);
    all equal to max_timestep when min >= max (a fixed timestep)."""
    if min_timestep < max_timestep:
        return torch.randint(min_timestep, max_timestep, (batch,), generator=generator)
    return torch.full((batch,), max_timestep, dtype=torch.long)


def zero_terminal_snr(scheduler):
    """The same noise scheduler with its betas rescaled so that the last timestep has SNR 0
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1),
    as sd-scripts ``fix_noise_scheduler_betas_for_zero_terminal_snr``; diffusers' own
    ``rescale_betas_zero_snr`` option computes exactly that formula."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict: the noise (epsilon) or the velocity (v-prediction,
    Salimans & Ho 2022: v = sqrt(a) * noise - sqrt(1 - a) * x0)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
