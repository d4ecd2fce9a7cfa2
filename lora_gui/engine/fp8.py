"""fp8 storage of a frozen model's weights (kohya's ``--fp8_base``): every Linear and Conv2d keeps
its weight in float8 e4m3 (1 byte instead of 2 or 4) and casts it to the compute precision only
inside its own forward and backward, so at most one layer's weight exists in full precision at a
time. Biases and norms keep their precision; LoRA layers (added afterwards) stay float32.

diffusers' ``enable_layerwise_casting`` does the same for inference, but it casts the weights back
after the forward, so autograd finds an fp8 weight in the backward pass; here the backward casts
it again (the frozen weight needs no gradient: only the input's is computed).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

STORAGE = torch.float8_e4m3fn


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.linear(x.to(dtype), weight.to(dtype), b)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype), None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.args, ctx.shape = (stride, padding, dilation, groups), x.shape
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        b = None if bias is None else bias.to(dtype)
        return F.conv2d(x.to(dtype), weight.to(dtype), b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight.to(ctx.dtype), grad.to(ctx.dtype), *ctx.args)
        return grad_x.to(ctx.x_dtype), None, None, None, None, None, None, None


def _linear_forward(self, x):
    return _Linear.apply(x, self.weight, self.bias, self.compute_dtype)


def _conv_forward(self, x):
    return _Conv2d.apply(x, self.weight, self.bias, self.compute_dtype, self.stride, self.padding,
                         self.dilation, self.groups)


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Convert ``model``'s frozen Linear/Conv2d weights to fp8 storage in place; returns how many.
    Call it before the LoRA is injected (the LoRA wraps the converted layers)."""
    count = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or module.weight.requires_grad:
            continue
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            continue
        module.weight.data = module.weight.data.to(STORAGE)
        module.compute_dtype = compute_dtype
        forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count
