"""The pre-run memory estimate with the real model: exact parameter counts, and the activations of
one training step traced on the meta device (no memory, no arithmetic: only shapes).

Activations: every tensor autograd saves for the backward pass during the U-Net's forward is
counted (parameters and views of them excluded: they are the weights). Attention is counted as
the fused kernels on a GPU keep it (q, k, v, output and the row log-sum-exp, saved through autograd
like any other op), not as the N x N matrix of the reference implementation. With gradient
checkpointing only the checkpointed blocks' inputs stay (the checkpoint holds them for the
recomputation), and during the backward pass one block at a time is recomputed: the peak is what
the checkpointed forward saves, plus those inputs, plus the largest block's own activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lora_gui.dataset.memory import FRAMEWORK_BYTES, MemoryEstimate, trainable_bytes

# The modules diffusers' gradient checkpointing wraps one by one in a U-Net and in Flux's transformer.
_CHECKPOINT_UNITS = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D", "FluxTransformerBlock",
                     "FluxSingleTransformerBlock")


def parameter_bytes(*modules: torch.nn.Module | None, device: torch.device | None = None) -> int:
    """Bytes of the modules' parameters (those on ``device``'s type only, when given: a block swap
    keeps some at home)."""
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters()
               if device is None or p.device.type == device.type)


class _Counter:
    def __init__(self, params: set[int]):
        self.params, self.total, self.unit, self.largest = params, 0, 0, 0

    def pack(self, t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in self.params and id(base) not in self.params:
            self.total += t.numel() * t.element_size()
            self.unit += t.numel() * t.element_size()
        return t


class _FlashSaved(torch.autograd.Function):
    """What a fused attention kernel saves for its backward: q, k, v, the output and the float32 row
    log-sum-exp. Saved through autograd, so that inside a checkpointed block the checkpoint drops
    them as it drops everything else there."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty(query.shape[:-1] + value.shape[-1:], dtype=query.dtype, device=query.device)
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """SDPA that saves what a fused attention kernel saves, instead of the N x N weights."""
    return _FlashSaved.apply(query, key, value)


def _holding_checkpoint(counter: _Counter):
    """diffusers' checkpointing function, also counting the tensors the checkpoint holds (each
    block's inputs, once: temb and the rotary embedding are shared by every block)."""
    seen: set[int] = set()

    def checkpoint(module, *args):
        for t in args:
            for x in (t if isinstance(t, tuple) else (t,)):
                if isinstance(x, torch.Tensor) and id(x) not in seen and id(x) not in counter.params:
                    seen.add(id(x))
                    counter.total += x.numel() * x.element_size()
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    return checkpoint


def _unit_hooks(unet: torch.nn.Module, counter: _Counter) -> list:
    """Track the largest checkpoint unit (outermost only: a unit inside a unit is not separate)."""
    depth = [0]
    handles = []

    def pre(module, args):
        if depth[0] == 0:
            counter.unit = 0
        depth[0] += 1

    def post(module, args, out):
        depth[0] -= 1
        if depth[0] == 0:
            counter.largest = max(counter.largest, counter.unit)

    for module in unet.modules():
        if type(module).__name__ in _CHECKPOINT_UNITS:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def traced_activation_bytes(meta_unet: torch.nn.Module, call: Callable[[torch.nn.Module], object],
                            checkpointing: bool) -> int:
    """Peak activation bytes of one forward + backward of ``call(meta_unet)`` (a meta-device U-Net
    with the run's LoRA applied and the run's dtype; ``call`` feeds it meta inputs)."""
    counter = _Counter({id(p) for p in meta_unet.parameters()})
    handles = _unit_hooks(meta_unet, counter)
    meta_unet.train()
    original = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = _flash_like_sdpa
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), torch.enable_grad():
            call(meta_unet)
        full, largest = counter.total, counter.largest
        if not checkpointing:
            return full
        counter.total = 0
        with contextlib.ExitStack() as stack:
            meta_unet.enable_gradient_checkpointing(_holding_checkpoint(counter))
            stack.callback(meta_unet.disable_gradient_checkpointing)
            for h in handles:  # the checkpointed pass counts its saved inputs only
                h.remove()
            handles = []
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), torch.enable_grad():
                call(meta_unet)
        return counter.total + largest
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def run_estimate(*, frozen: list[torch.nn.Module | None], lora_params: int, optimizer: str,
                 activations: int, gpu: bool, device: torch.device | None = None, swapped_in: int = 0) -> MemoryEstimate:
    """The estimate for a loaded model: ``frozen`` are the modules that stay on the device (their
    parameters on ``device``, when given); ``swapped_in``: bytes of the one swapped block that is
    copied to the device while it computes (``engine.block_swap``)."""
    weights = parameter_bytes(*frozen, device=device) - lora_params * 4 + swapped_in
    return MemoryEstimate(weights, trainable_bytes(lora_params, optimizer), activations, FRAMEWORK_BYTES if gpu else 0)


def unet_activation_bytes(family, model, spec, text, *, batch: int, width: int, height: int,
                          checkpointing: bool) -> int:
    """Activations of one training step of ``model``'s U-Net with a LoRA of ``spec``, traced on a
    meta-device copy: ``text`` is one caption's conditioning (its shapes are used, batch-expanded).
    A LyCORIS network is traced as the LoRA of the same ranks (its activations are of that size)."""
    unet = model.unet
    # the compute precision: that of the frozen weights not stored in fp8 (norms, biases)
    dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad and p.element_size() > 1)
    meta_unet = family.meta_denoiser(model)
    meta_unet.requires_grad_(False)
    meta_model = family.with_unet(model, meta_unet)
    family.meta_network(meta_model, spec)
    if dtype in (torch.float16, torch.bfloat16):
        meta_unet.to(dtype)
    as_meta = lambda t: torch.empty((batch, *t.shape[1:]), device="meta", dtype=t.dtype)  # noqa: E731
    text = tuple(map(as_meta, text)) if isinstance(text, tuple) else as_meta(text)
    extra = family.meta_extra(batch)
    latents = torch.empty(batch, family.latent_channels(model), height // 8, width // 8, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")

    def call(_):
        return family.predict(meta_model, latents, timesteps, text, extra, meta_unet.dtype)

    return traced_activation_bytes(meta_unet, call, checkpointing)


def estimate_for_run(family, model, settings, network, text_encoders, buckets, device, text=None) -> MemoryEstimate:
    """The estimate of a set-up run: its frozen modules as they sit on the device, its LoRA, and the
    activations of its U-Net traced at the largest bucket and the batch size (text-encoder
    activations, when they are trained, are not traced: they are small beside the U-Net's).
    ``text``: the empty caption's conditioning when it is already encoded (the text encoders may
    have left the device)."""
    s = settings
    width, height = max(buckets, key=lambda b: b[0] * b[1])
    if text is None:
        with torch.no_grad():
            text = family.encode_text(model, [""], settings, device)
    activations = unet_activation_bytes(family, model, network.spec, text, batch=s.training.batch_size,
                                        width=width, height=height, checkpointing=s.training.gradient_checkpointing)
    lora = sum(p.numel() for p in network.unet_parameters() + network.text_encoder_parameters())
    on_device = [m for m in (model.unet, *text_encoders, model.vae)
                 if next(m.parameters()).device.type == device.type]
    swap = getattr(model, "block_swap", None)
    return run_estimate(frozen=on_device, lora_params=lora, optimizer=s.training.optimizer, activations=activations,
                        gpu=device.type == "cuda", device=device, swapped_in=swap.frozen_bytes()[1] if swap else 0)
