"""Block swapping for training (sd-scripts' ``blocks_to_swap``, for 12-16 GB cards): the frozen
weights of some transformer blocks live in CPU memory ("home") and each such block is copied to the
compute device just before it computes, in the forward pass and again in the backward pass.

At most one swapped block is on the device at a time: onloading a block drops the copy of the one
before (the frozen weights never change, so nothing is copied back; the home tensor stays the
weights' one true copy). The forward pass onloads block k in a forward pre-hook; the backward pass
onloads it when the gradients of its outputs arrive (an identity autograd node on its outputs),
before any of its own backward nodes run - those need its weights, directly or through gradient
checkpointing's recomputation, whose forward pre-hook then finds the block already there.

It needs gradient checkpointing to save memory: autograd keeps the weight tensors a forward pass used
(the device copies) until the backward pass, whereas a checkpoint's recomputation reads the
parameters anew - the copy onloaded for the backward pass, dropped again after the block's backward.

The trainable parameters of a swapped block (the LoRA) are not swapped: they stay on the device,
with their gradients and optimizer state. Moving a model (``.to(device)``, a dtype change) keeps the
swapped frozen weights at home and converts their dtype there.

diffusers' ``enable_group_offload`` does the forward part only (its onload hooks do not run before
the backward pass), so it cannot be used to train; sd-scripts' ``custom_offloading_utils`` swaps the
weights of block pairs on a side thread. This is a synchronous version of the same idea.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn


class _OnloadForBackward(torch.autograd.Function):
    """Identity on a block's outputs whose backward onloads the block first."""

    @staticmethod
    def forward(ctx, swap, index, *tensors):
        ctx.swap, ctx.index = swap, index
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        device = next((g.device for g in grads if g is not None), None)
        if device is not None:
            ctx.swap.onload(ctx.index, device)
        return (None, None, *grads)


def _first_device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class BlockSwap:
    """Swap ``blocks`` (modules called one after another) between ``home`` and the device their
    inputs are on. ``events`` (off by default) records ("on", i) / ("off", i) for tests."""

    def __init__(self, blocks: Sequence[nn.Module], home: torch.device | str = "cpu"):
        self.blocks = list(blocks)
        self.home = torch.device(home)
        self.resident: int | None = None
        self._away: dict[nn.Parameter, torch.Tensor] = {}  # onloaded frozen parameter -> its home tensor
        self.events: list[tuple[str, int]] | None = None
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(partial(self._before, i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(partial(self._after, i)))
            block._apply = types.MethodType(partial(_apply_keeping_home, swap=self), block)
            for p in _frozen(block):
                p.data = p.data.to(self.home)

    # --- moving --------------------------------------------------------------------------------

    def onload(self, index: int, device: torch.device) -> None:
        """Copy block ``index``'s frozen weights to ``device`` (after dropping the resident block's
        copies); its trainable parameters move there for good."""
        if self.resident == index:
            return
        self.offload()
        block = self.blocks[index]
        for p in block.parameters():
            if p.requires_grad:
                if p.device != device:
                    p.data = p.data.to(device)
            else:
                self._away[p] = p.data
                p.data = p.data.to(device, copy=True)  # a copy even on the CPU: home is never computed with
        self.resident = index
        if self.events is not None:
            self.events.append(("on", index))

    def offload(self) -> None:
        """Point the resident block's frozen parameters back at their home tensors (the device copies
        are freed once autograd no longer holds them)."""
        if self.resident is None:
            return
        for p, home in self._away.items():
            p.data = home
        self._away.clear()
        if self.events is not None:
            self.events.append(("off", self.resident))
        self.resident = None

    def settle_trainable(self, device: torch.device) -> None:
        """Move the swapped blocks' trainable parameters (a LoRA added after the swap) to ``device``
        before the optimizer is built, so that its state is created there."""
        for block in self.blocks:
            for p in block.parameters():
                if p.requires_grad and p.device != device:
                    p.data = p.data.to(device)

    def frozen_bytes(self) -> tuple[int, int]:
        """(bytes of all swapped frozen weights, bytes of the largest block's): what stays home, and
        what one onloaded block adds on the device."""
        sizes = [sum(p.numel() * p.element_size() for p in _frozen(b)) for b in self.blocks]
        return sum(sizes), max(sizes, default=0)

    def remove(self) -> None:
        self.offload()
        for handle in self._handles:
            handle.remove()
        for block in self.blocks:
            block.__dict__.pop("_apply", None)

    # --- hooks ---------------------------------------------------------------------------------

    def _before(self, index, module, args, kwargs):
        device = _first_device(args, kwargs)
        if device is not None:
            self.onload(index, device)

    def _after(self, index, module, args, output):
        if not torch.is_grad_enabled():
            return output
        outputs = output if isinstance(output, tuple) else (output,)
        positions = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not positions:
            return output
        wrapped = _OnloadForBackward.apply(self, index, *(outputs[i] for i in positions))
        result = list(outputs)
        for i, t in zip(positions, wrapped, strict=True):
            result[i] = t
        return tuple(result) if isinstance(output, tuple) else result[0]


def _frozen(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if not p.requires_grad]


def _apply_keeping_home(block: nn.Module, fn, recurse: bool = True, *, swap: BlockSwap):
    """``nn.Module._apply`` (what ``.to()``, ``.half()``... call) for a swapped block: its frozen
    weights take the new dtype but stay home (no transient device copy: the conversion is probed
    on an empty tensor)."""
    swap.offload()

    def convert(t):
        if isinstance(t, nn.Parameter) and not t.requires_grad:
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            return t.to(dtype=probe.dtype)
        return fn(t)

    return nn.Module._apply(block, convert, recurse)
