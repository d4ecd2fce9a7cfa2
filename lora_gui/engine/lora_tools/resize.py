"""Resize a LoRA to a lower rank (kohya-ss/sd-scripts ``networks/resize_lora.py`` semantics).

Each module's ``up @ down`` is factorised by SVD and truncated to the new rank r'; the new alpha is
``scale * r'`` with the old ``scale = alpha / r``, so ``alpha' / r' == alpha / r`` and the effect of
the kept part is unchanged. Conv (k x k, k > 1) modules use ``conv_rank``; 1x1 convs count as linear.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .modules import module_tensors, split_modules
from .svd import as_module_shapes, check_method, choose_rank, svd_of_product, truncate

Progress = Callable[[int, int, str], None]  # (modules done, modules in all, module name)


@dataclass(frozen=True)
class ModuleReport:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    fro_retained: float  # the kept energy: sqrt(sum of kept S^2 / sum of all S^2)
    sum_retained: float


def resize_lora(
    sd: Mapping[str, torch.Tensor],
    rank: int,
    *,
    conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[ModuleReport]]:
    """The resized state dict and one report per module. ``rank`` / ``conv_rank`` are the new
    ranks (the maximum with a dynamic method); ``conv_rank`` defaults to ``rank``."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"The new rank must be at least 1, got {rank if rank < 1 else conv_rank}.")
    check_method(dynamic_method, dynamic_param)
    modules = split_modules(sd)
    out: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    for i, m in enumerate(modules.values()):
        u, s, vh = svd_of_product(m.up.reshape(m.up.shape[0], -1), m.down.reshape(m.rank, -1))
        max_rank = (conv_rank or rank) if m.is_conv else rank
        choice = choose_rank(s, max_rank, dynamic_method, dynamic_param)
        up, down = as_module_shapes(*truncate(u, s, vh, choice.rank), m.weight_shape)
        new_alpha = m.scale * choice.rank
        out.update(module_tensors(m.name, up, down, new_alpha, dtype))
        reports.append(ModuleReport(m.name, m.rank, choice.rank, new_alpha, choice.fro_retained,
                                    choice.sum_retained))
        if progress is not None:
            progress(i + 1, len(modules), m.name)
    return out, reports


def resize_metadata(metadata: Mapping[str, str], reports: list[ModuleReport], rank: int,
                    conv_rank: int | None, dynamic_method: str | None, dynamic_param: float | None) -> dict[str, str]:
    """sd-scripts' metadata after a resize: dim/alpha (or "Dynamic") and a note in the comment."""
    meta = dict(metadata)
    old = max((r.old_rank for r in reports), default=0)
    comment = meta.get("ss_training_comment", "")
    if dynamic_method is None:
        conv = "" if conv_rank in (None, rank) else f" (conv: {conv_rank})"
        meta["ss_training_comment"] = f"dimension is resized from {old} to {rank}{conv}; {comment}"
        meta["ss_network_dim"] = str(rank)
        alphas = {r.new_alpha for r in reports if r.new_rank == rank}
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
        _set_conv_dim(meta, conv_rank)
    else:
        meta["ss_training_comment"] = f"Dynamic resize with {dynamic_method}: {dynamic_param} from {old}; {comment}"
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    return meta


def _set_conv_dim(meta: dict[str, str], conv_rank: int | None) -> None:
    """kohya records the conv rank in ss_network_args {"conv_dim": ...}; keep it true after a resize."""
    try:
        args = json.loads(meta.get("ss_network_args", ""))
    except ValueError:
        return
    if conv_rank is not None and isinstance(args, dict) and "conv_dim" in args:
        args["conv_dim"] = str(conv_rank)
        meta["ss_network_args"] = json.dumps(args)
