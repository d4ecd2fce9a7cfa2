"""SDXL weights between the diffusers layout and the original (Stability "SGM") layout.

An SDXL single file (``sd_xl_base_1.0.safetensors`` and every model fine-tuned from it) holds

* ``model.diffusion_model.*``: the U-Net, numbered as flat ``input_blocks`` / ``middle_block`` /
  ``output_blocks`` lists like SD 1.x, plus ``label_emb.0.{0,2}`` (the size/crop "text_time"
  addition embedding that diffusers calls ``add_embedding.linear_{1,2}``);
* ``conditioner.embedders.0.transformer.text_model.*``: CLIP ViT-L/14 (transformers naming);
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG/14 in open_clip's own naming (fused
  ``attn.in_proj_weight`` = q, k, v stacked; ``text_projection`` stored as ``x @ P``, i.e. the
  transpose of a Linear weight);
* ``first_stage_model.*``: the VAE (LDM naming, as SD 1.x).

Reading such a file uses diffusers' ``from_single_file`` with the shipped configs; this module
writes one (the demo's single-file twin) and names LoRA modules the way kohya sd-scripts does: it
trains SDXL on its own copy of the original U-Net, so its LoRA keys use the original module paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), and its text-encoder keys are
``lora_te1_text_model_...`` (CLIP-L) and ``lora_te2_text_model_...`` (bigG).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lora_gui.engine.ldm_keys import clip_to_ldm, unet_to_ldm, vae_to_ldm

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

# diffusers' text_time addition embedding <-> SGM's label_emb (a Sequential: Linear, SiLU, Linear).
_ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}

# transformers CLIP encoder layer -> open_clip ResidualAttentionBlock (besides the fused q/k/v).
_OPENCLIP_LAYER = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def sdxl_unet_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SDXL U-Net keys -> SGM keys (no ``model.diffusion_model.`` prefix)."""
    rest: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for old, new in _ADD_EMBEDDING.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            rest[key] = value
    out.update(unet_to_ldm(rest))
    return out


def unet_module_map(parameter_names) -> dict[str, str]:
    """diffusers module path -> SGM module path, for every module of the U-Net that has a weight.

    Built by converting the parameter names (the conversion needs all of them: the flat LDM
    numbering depends on how many resnets each block has).
    """
    ldm_to_diffusers = sdxl_unet_to_ldm({k: k for k in parameter_names if k.endswith(".weight")})
    return {
        diffusers.removesuffix(".weight"): ldm.removesuffix(".weight")
        for ldm, diffusers in ldm_to_diffusers.items()  # type: ignore[misc]
    }


def kohya_name(prefix: str, module_path: str) -> str:
    """kohya's LoRA module name: the prefix and the module path with dots as underscores."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def clip_text_path(path: str) -> str:
    """A module path inside a transformers CLIP text model, with the ``text_model.`` level that
    A1111/ComfyUI/kohya names carry (transformers 5 dropped it from ``CLIPTextModel``)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def openclip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` keys -> open_clip keys (no prefix)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        # open_clip computes x @ text_projection; a Linear computes x @ W.T.
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for key in [k for k in sd if k.startswith(src)]:
            tail = key[len(src) :]
            for old, new in _OPENCLIP_LAYER:
                if tail.startswith(old):
                    out[dst + new + tail[len(old) :]] = sd.pop(key)
                    break
    if sd:
        raise ValueError(f"Unexpected text encoder 2 parameters: {sorted(sd)[:3]}")
    return out


def to_sdxl_single_file_state_dict(unet, vae, text_encoder, text_encoder_2) -> dict[str, torch.Tensor]:
    """One state dict in the SDXL single-file layout (what A1111, ComfyUI and Forge read)."""
    parts = (
        (UNET_PREFIX, sdxl_unet_to_ldm(unet.state_dict())),
        (VAE_PREFIX, vae_to_ldm(vae.state_dict())),
        (TE1_PREFIX, clip_to_ldm(text_encoder.state_dict())),
        (TE2_PREFIX, openclip_to_ldm(text_encoder_2.state_dict())),
    )
    return {prefix + k: v.detach().contiguous() for prefix, part in parts for k, v in part.items()}
