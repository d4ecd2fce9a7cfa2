"""diffusers -> original (CompVis/LDM) key names: the inverse of diffusers' single-file conversion.

An A1111/ComfyUI single file names the U-Net ``model.diffusion_model.*``, the VAE
``first_stage_model.*`` and the SD 1.x CLIP ``cond_stage_model.transformer.text_model.*``; these
functions rename a diffusers state dict to those names (used to write the demo model as one file,
and to know the shapes a config describes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_ATTN_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename_prefix(rest: str, renames) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> LDM ``openaimodel.UNetModel`` keys (no prefix).

    LDM numbers the U-Net as flat lists: ``input_blocks[0]`` is conv_in, then per down block
    ``layers_per_block`` entries of (resnet, attention) and one downsampler entry (not after the
    last block); ``middle_block`` is resnet, attention, resnet; ``output_blocks`` has
    ``layers_per_block + 1`` entries per up block, the last holding the upsampler.
    """
    down_resnets = {int(k.split(".")[3]) for k in state_dict if k.startswith("down_blocks.0.resnets.")}
    per_down = len(down_resnets) + 1  # resnets + the downsampler slot
    up_has_attn = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        for old_prefix, new_prefix in _UNET_TOP_LEVEL.items():
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * per_down + layer
            if kind == "resnets":
                new = f"input_blocks.{index}.0.{_rename_prefix(rest, _UNET_RESNET_RENAMES)}"
            else:
                new = f"input_blocks.{index}.1.{rest}"
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            new = f"input_blocks.{1 + int(m[1]) * per_down + per_down - 1}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            if m[1] == "resnets":
                new = f"middle_block.{2 * int(m[2])}.{_rename_prefix(m[3], _UNET_RESNET_RENAMES)}"
            else:
                new = f"middle_block.1.{m[3]}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per_down + layer
            if kind == "resnets":
                new = f"output_blocks.{index}.0.{_rename_prefix(rest, _UNET_RESNET_RENAMES)}"
            else:
                new = f"output_blocks.{index}.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)):
            block = int(m[1])
            slot = 2 if block in up_has_attn else 1
            new = f"output_blocks.{block * per_down + per_down - 1}.{slot}.conv.{m[2]}"
        if new is None:
            raise ValueError(f"Unexpected U-Net parameter {key!r}: not an SD 1.x/2.x U-Net.")
        out[new] = value
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM ``AutoencoderKL`` keys (no prefix).

    LDM numbers decoder levels from the lowest resolution up (``decoder.up.{N-1-i}``) and stores
    the mid-block attention projections as 1x1 convolutions.
    """
    n_up = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.up_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in ("encoder", "decoder"):
            out[key] = value  # quant_conv, post_quant_conv
            continue
        new = rest
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            new = f"down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
            new = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            new = f"up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
            new = f"up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            new = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
            new = "mid.attn_1." + _rename_prefix(m[1], _VAE_ATTN_RENAMES.items())
            if value.ndim == 2:
                value = value[:, :, None, None]  # Linear -> 1x1 conv
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out.") :]
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        out[f"{part}.{new}"] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` keys -> ``transformer.text_model.*`` (no ``cond_stage_model.``).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level); A1111 files keep it.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out["transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def to_single_file_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One A1111/CompVis-layout state dict for an SD 1.x model (CLIP text encoder)."""
    sd: dict[str, torch.Tensor] = {}
    for prefix, part in (
        ("model.diffusion_model.", unet_to_ldm(unet.state_dict())),
        ("first_stage_model.", vae_to_ldm(vae.state_dict())),
        ("cond_stage_model.", clip_to_ldm(text_encoder.state_dict())),
    ):
        sd.update({prefix + k: v.detach().contiguous() for k, v in part.items()})
    return sd
