"""Block-wise LR weights and block dims/alphas per family, as sd-scripts numbers the blocks
(networks/lora.py ``get_block_index``, ``get_block_lr_weight``, ``get_block_dims_and_alphas``):
SD 1.x/2.x 25 blocks, SDXL 23 (is_sdxl: 0 embeddings, input_blocks 1..9, middle_block 10..12,
output_blocks 13..21, 22 out); Flux (networks/lora_flux.py reads none of them) refuses them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lora_gui import events as ev
from lora_gui.engine.blocks import (
    SD_BLOCKS,
    SDXL_BLOCKS,
    BlockSettingError,
    block_index,
    block_layout,
    block_lr_weights,
    sdxl_block_index,
)
from lora_gui.engine.network import ranks_in_file
from lora_gui.engine.train import Trainer
from lora_gui.settings import io

torch.set_num_threads(1)


def _adv(*overrides: str):
    return io.apply_overrides(io.defaults(), list(overrides)).advanced


def test_sdxl_block_index_follows_the_original_module_names():
    """get_block_index(is_sdxl=True): input_blocks_N -> 1 + N, middle_block_N -> 10 + N,
    output_blocks_N -> 13 + N, time_embed/label_emb 0, out 22."""
    assert sdxl_block_index("lora_unet_input_blocks_4_1_proj_in") == 5
    assert sdxl_block_index("lora_unet_input_blocks_8_0_out_layers_3") == 9
    assert sdxl_block_index("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q") == 11
    assert sdxl_block_index("lora_unet_output_blocks_0_0_in_layers_2") == 13
    assert sdxl_block_index("lora_unet_output_blocks_8_1_proj_out") == 21
    assert sdxl_block_index("lora_unet_time_embed_0") == 0 and sdxl_block_index("lora_unet_out_2") == 22
    assert sdxl_block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") == -1
    # The SD numbering of diffusers names is unchanged: down_blocks_1 attentions_1 -> 1 + 3 + 1.
    assert block_index("lora_unet_down_blocks_1_attentions_1_proj_in") == 5
    assert (SD_BLOCKS.total, SDXL_BLOCKS.total) == (25, 23)


def test_sdxl_block_lr_weights_by_hand():
    """get_block_lr_weight(is_sdxl): 9 down, 3 mid, 9 up weights (short lists filled with 1,
    long ones cut), framed by 1.0 for blocks 0 and 22; at or below the threshold -> 0. Linear over
    9: i / 8."""
    w = block_lr_weights("0.5,0.1", "0,2", "linear", 0.2, SDXL_BLOCKS)
    assert w == [1.0, 0.5, 0.0] + [1.0] * 7 + [0.0, 2.0, 1.0] + [0.0, 0.0] + [i / 8 for i in range(2, 9)] + [1.0]
    assert len(w) == 23
    # 12 down weights (an SD list) on SDXL: the first 9 are read, as sd-scripts cuts them.
    cut = block_lr_weights(",".join(str(i) for i in range(1, 13)), "", "", 0.0, SDXL_BLOCKS)
    assert cut[1:10] == [float(i) for i in range(1, 10)] and cut[10:] == [1.0] * 13
    cosine = block_lr_weights("cosine", "", "", 0.0, SDXL_BLOCKS)[1:10]
    assert cosine[0] == pytest.approx(1.0) and cosine[4] == pytest.approx(2 ** -0.5) and cosine[8] == 0.0
    # SD keeps its 25: 12 + 1 (the first of the mid weights) + 12.
    assert block_lr_weights("", "0.5,3", "", 0.0, SD_BLOCKS) == [1.0] * 12 + [0.5] + [1.0] * 12


def test_block_settings_per_family_or_a_sentence_naming_the_field():
    sd_dims = "advanced.block_dims=" + ",".join(["4"] * 25)
    xl_dims = "advanced.block_dims=" + ",".join(["4"] * 23)
    assert block_layout("sdxl", _adv(xl_dims)) is SDXL_BLOCKS
    assert block_layout("sd", _adv(sd_dims)) is SD_BLOCKS
    with pytest.raises(BlockSettingError, match=r"advanced.block_dims: the SDXL U-Net has 23 blocks.*got 25"):
        block_layout("sdxl", _adv(sd_dims))
    with pytest.raises(BlockSettingError, match=r"advanced.conv_block_alphas: the SD 1.x/2.x U-Net has 25"):
        block_layout("sd", _adv("advanced.conv_block_alphas=" + ",".join(["1"] * 23)))
    with pytest.raises(BlockSettingError, match=r"advanced.mid_lr_weight: .*lora_flux.py"):
        block_layout("flux", _adv('advanced.mid_lr_weight="0.5"'))
    assert block_layout("flux", _adv()) is None
    # The settings accept both lengths (the family is known only once the model is read).
    with pytest.raises(ValueError, match="25 comma-separated numbers .* or 23"):
        _adv("advanced.block_alphas=1,2,3")


# --- the tiny SDXL demo ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from lora_gui.engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo-sdxl"), seed=0, family="sdxl")


def _set_up(demo, out: Path, *extra: str) -> Trainer:
    settings = io.apply_overrides(io.load_preset("demo-tiny-sdxl-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0", "images.max_steps=1",
        "training.learning_rate=0.001", "training.unet_lr=0.001", *extra])
    trainer = Trainer(settings, [].append, ev.CommandQueue())
    trainer.t_start = time.time()
    trainer._setup()
    trainer.close()
    return trainer


def _hand_block(name: str) -> int:
    """The SDXL block of a kohya name, written out: 'lora_unet_<part>_blocks_<N>_...' or
    'lora_unet_middle_block_<N>_...'."""
    words = name.split("_")
    return {"input": 1, "middle": 10, "output": 13}[words[2]] + int(words[4])


@pytest.mark.slow  # the tiny SDXL set up twice: a few seconds
def test_sdxl_block_dims_alphas_and_lr_weights_reach_every_module(xl, tmp_path):
    """block_dims 23 = rank (block % 5) + 1 with alpha block / 2 + 0.5, conv_block_dims 2 (alpha
    0.25) for the 3x3 convs, the middle block's attention (block 11) and OUT0..7 left out by LR
    weights of 0: every U-Net module has its block's rank/alpha (or the conv one), and the
    optimizer's group of block b has lr x its weight (unet_block<b>, prepare_optimizer_params)."""
    dims = [b % 5 + 1 for b in range(23)]
    alphas = [b / 2 + 0.5 for b in range(23)]
    t = _set_up(xl, tmp_path, "advanced.block_dims=" + ",".join(map(str, dims)),
                "advanced.block_alphas=" + ",".join(map(str, alphas)),
                "advanced.conv_block_dims=" + ",".join(["2"] * 23),
                "advanced.conv_block_alphas=" + ",".join(["0.25"] * 23),
                "advanced.down_lr_weight=0.5,0.25", "advanced.mid_lr_weight=1,0,2",
                "advanced.up_lr_weight=0,0,0,0,0,0,0,0,3")
    unet = {k: v for k, v in ranks_in_file(t.network.state_dict_kohya()).items() if k.startswith("lora_unet_")}
    # input_blocks_0 (conv_in) has no LoRA; 11 and 13..20 have LR weight 0.
    assert {_hand_block(name) for name in unet} == {2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 21}
    for name, ranks in unet.items():
        b = _hand_block(name)
        assert ranks in ((dims[b], alphas[b]), (2, 0.25)), name
        if "_attn" in name or "proj_in" in name:
            assert ranks == (dims[b], alphas[b]), name
    assert {_hand_block(n) for n, r in unet.items() if r == (dims[_hand_block(n)], alphas[_hand_block(n)])} \
        >= {5, 6, 8, 9, 10, 12, 21}
    lrs = {g["name"]: g["initial_lr"] for g in t.optimizer.optimizer.param_groups}  # before warm-up
    for b, weight in {2: 0.25, 5: 1.0, 10: 1.0, 12: 2.0, 21: 3.0}.items():
        assert lrs[f"unet_block{b}"] == pytest.approx(0.001 * weight), b
    assert "unet_block11" not in lrs and "unet_block13" not in lrs


def test_a_flux_run_refuses_block_settings_before_building_its_network():
    """The engine's network set-up, where the family is known: a sentence naming the field."""
    from types import SimpleNamespace

    from lora_gui.engine import setup
    from lora_gui.engine.errors import EngineError

    settings = io.apply_overrides(io.defaults(), ["advanced.up_lr_weight=cosine"])
    t = SimpleNamespace(settings=settings, family=SimpleNamespace(name="flux"))
    with pytest.raises(EngineError, match=r"^advanced.up_lr_weight: .*Clear it for Flux"):
        setup._build_network(t)
