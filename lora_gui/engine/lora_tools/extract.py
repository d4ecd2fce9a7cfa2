"""Extract a LoRA from a fine-tuned model and its base (kohya-ss/sd-scripts
``networks/extract_lora_from_models.py``): per LoRA target, the SVD of ``W_tuned - W_base``
truncated to the rank (or a dynamic rank, svd.py); up = U_r diag(S_r), down = Vh_r, alpha = rank
(scale 1), so ``up @ down`` is the best rank-r approximation of the difference.

sd-scripts clamps the factors' entries at their 0.99 quantile by default; here that is
``clamp_quantile`` (1.0 = off, the default: an exact difference stays exact).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .checkpoint import BaseWeights
from .modules import module_tensors
from .svd import as_module_shapes, check_method, choose_rank, svd, truncate

Progress = Callable[[int, int, str], None]


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    if values.numel() > 16_000_000:  # torch.quantile's input limit
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]]
    high = torch.quantile(values, quantile).item()
    return up.clamp(-high, high), down.clamp(-high, high)


def extract_lora(
    base: BaseWeights,
    tuned: Mapping[str, torch.Tensor],
    rank: int,
    *,
    conv_rank: int | None = None,
    conv: bool = False,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    min_diff: float = 0.0,
    clamp_quantile: float = 1.0,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(the LoRA, {module: kept energy}) for the modules whose difference exceeds ``min_diff``
    (max abs); ``tuned`` is the fine-tuned model's single-file state dict (the base's layout)."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError("The rank of the extracted LoRA must be at least 1.")
    if not 0 < clamp_quantile <= 1:
        raise ValueError(f"clamp_quantile is a fraction in (0, 1], got {clamp_quantile}.")
    check_method(dynamic_method, dynamic_param)
    targets = base.lora_targets(conv)
    out: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    for i, (name, is_conv) in enumerate(targets.items()):
        key, rows = base.key_map[name]
        if key not in tuned:
            raise ValueError(f"The fine-tuned model has no {key}: it is not of the base model's architecture.")
        a, b = base.state[key], tuned[key]
        if rows is not None:
            a, b = a[rows], b[rows]
        if a.shape != b.shape:
            raise ValueError(f"{key} has the shape {list(b.shape)} in the fine-tuned model and {list(a.shape)} "
                             "in the base: choose the base model it was fine-tuned from.")
        diff = b.double() - a.double()
        if progress is not None:
            progress(i + 1, len(targets), name)
        if diff.abs().max().item() <= min_diff:
            continue
        u, s, vh = svd(diff.reshape(diff.shape[0], -1))
        choice = choose_rank(s, (conv_rank or rank) if is_conv else rank, dynamic_method, dynamic_param)
        up, down = truncate(u, s, vh, choice.rank)
        if clamp_quantile < 1:
            up, down = _clamp(up, down, clamp_quantile)
        up, down = as_module_shapes(up, down, tuple(diff.shape))
        out.update(module_tensors(name, up, down, float(choice.rank), dtype))
        kept[name] = choice.fro_retained
    return out, kept
