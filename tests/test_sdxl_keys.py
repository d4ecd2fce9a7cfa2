"""SDXL at full size on the meta device: LoRA module counts and names equal kohya sd-scripts',
and every U-Net LoRA module is a module of the single-file (SGM) layout.

The expected names are enumerated here from the architecture of the original SDXL U-Net
(sd-scripts' ``library/sdxl_original_unet.py``: input_blocks 1-8, middle_block, output_blocks 0-8,
transformer depths 2 and 10) with sd-scripts' rules (``networks/lora.py``: every Linear and 1x1
conv inside ``Transformer2DModel``; with conv_dim also inside ``ResnetBlock2D``/``Downsample2D``/
``Upsample2D``; text encoders: the q/k/v/out projections and fc1/fc2 of every CLIP layer), not
from the code under test.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lora_gui.engine.families import sdxl_convert as conv
from lora_gui.engine.model_detect import CONFIGS_DIR

SDXL = CONFIGS_DIR / "sdxl"

# sd-scripts prints these when it creates an SDXL LoRA:
UNET_LORA_MODULES = 722  # 70 transformer blocks x 10 + 11 Transformer2DModels x (proj_in, proj_out)
UNET_LOCON_MODULES = 788  # + 17 resnets x 3 + 11 skip convs + 2 downsamplers + 2 upsamplers
TE1_MODULES = 72  # 12 CLIP-L layers x 6
TE2_MODULES = 192  # 32 bigG layers x 6


def _transformer(block: str, depth: int) -> list[str]:
    names = [f"{block}.proj_in", f"{block}.proj_out"]
    for d in range(depth):
        tb = f"{block}.transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            names += [f"{tb}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{tb}.ff.net.0.proj", f"{tb}.ff.net.2"]
    return names


def _resnet(block: str, skip: bool) -> list[str]:
    return [f"{block}.in_layers.2", f"{block}.emb_layers.1", f"{block}.out_layers.3"] + (
        [f"{block}.skip_connection"] if skip else []
    )


def expected_unet_modules(locon: bool) -> set[str]:
    """SGM module paths that sd-scripts puts LoRA on."""
    attn: list[str] = []
    convs: list[str] = []
    # input_blocks: (index, transformer depth, resnet has a skip conv); 3 and 6 are downsamplers.
    for index, depth, skip in ((1, 0, False), (2, 0, False), (4, 2, True), (5, 2, False),
                               (7, 10, True), (8, 10, False)):
        convs += _resnet(f"input_blocks.{index}.0", skip)
        if depth:
            attn += _transformer(f"input_blocks.{index}.1", depth)
    convs += ["input_blocks.3.0.op", "input_blocks.6.0.op"]
    convs += _resnet("middle_block.0", False) + _resnet("middle_block.2", False)
    attn += _transformer("middle_block.1", 10)
    for index in range(9):  # every output resnet takes the concatenated skip: a 1x1 skip conv
        convs += _resnet(f"output_blocks.{index}.0", True)
        depth = 10 if index < 3 else 2 if index < 6 else 0
        if depth:
            attn += _transformer(f"output_blocks.{index}.1", depth)
    convs += ["output_blocks.2.2.conv", "output_blocks.5.2.conv"]
    return set(attn + (convs if locon else []))


def expected_te_names(prefix: str, layers: int) -> set[str]:
    parts = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    return {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}


@functools.lru_cache(maxsize=1)
def _meta_sdxl():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SDXL), subfolder="unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SDXL / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(SDXL / "text_encoder_2")))
    return unet, te1, te2


def _unet_lora_names(locon: bool) -> list[str]:
    from lora_gui.engine.network import _unet_targets

    unet = _meta_sdxl()[0]
    module_map = conv.unet_module_map(unet.state_dict().keys())
    return [conv.kohya_name("lora_unet", module_map[t.path]) for t in _unet_targets(unet, locon=locon)]


def _te_lora_names(prefix: str, model) -> list[str]:
    from lora_gui.engine.network import _te_targets

    return [conv.kohya_name(prefix, conv.clip_text_path(t.path)) for t in _te_targets(model)]


@pytest.mark.parametrize("locon,count", [(False, UNET_LORA_MODULES), (True, UNET_LOCON_MODULES)])
def test_unet_lora_modules_match_sd_scripts(locon, count):
    names = _unet_lora_names(locon)
    assert len(names) == len(set(names)) == count
    assert set(names) == {conv.kohya_name("lora_unet", p) for p in expected_unet_modules(locon)}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0" in names


def test_text_encoder_lora_modules_match_sd_scripts():
    _, te1, te2 = _meta_sdxl()
    te1_names, te2_names = _te_lora_names("lora_te1", te1), _te_lora_names("lora_te2", te2)
    assert len(te1_names) == TE1_MODULES and len(te2_names) == TE2_MODULES
    assert set(te1_names) == expected_te_names("lora_te1", 12)
    assert set(te2_names) == expected_te_names("lora_te2", 32)


def test_every_unet_lora_module_is_a_module_of_the_single_file_layout():
    unet = _meta_sdxl()[0]
    single = {conv.UNET_PREFIX + k for k in conv.sdxl_unet_to_ldm(unet.state_dict())}
    assert "model.diffusion_model.label_emb.0.0.weight" in single
    for path in expected_unet_modules(locon=True):
        assert f"{conv.UNET_PREFIX}{path}.weight" in single, path
    # and the conversion is one-to-one (no two diffusers parameters land on one SGM key)
    assert len(single) == len(unet.state_dict())


def test_text_encoder_2_converts_to_open_clip_naming():
    te2 = _meta_sdxl()[2]
    sd = conv.openclip_to_ldm(te2.state_dict())
    assert sd["transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert sd["text_projection"].shape == (1280, 1280)
    assert sd["positional_embedding"].shape == (77, 1280)
    # 32 layers x (in_proj w+b, out_proj w+b, ln_1 w+b, ln_2 w+b, c_fc w+b, c_proj w+b) + 5 others
    assert len(sd) == 32 * 12 + 5
