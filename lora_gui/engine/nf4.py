"""4-bit NF4 storage of a frozen denoiser (QLoRA, Dettmers et al. 2023) with bitsandbytes.

Every frozen ``nn.Linear`` whose weight splits into bitsandbytes' 64-value blocks is replaced by a
``bnb.nn.Linear4bit`` holding the same weight in NF4 (quantized when it is moved to the device);
it computes in ``compute_dtype``. The LoRA is injected afterwards around the 4-bit layers and stays
32-bit. On the CPU bitsandbytes runs its reference kernels: slow, but the same arithmetic.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _replacement(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data.float().cpu(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(device)


def store_in_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Quantize ``model``'s frozen Linear weights to NF4 in place; returns how many. Call it before
    the LoRA is injected."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad and child.weight.numel() % 64 == 0:
                setattr(parent, name, _replacement(child, compute_dtype, device))
                count += 1
    return count
