"""Flux.1 transformer: the original (Black Forest Labs) layout <-> diffusers' FluxTransformer2DModel.

The original checkpoint (``flux1-dev.safetensors`` as ComfyUI and sd-scripts read it) fuses some of
diffusers' linears: a double block's ``img_attn.qkv`` is ``attn.to_q/to_k/to_v`` stacked on the
output dimension (``txt_attn.qkv``: ``attn.add_q/k/v_proj``), a single block's ``linear1`` is
``attn.to_q/to_k/to_v`` and ``proj_mlp`` stacked (3 x inner + mlp rows). The final layer's
modulation is (shift, scale) where diffusers has (scale, shift). One table, ``module_table``,
names every module both ways; the state-dict converters and the LoRA file names are built on it.
(Key names as diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` reads them; that
function assumes Flux's 3072 width, so the tiny demo needs this width-agnostic one.)
"""

from __future__ import annotations

import torch

_SIMPLE = {  # outside the blocks: original -> diffusers
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {  # inside double block i: original -> diffusers part(s) of transformer_blocks.i
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                 "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def module_table(num_layers: int, num_single_layers: int) -> dict[str, tuple[str, ...]]:
    """Original module path -> the diffusers module paths it fuses (in stacking order), for every
    linear inside the blocks (what a Flux LoRA can target)."""
    table: dict[str, tuple[str, ...]] = {}
    for i in range(num_layers):
        for orig, parts in _DOUBLE.items():
            table[f"double_blocks.{i}.{orig}"] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    for i in range(num_single_layers):
        for orig, parts in _SINGLE.items():
            table[f"single_blocks.{i}.{orig}"] = tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
    return table


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _renames(num_layers: int, num_single_layers: int) -> dict[str, str]:
    """Original tensor key -> diffusers tensor key, for the tensors that are only renamed."""
    names = {f"{o}.{w}": f"{d}.{w}" for o, d in _SIMPLE.items() for w in ("weight", "bias")}
    for i in range(num_layers):
        names.update({f"double_blocks.{i}.{o}": f"transformer_blocks.{i}.{d}" for o, d in _DOUBLE_NORMS.items()})
    for i in range(num_single_layers):
        names.update({f"single_blocks.{i}.{o}": f"single_transformer_blocks.{i}.{d}"
                      for o, d in _SINGLE_NORMS.items()})
    return names


def block_counts(keys) -> tuple[int, int]:
    """(double blocks, single blocks) of an original-layout state dict's keys."""
    def count(prefix: str) -> int:
        return 1 + max((int(k.split(".")[1]) for k in keys if k.startswith(prefix)), default=-1)

    return count("double_blocks."), count("single_blocks.")


def to_original(state: dict[str, torch.Tensor], num_layers: int, num_single_layers: int) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in the original layout (what flux1-dev.safetensors holds)."""
    out = {o: state[d] for o, d in _renames(num_layers, num_single_layers).items() if d in state}
    for orig, parts in module_table(num_layers, num_single_layers).items():
        for w in ("weight", "bias"):
            out[f"{orig}.{w}"] = torch.cat([state[f"{p}.{w}"] for p in parts], dim=0)
    for w in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{w}"] = _swap_halves(state[f"norm_out.linear.{w}"])
    return {k: v.contiguous() for k, v in out.items()}


def to_diffusers(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of ``to_original`` for a transformer of ``config`` (diffusers' config dict)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(inner * config.get("mlp_ratio", 4.0))
    n, ns = config["num_layers"], config["num_single_layers"]
    out = {d: state[o] for o, d in _renames(n, ns).items() if o in state}
    for orig, parts in module_table(n, ns).items():
        sizes = [mlp if p.endswith("proj_mlp") else None for p in parts]
        for w in ("weight", "bias"):
            fused = state[f"{orig}.{w}"]
            split = [s or (fused.shape[0] - sum(x or 0 for x in sizes)) // sizes.count(None) for s in sizes]
            for p, chunk in zip(parts, torch.split(fused, split, dim=0)):
                out[f"{p}.{w}"] = chunk
    for w in ("weight", "bias"):
        out[f"norm_out.linear.{w}"] = _swap_halves(state[f"final_layer.adaLN_modulation.1.{w}"])
    return {k: v.contiguous() for k, v in out.items()}
