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


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Noise offset (Guttenberg 2023, "Diffusion with offset noise"): add offset * N(0, 1) per sample
    and channel, so the model can learn to change an image's mean brightness."""
    if offset <= 0:
        return noise
    shift = torch.randn(noise.shape[:2] + (1, 1), generator=generator, dtype=noise.dtype)
    return noise + offset * host_to(shift, noise.device)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023): add noise drawn at ever coarser
    resolutions, up-sampled to full size and weighted discount^i, then renormalise to unit std.
    Each level is coarser by a random factor in [2, 4)."""
    if iterations <= 0:
        return noise
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(1, iterations + 1):
        factor = float(2 + 2 * torch.rand((), generator=generator)) ** i
        hn, wn = max(1, int(h / factor)), max(1, int(w / factor))
        coarse = host_to(torch.randn((b, c, hn, wn), generator=generator, dtype=noise.dtype), noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    if v_prediction:
        return clipped / (snr + 1)
    # min(snr, gamma) / snr -> 1 as snr -> 0 (the last step of a zero-terminal-SNR schedule).
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict: the noise (epsilon) or the velocity (v-prediction,
    Salimans & Ho 2022: v = sqrt(a) * noise - sqrt(1 - a) * x0)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def zero_terminal_snr(scheduler):
    """The same DDPM schedule with its betas rescaled so the last timestep is pure noise (SNR 0):
    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1
    (diffusers' ``rescale_betas_zero_snr``). Used with v-prediction (NoobAI-XL v-pred, SD 2 768-v)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)
