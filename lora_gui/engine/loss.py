"""The loss of the training step and its per-timestep weights, each a small pure function.

Each function follows the sd-scripts function its docstring names (kohya-ss/sd-scripts,
``library/train_util.py`` and ``library/custom_train_functions.py``), so a config imported from
kohya_ss computes the same numbers here. ``snr`` is the signal-to-noise ratio alpha_bar / (1 - alpha_bar)
of each sample's timestep (``diffusers.training_utils.compute_snr``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# sd-scripts caps the SNR at 1000 where it divides by it (SNR is infinite at timestep 0 with zero
# terminal SNR's reversed schedule, and huge for the first steps of any schedule).
SNR_CAP = 1000.0


def huber_threshold(schedule: str, huber_c: float, huber_scale: float, timesteps: torch.Tensor,
                    snr: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The Huber parameter c per sample (sd-scripts ``get_huber_threshold_if_needed``;
    Khrapov & Popov 2024, "Improving Diffusion Models's Data-Corruption Resistance using Scheduled
    Pseudo-Huber Loss"):

    * ``constant``: c = huber_c * huber_scale;
    * ``exponential``: c = exp(-a t) * huber_scale with a = -ln(huber_c) / T, so c goes from
      huber_scale at t = 0 to huber_c * huber_scale at t = T;
    * ``snr``: c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - abar) / abar)
      = 1 / sqrt(SNR) (sd-scripts applies no huber_scale here).
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if schedule == "snr":
        sigmas = snr.float().rsqrt()
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"advanced.huber_schedule: {schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss (sd-scripts ``conditional_loss`` with ``reduction="none"``):

    * ``l2``: (p - y)^2;  ``l1``: |p - y|;
    * ``huber`` (pseudo-Huber): 2 c (sqrt((p - y)^2 + c^2) - c), ~ (p - y)^2 near 0, ~ 2c|p - y| far;
    * ``smooth_l1``: 2 (sqrt((p - y)^2 + c^2) - c), i.e. the pseudo-Huber loss divided by c.

    ``huber_c`` holds one c per sample (see :func:`huber_threshold`).
    """
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"the {loss_type} loss needs huber_c")
        c = huber_c.view(-1, *([1] * (pred.ndim - 1))).to(pred.device, pred.dtype)
        smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
        return smooth * c if loss_type == "huber" else smooth
    raise ValueError(f"advanced.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weight an unreduced latent-space loss [B, C, h, w] by a mask [B, 1, H, W] in [0, 1]
    (sd-scripts ``apply_masked_loss``): the mask is area-averaged down to the latent size, so a
    latent pixel counts with the share of its 8 x 8 image pixels that are inside the mask."""
    mask = F.interpolate(mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    return loss * mask


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma (sd-scripts ``apply_snr_weight``; Hang et al. 2023): min(SNR, gamma) / SNR for
    epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    clipped = torch.clamp(snr, max=gamma)
    if v_prediction:
        return clipped / (snr + 1)
    # min(snr, gamma) / snr -> 1 as snr -> 0 (the last step of a zero-terminal-SNR schedule).
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def v_pred_like_noise_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) with SNR capped at 1000 (sd-scripts ``get_snr_scale``): multiplying a
    v-prediction loss by it gives the epsilon loss's scale (``scale_v_pred_loss_like_noise_pred``),
    since ||v - v_pred||^2 = (SNR + 1) / SNR * ||eps - eps_pred||^2."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return capped / (capped + 1)


def v_pred_like_weight(snr: torch.Tensor, amount: float) -> torch.Tensor:
    """The factor of sd-scripts ``add_v_prediction_like_loss``: loss + loss / scale * amount with
    scale = :func:`v_pred_like_noise_scale`, i.e. loss * (1 + amount * (SNR + 1) / SNR): adds a
    v-prediction-like loss, which weights high-noise timesteps more, to an epsilon loss."""
    return 1 + amount / v_pred_like_noise_scale(snr)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (sd-scripts ``apply_debiased_estimation``; Yu et al. 2024, "Unmasking
    Bias in Diffusion Model Training"): 1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v, with SNR
    capped at 1000."""
    capped = torch.clamp(snr, max=SNR_CAP)
    return 1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)


def timestep_weights(snr: torch.Tensor, *, v_prediction: bool, min_snr_gamma: float = 0.0,
                     scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float = 0.0,
                     debiased_estimation: bool = False) -> torch.Tensor:
    """The per-sample weight of sd-scripts ``NetworkTrainer.post_process_loss``, whose steps
    multiply the loss one after the other in this order: Min-SNR, v-pred-like scaling, added
    v-pred-like loss, debiased estimation. 1 everywhere when all are off."""
    weight = torch.ones_like(snr)
    if min_snr_gamma > 0:
        weight = weight * min_snr_weight(snr, min_snr_gamma, v_prediction)
    if scale_v_pred_loss_like_noise_pred:
        weight = weight * v_pred_like_noise_scale(snr)
    if v_pred_like_loss:
        weight = weight * v_pred_like_weight(snr, v_pred_like_loss)
    if debiased_estimation:
        weight = weight * debiased_weight(snr, v_prediction)
    return weight


def needs_snr(adv) -> bool:
    """Whether the advanced settings ``adv`` weight the loss by the timestep's SNR."""
    return bool(adv.min_snr_gamma > 0 or adv.scale_v_pred_loss_like_noise_pred or adv.v_pred_like_loss
                or adv.debiased_estimation_loss
                or (adv.loss_type in ("huber", "smooth_l1") and adv.huber_schedule == "snr"))


def needs_timestep_count(adv) -> bool:
    """Whether the loss needs the number of training timesteps (the exponential Huber schedule)."""
    return adv.loss_type in ("huber", "smooth_l1") and adv.huber_schedule == "exponential"


def per_sample_loss(adv, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    snr: torch.Tensor | None, *, v_prediction: bool, num_train_timesteps: int | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample as sd-scripts ``NetworkTrainer.process_batch`` computes it from the
    advanced settings ``adv``: the elementwise loss of ``loss_type`` (with the scheduled Huber c),
    times the mask, the mean over everything but the batch, times :func:`timestep_weights` (``snr``
    may be None when :func:`needs_snr` is False)."""
    huber_c = None
    if adv.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_threshold(adv.huber_schedule, adv.huber_c, adv.huber_scale, timesteps, snr,
                                  num_train_timesteps)
    loss = elementwise_loss(pred.float(), target.float(), adv.loss_type, huber_c)
    if mask is not None:
        loss = masked(loss, mask)
    loss = loss.mean(dim=tuple(range(1, loss.ndim)))
    if snr is None:
        return loss
    weights = timestep_weights(
        snr, v_prediction=v_prediction, min_snr_gamma=adv.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred=adv.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=adv.v_pred_like_loss, debiased_estimation=adv.debiased_estimation_loss)
    return loss * weights.to(loss.device)
