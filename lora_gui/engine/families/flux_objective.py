"""FLUX.1's training objective: rectified flow on 2x2-packed latents.

With sigma in [0, 1] (timestep t = 1000 sigma):
    noisy  = (1 - sigma) * latents + sigma * noise                (Esser et al. 2024, eq. 2-3)
    target = noise - latents                                     (the velocity d noisy / d sigma)
The transformer sees the latents as a sequence of 2x2 patches (16 channels x 4 = 64 features per
token) with image ids (0, row, column), and text ids (0, 0, 0) per T5 token.

Timestep sampling follows sd-scripts' ``flux_train_utils.get_noisy_model_input_and_timesteps``
(names and formulas) and diffusers' ``training_utils`` for the SD3 densities and loss weights.
"""

from __future__ import annotations

import functools
import math

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each token is a 2x2 patch, channel-major (C, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    c = features // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete flow shift (SD3 paper eq. 23): s t / (1 + (s - 1) t)."""
    return sigma * shift / (1 + (shift - 1) * sigma)


def resolution_mu(tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift: mu linear in the token count, 0.5 at 256 and 1.15 at 4096."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (tokens - 256)


def time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1 / t - 1)) - Flux's schedule shift (BFL sampling.py ``time_shift``)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sample_sigmas(adv, batch: int, latent_hw: tuple[int, int], generator: torch.Generator,
                  scheduler_sigmas: torch.Tensor | None) -> torch.Tensor:
    """sigma per sample for ``advanced.timestep_sampling`` (sd-scripts' names and formulas);
    ``scheduler_sigmas`` (``training_sigmas``) is needed by "sigma" sampling only."""
    kind = adv.timestep_sampling
    if kind == "uniform":
        return torch.rand(batch, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(adv.logit_mean + adv.logit_std * torch.randn(batch, generator=generator))
    if kind in ("sigmoid", "shift", "flux_shift"):
        sigma = torch.sigmoid(adv.sigmoid_scale * torch.randn(batch, generator=generator))
        if kind == "shift":
            return shift_sigma(sigma, adv.discrete_flow_shift)
        if kind == "flux_shift":
            h, w = latent_hw
            return time_shift(resolution_mu((h // 2) * (w // 2)), sigma)
        return sigma
    # "sigma": an index into the scheduler's (shifted) sigmas, drawn with the weighting scheme's density
    u = _density(adv, batch, generator)
    indices = (u * len(scheduler_sigmas)).long().clamp(max=len(scheduler_sigmas) - 1)
    return scheduler_sigmas[indices]


def _density(adv, batch: int, generator: torch.Generator) -> torch.Tensor:
    """diffusers' ``compute_density_for_timestep_sampling``, with our generator (for resume)."""
    if adv.weighting_scheme == "logit_normal":
        return torch.sigmoid(adv.logit_mean + adv.logit_std * torch.randn(batch, generator=generator))
    u = torch.rand(batch, generator=generator)
    if adv.weighting_scheme == "mode":
        return 1 - u - adv.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


@functools.lru_cache(maxsize=8)
def training_sigmas(shift: float, steps: int = 1000) -> torch.Tensor:
    """The shifted sigmas of FlowMatchEulerDiscreteScheduler(shift=...) at its 1000 training steps
    (cached: a read-only table, indexed by ``sample_sigmas``)."""
    sigma = torch.linspace(1, steps, steps).flip(0) / steps
    return shift_sigma(sigma, shift)


def loss_weights(weighting_scheme: str, sigma: torch.Tensor) -> torch.Tensor | None:
    """diffusers' ``compute_loss_weighting_for_sd3`` per sample (None: all ones)."""
    if weighting_scheme not in ("sigma_sqrt", "cosmap"):
        return None
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas=sigma.float())
