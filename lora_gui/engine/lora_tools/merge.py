"""Merge LoRAs: several into one LoRA, or into a base model's weights.

With weights w_i, the merged update of a module is ``sum_i w_i * scale_i * up_i @ down_i``
(the sum of what each LoRA adds at strength w_i, as kohya-ss/sd-scripts ``merge_lora.py`` and
``svd_merge_lora.py`` compute it). Into one LoRA either

* ``concat``: the factors stacked along the rank (exact; rank = sum of the ranks), alpha = rank
  (scale 1) with sqrt(|w_i scale_i|) on both factors (the sign on up) so neither grows lopsided; or
* ``svd``: the summed update factorised back to a target rank (or a dynamic rank, see svd.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from .modules import DELTA_BUILDERS, LoraModule, module_tensors, network_kind, split_modules
from .svd import as_module_shapes, check_method, choose_rank, svd, truncate

MERGE_MODES = ("concat", "svd")
Progress = Callable[[int, int, str], None]


def lora_deltas(sd: Mapping[str, torch.Tensor], weight: float = 1.0, *, what: str = "The file"
                ) -> dict[str, torch.Tensor]:
    """{module name: weight * its weight update} (float32, the layer's weight shape)."""
    modules = split_modules(sd, what=what)
    build = DELTA_BUILDERS[network_kind(sd)]
    return {name: build(m) * weight for name, m in modules.items()}


def _check_shapes(parts: list[tuple[LoraModule, float]]) -> None:
    shapes = {tuple(m.weight_shape) for m, _ in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"The LoRAs disagree on the shape of {parts[0][0].name} ({' vs '.join(map(str, shapes))}): "
            "they were trained on different base models; merge LoRAs of one base model."
        )


def _grouped(items: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, list[tuple[LoraModule, float]]]:
    if not items:
        raise ValueError("Choose at least one LoRA to merge.")
    groups: dict[str, list[tuple[LoraModule, float]]] = {}
    for i, (sd, weight) in enumerate(items):
        for name, m in split_modules(sd, what=f"LoRA {i + 1}").items():
            groups.setdefault(name, []).append((m, float(weight)))
    for parts in groups.values():
        _check_shapes(parts)
    return groups


def _concat(parts: list[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    ups, downs = [], []
    for m, weight in parts:
        c = weight * m.scale
        root = math.sqrt(abs(c))
        ups.append(m.up * (math.copysign(root, c)))
        downs.append(m.down * root)
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return up, down, float(down.shape[0])


def merge_loras(
    items: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    mode: str = "concat",
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """One LoRA computing ``sum_i w_i * LoRA_i`` (concat: exactly; svd: its best rank-``rank`` approximation)."""
    if mode not in MERGE_MODES:
        raise ValueError(f"The merge mode must be one of {', '.join(MERGE_MODES)}, got {mode!r}.")
    if mode == "svd":
        if rank is None or rank < 1:
            raise ValueError("Merging by SVD needs a target rank of at least 1: set rank.")
        check_method(dynamic_method, dynamic_param)
    groups = _grouped(items)
    out: dict[str, torch.Tensor] = {}
    for i, (name, parts) in enumerate(groups.items()):
        if mode == "concat":
            up, down, alpha = _concat(parts)
        else:
            first = parts[0][0]
            delta = sum(lora_delta_flat(m) * w for m, w in parts)
            u, s, vh = svd(delta)
            max_rank = (conv_rank or rank) if first.is_conv else rank
            choice = choose_rank(s, max_rank, dynamic_method, dynamic_param)
            up, down = as_module_shapes(*truncate(u, s, vh, choice.rank), first.weight_shape)
            alpha = float(choice.rank)  # scale 1: the update is up @ down itself
        out.update(module_tensors(name, up, down, alpha, dtype))
        if progress is not None:
            progress(i + 1, len(groups), name)
    return out


def lora_delta_flat(m: LoraModule) -> torch.Tensor:
    """``scale * up @ down`` as an [out, in * k * k] matrix."""
    return (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)) * m.scale


def apply_deltas(
    weights: Mapping[str, torch.Tensor],
    key_map: Mapping[str, tuple[str, slice | None]],
    deltas: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``weights`` with each delta added to the tensor (or row slice) its module names: summed in
    float32, stored in the tensor's own dtype. Returns (new weights, modules with no tensor)."""
    changed: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, delta in deltas.items():
        if name not in key_map:
            missing.append(name)
            continue
        key, rows = key_map[name]
        if key not in changed:
            changed[key] = weights[key].float().clone()
        part = changed[key] if rows is None else changed[key][rows]
        if tuple(part.shape) != tuple(delta.shape):
            raise ValueError(
                f"The LoRA module {name} has the shape {list(delta.shape)} but the base model's {key} is "
                f"{list(part.shape)}: the LoRA was trained on another base model."
            )
        part += delta  # a view: writes into changed[key]
    out = dict(weights)
    out.update({k: v.to(weights[k].dtype) for k, v in changed.items()})
    return out, missing
