"""The Flux LoRA: which linears it trains, and its two file formats.

Targets are sd-scripts' ``networks/lora_flux.py``: every Linear inside a DoubleStreamBlock
(img_mod.lin, img_attn.qkv, img_attn.proj, img_mlp.0, img_mlp.2 and the txt_ twins: 10) and a
SingleStreamBlock (linear1, linear2, modulation.lin: 3), with ``train_blocks`` all/double/single
and per-block selection; FLUX.1-dev (19 + 38 blocks) gets 19 x 10 + 38 x 3 = 304 modules, 228
without the modulation linears. The LoRA lives on diffusers' FluxTransformer2DModel, whose q, k,
v (and single blocks' mlp input) are separate linears that the original model fuses; each gets its
own down/up pair of the run's rank (sd-scripts' ``split_qkv``).

kohya format: one module per original linear, ``lora_unet_double_blocks_0_img_attn_qkv``; a fused
linear's parts are written block-sparse - down = the parts' downs stacked [k r, in], up =
block-diagonal [sum out, k r] - and alpha = k x alpha, so that alpha / rank (k r) scales each part
exactly as alpha / r did. diffusers format: ``transformer.<module>.lora_A/lora_B.weight`` with
alpha / r folded into lora_B (diffusers' default scale is 1).
"""

from __future__ import annotations

import re

import torch

from lora_gui.engine.families.flux_convert import module_table

PREFIX = "lora_unet_"
_MODULATION = re.compile(r"\.(img_mod|txt_mod|modulation)\.lin$")


def kohya_module(orig_path: str) -> str:
    return PREFIX + orig_path.replace(".", "_")


def memory_name(diffusers_path: str) -> str:
    """The name a part's peft layer has inside the run's LoraNetwork."""
    return PREFIX + diffusers_path.replace(".", "_")


def parse_block_indices(text: str) -> dict[str, set[int]]:
    """'double:0-9 single:10,12' -> {'double': {0..9}, 'single': {10, 12}} (empty = no restriction)."""
    out: dict[str, set[int]] = {}
    for part in text.replace(";", " ").split():
        kind, _, spec = part.partition(":")
        if kind not in ("double", "single") or not spec:
            raise ValueError(f"advanced.flux_block_indices: {part!r} is not 'double:LIST' or 'single:LIST' "
                             "(e.g. double:0-9 single:10,12).")
        for item in spec.split(","):
            lo, _, hi = item.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"advanced.flux_block_indices: {item!r} is not a block number or range.")
            out.setdefault(kind, set()).update(range(int(lo), int(hi or lo) + 1))
    return out


def selected_modules(num_layers: int, num_single_layers: int, *, train_blocks: str = "all",
                     modulation: bool = True, indices: dict[str, set[int]] | None = None
                     ) -> dict[str, tuple[str, ...]]:
    """Original module path -> diffusers parts, for the modules the LoRA trains."""
    out = {}
    for orig, parts in module_table(num_layers, num_single_layers).items():
        kind = "double" if orig.startswith("double_blocks.") else "single"
        if train_blocks not in ("all", kind) or (not modulation and _MODULATION.search(orig)):
            continue
        if indices and kind in indices and int(orig.split(".")[1]) not in indices[kind]:
            continue
        out[orig] = parts
    return out


def modules_for(transformer, adv) -> dict[str, tuple[str, ...]]:
    cfg = transformer.config
    return selected_modules(cfg.num_layers, cfg.num_single_layers, train_blocks=adv.flux_train_blocks,
                            modulation=adv.flux_train_modulation, indices=parse_block_indices(adv.flux_block_indices))


def to_kohya(tensors: dict[str, torch.Tensor], modules: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """The run's LoRA (memory names, one pair per diffusers linear) in sd-scripts' Flux format."""
    out = {}
    for orig, parts in modules.items():
        names = [memory_name(p) for p in parts]
        downs = [tensors[f"{n}.lora_down.weight"] for n in names]
        ups = [tensors[f"{n}.lora_up.weight"] for n in names]
        alphas = {float(tensors[f"{n}.alpha"]) for n in names}
        if len(alphas) != 1:
            raise ValueError(f"{orig}: its parts have different alphas {sorted(alphas)}; cannot fuse them.")
        key = kohya_module(orig)
        out[f"{key}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[f"{key}.alpha"] = torch.tensor(alphas.pop() * len(parts), dtype=downs[0].dtype)
    return out


def to_diffusers_format(tensors: dict[str, torch.Tensor], modules: dict[str, tuple[str, ...]]
                        ) -> dict[str, torch.Tensor]:
    """diffusers/peft names with alpha / r folded into lora_B (so no alpha is needed)."""
    out = {}
    for parts in modules.values():
        for p in parts:
            n = memory_name(p)
            down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
            scale = float(tensors[f"{n}.alpha"]) / down.shape[0]
            out[f"transformer.{p}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{p}.lora_B.weight"] = (up.float() * scale).to(up.dtype).contiguous()
    return out


def from_file(tensors: dict[str, torch.Tensor], modules: dict[str, tuple[str, ...]], rank: int
              ) -> dict[str, torch.Tensor]:
    """A Flux LoRA file (kohya: block-sparse or shared-down fused modules; or diffusers format) in the
    run's memory names, so ``LoraNetwork.load_state_dict_kohya`` can load it."""
    if any(k.startswith("transformer.") for k in tensors):
        out = {}
        for parts in modules.values():
            for p in parts:
                n, a, b = memory_name(p), tensors.get(f"transformer.{p}.lora_A.weight"), \
                    tensors.get(f"transformer.{p}.lora_B.weight")
                if a is not None and b is not None:
                    out.update({f"{n}.lora_down.weight": a, f"{n}.lora_up.weight": b,
                                f"{n}.alpha": torch.tensor(float(a.shape[0]))})
        return out
    out = {}
    for orig, parts in modules.items():
        key = kohya_module(orig)
        if f"{key}.lora_down.weight" not in tensors:
            continue
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        alpha = float(tensors.get(f"{key}.alpha", torch.tensor(float(down.shape[0]))))
        k = len(parts)
        block = down.shape[0] == k * rank and k > 1
        downs = down.chunk(k, dim=0) if block else [down] * k
        rows = up.shape[0] // k if not parts[-1].endswith("proj_mlp") else None
        sizes = [rows] * k if rows else _single_sizes(up.shape[0], k)
        for i, (p, up_rows) in enumerate(zip(parts, up.split(sizes, dim=0))):
            n = memory_name(p)
            out[f"{n}.lora_down.weight"] = downs[i].contiguous()
            out[f"{n}.lora_up.weight"] = (up_rows[:, i * rank:(i + 1) * rank] if block else up_rows).contiguous()
            out[f"{n}.alpha"] = torch.tensor(alpha / k if block else alpha)
    return out


def _single_sizes(total: int, k: int) -> list[int]:
    """linear1's rows: 3 x inner + mlp, with mlp = 4 x inner (Flux's mlp_ratio)."""
    inner = total // 7
    return [inner, inner, inner, total - 3 * inner][:k]
