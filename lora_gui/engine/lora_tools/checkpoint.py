"""Which tensor of a base model's single file a kohya LoRA module changes.

kohya names a module after its diffusers path (``lora_unet_down_blocks_0_attentions_0_proj_in``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``); A1111/ComfyUI single files use the
original LDM names (:mod:`lora_gui.engine.ldm_keys`). The U-Net's diffusers names come from its
config (a model built on the meta device: no weights); SD 1.x CLIP keys carry their own names;
SD 2.x OpenCLIP fuses q/k/v into ``attn.in_proj_weight`` rows [q; k; v].
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_gui.engine.ldm_keys import to_single_file_state_dict, unet_to_ldm
from lora_gui.engine.model_detect import family_from_shapes, select_config
from lora_gui.engine.model_files import ModelLoadError, read_state_dict

UNET_LDM = "model.diffusion_model."
CLIP_LDM = "cond_stage_model.transformer."
OPENCLIP_LDM = "cond_stage_model.model.transformer.resblocks."
KeyMap = dict[str, tuple[str, slice | None]]  # kohya module name -> (file key, rows or None)

_OPENCLIP_PARTS = {  # CLIP (diffusers/transformers) -> OpenCLIP, per layer
    "self_attn_out_proj": "attn.out_proj.weight",
    "mlp_fc1": "mlp.c_fc.weight",
    "mlp_fc2": "mlp.c_proj.weight",
}


def unet_key_map(diffusers_keys: Iterable[str]) -> KeyMap:
    """kohya U-Net module names -> LDM keys, from the U-Net's diffusers state-dict keys."""
    keys = list(diffusers_keys)
    ldm_to_diffusers = unet_to_ldm({k: k for k in keys})  # values pass through unchanged
    out: KeyMap = {}
    for ldm, key in ldm_to_diffusers.items():
        if key.endswith(".weight"):
            out["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = (UNET_LDM + ldm, None)
    return out


def text_encoder_key_map(file_keys: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> KeyMap:
    """kohya text-encoder module names -> keys of an SD 1.x (CLIP) or SD 2.x (OpenCLIP) file."""
    out: KeyMap = {}
    for key in file_keys:
        if key.startswith(CLIP_LDM) and key.endswith(".weight"):
            out["lora_te_" + key[len(CLIP_LDM) : -len(".weight")].replace(".", "_")] = (key, None)
        elif m := re.match(re.escape(OPENCLIP_LDM) + r"(\d+)\.(.*)$", key):
            layer, rest = m[1], m[2]
            prefix = f"lora_te_text_model_encoder_layers_{layer}_"
            if rest == "attn.in_proj_weight":
                width = shapes[key][0] // 3
                for i, part in enumerate(("q", "k", "v")):
                    out[f"{prefix}self_attn_{part}_proj"] = (key, slice(i * width, (i + 1) * width))
            for name, openclip in _OPENCLIP_PARTS.items():
                if rest == openclip:
                    out[prefix + name] = (key, None)
    return out


_TE_TARGET = re.compile(r"^lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


@dataclass
class BaseWeights:
    state: dict[str, torch.Tensor]  # single-file (LDM) names
    key_map: KeyMap
    family: str  # "sd1" | "sd2"
    targets: dict[str, bool]  # kohya module names a LoCon trains -> is a k x k conv
    locon_only: frozenset[str] = frozenset()  # of those, the ones a plain LoRA does not train

    def lora_targets(self, conv: bool) -> dict[str, bool]:
        """The modules kohya's LoRA trains (with ``conv``: LoCon's ResNet/sampler layers too)."""
        return {n: c for n, c in self.targets.items() if conv or n not in self.locon_only}


def _meta_unet(config_dir: Path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_dir), subfolder="unet"))


def _unet_targets(unet) -> tuple[dict[str, bool], frozenset[str]]:
    from lora_gui.engine.network import _unet_targets as targets_of  # the trainer's own choice

    plain = {t.kohya_name for t in targets_of(unet, locon=False)}
    every = {t.kohya_name: t.is_conv for t in targets_of(unet, locon=True)}
    return every, frozenset(set(every) - plain)


def read_base(path: str | Path, config_dir: str | Path | None = None) -> BaseWeights:
    """The base model as one single-file state dict, with its key map and LoRA targets.

    A single file is read as it is (every key kept, dtype kept); a diffusers folder is loaded and
    written in the single-file layout (SD 1.x only: ldm_keys has no OpenCLIP writer).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from lora_gui.engine.model_load import load_base_model

        model = load_base_model(path)
        if model.is_v2:
            raise ModelLoadError(
                f"{path} is an SD 2.x diffusers folder; merging into it needs its single .safetensors/.ckpt file."
            )
        state = to_single_file_state_dict(model.unet, model.vae, model.text_encoder)
        config_dir = model.config_dir
    elif path.is_file():
        state = read_state_dict(path)
    else:
        raise ModelLoadError(f"The base model {path} does not exist: choose a checkpoint file or diffusers folder.")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = family_from_shapes(shapes)
    if family not in ("sd1", "sd2"):
        raise ModelLoadError(f"{path} is not an SD 1.x/2.x base model ({family}): choose one.")
    cfg = Path(config_dir) if path.is_dir() else select_config(path, shapes, family, config_dir)
    unet = _meta_unet(cfg)
    key_map = unet_key_map(unet.state_dict())
    key_map.update(text_encoder_key_map(state, shapes))
    targets, locon_only = _unet_targets(unet)
    targets.update({n: False for n in key_map if _TE_TARGET.match(n)})
    return BaseWeights(state, key_map, family, targets, locon_only)
