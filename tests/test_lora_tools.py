"""The LoRA tools' math on kohya state dicts (engine/lora_tools): resize, merge, inspect."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_gui.engine.lora_tools.inspection import block_of, inspect_lora, metadata_card
from lora_gui.engine.lora_tools.merge import apply_deltas, lora_deltas, merge_loras
from lora_gui.engine.lora_tools.modules import LoraFormatError, split_modules
from lora_gui.engine.lora_tools.resize import resize_lora, resize_metadata
from lora_gui.engine.lora_tools.svd import choose_rank

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
ONE_BY_ONE = "lora_unet_up_blocks_1_attentions_2_proj_in"
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def random_lora(seed: int = 0, rank: int = 8, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A kohya LoRA with a Linear, a 3x3 conv, a 1x1 conv and a text-encoder module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {  # name: (down shape, up shape)
        LINEAR: ((rank, 24), (40, rank)),
        CONV: ((rank, 6, 3, 3), (10, rank, 1, 1)),
        ONE_BY_ONE: ((rank, 16, 1, 1), (12, rank, 1, 1)),
        TE: ((rank, 32), (64, rank)),
    }
    sd = {}
    for name, (down, up) in shapes.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def deltas(sd) -> dict[str, torch.Tensor]:
    return lora_deltas(sd)


def test_delta_is_scale_up_down_by_hand():
    sd = random_lora(rank=2, alpha=1.0)
    d = deltas(sd)[LINEAR]
    expected = sd[f"{LINEAR}.lora_up.weight"] @ sd[f"{LINEAR}.lora_down.weight"] * 0.5
    assert torch.allclose(d, expected)
    conv = deltas(sd)[CONV]
    up, down = sd[f"{CONV}.lora_up.weight"][:, :, 0, 0], sd[f"{CONV}.lora_down.weight"]
    assert conv.shape == (10, 6, 3, 3)
    assert torch.allclose(conv[:, 2, 1, 0], 0.5 * up @ down[:, 2, 1, 0])


def test_resize_to_same_rank_reproduces_the_lora():
    sd = random_lora()
    out, reports = resize_lora(sd, 8)
    before, after = deltas(sd), deltas(out)
    for name in before:
        assert (after[name] - before[name]).abs().max().item() < 1e-5
        assert out[f"{name}.alpha"].item() == pytest.approx(4.0)  # scale alpha / r kept: 4 / 8
    assert all(r.new_rank == 8 and r.fro_retained == pytest.approx(1.0) for r in reports)


def test_resize_to_rank_4_is_the_truncated_svd():
    sd = random_lora()
    out, reports = resize_lora(sd, 4, conv_rank=3)
    for name, delta in deltas(sd).items():
        flat = delta.double().reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = 3 if name == CONV else 4
        truncated = (u[:, :r] * s[:r]) @ vh[:r]
        got = deltas(out)[name].double().reshape(flat.shape)
        assert (got - truncated).abs().max().item() < 1e-4
        assert out[f"{name}.lora_down.weight"].shape[0] == r
        assert out[f"{name}.alpha"].item() == pytest.approx(0.5 * r)  # old scale 4 / 8 times r
        report = next(x for x in reports if x.name == name)
        assert report.fro_retained == pytest.approx(float(s[:r].norm() / s.norm()), rel=1e-6)
    assert out[f"{ONE_BY_ONE}.lora_up.weight"].shape == (12, 4, 1, 1)  # 1x1 conv: linear rank


@pytest.mark.parametrize("method, param", [("sv_fro", 0.9), ("sv_cumulative", 0.7), ("sv_ratio", 3.0)])
def test_dynamic_methods_keep_what_they_promise(method, param):
    sd = random_lora(seed=3, rank=16)
    out, reports = resize_lora(sd, 16, dynamic_method=method, dynamic_param=param)
    for name, delta in deltas(sd).items():
        s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
        k = out[f"{name}.lora_down.weight"].shape[0]
        if method == "sv_fro":
            kept = [float(s[:j].norm() / s.norm()) for j in (k - 1, k)]
        elif method == "sv_cumulative":
            kept = [float(s[:j].sum() / s.sum()) for j in (k - 1, k)]
        else:  # every kept value above S0 / p, the next one not
            assert s[k - 1] > s[0] / param and (k == len(s) or s[k] <= s[0] / param)
            continue
        assert kept[1] >= param - 1e-9 > kept[0]  # the smallest rank that keeps the fraction
        assert k < 16  # the dynamic rank really dropped something
    assert {r.new_rank for r in reports} == {out[f"{r.name}.lora_down.weight"].shape[0] for r in reports}


def test_choose_rank_edges():
    assert choose_rank(torch.zeros(5), 4).rank == 1  # an all-zero module keeps rank 1
    assert choose_rank(torch.tensor([4.0, 2.0, 1.0, 1.0]), 2, "sv_cumulative", 1.0).rank == 2  # capped
    assert choose_rank(torch.tensor([4.0, 2.0, 1.0, 1.0]), 4, "sv_cumulative", 0.5).rank == 1  # 4/8
    with pytest.raises(ValueError, match="sv_ratio"):
        resize_lora(random_lora(), 4, dynamic_method="sv_ratio", dynamic_param=0.5)
    with pytest.raises(ValueError, match="dynamic_method must be one of"):
        resize_lora(random_lora(), 4, dynamic_method="svd", dynamic_param=0.5)


def test_resize_metadata_like_sd_scripts():
    sd = random_lora()
    _, reports = resize_lora(sd, 4)
    meta = resize_metadata({"ss_training_comment": "hi", "ss_network_args": json.dumps({"conv_dim": "8"})},
                           reports, 4, 2, None, None)
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); hi"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    dyn = resize_metadata({}, reports, 4, None, "sv_fro", 0.9)
    assert dyn["ss_network_dim"] == dyn["ss_network_alpha"] == "Dynamic"


def test_other_network_types_get_a_sentence():
    with pytest.raises(LoraFormatError, match="LoHa network; this tool works on plain LoRA"):
        split_modules({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(LoraFormatError, match="no LoRA modules"):
        split_modules({"foo": torch.zeros(2)})


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_merge_loras_is_the_weighted_sum(mode):
    a, b = random_lora(1, rank=4, alpha=2.0), random_lora(2, rank=8, alpha=8.0)
    del b[f"{TE}.lora_down.weight"], b[f"{TE}.lora_up.weight"], b[f"{TE}.alpha"]  # only in a
    merged = merge_loras([(a, 0.7), (b, -0.4)], mode, rank=12)
    da, db, dm = deltas(a), deltas(b), deltas(merged)
    for name in da:
        want = 0.7 * da[name] + (-0.4 * db[name] if name in db else 0)
        assert (dm[name] - want).abs().max().item() < 1e-4
    if mode == "concat":
        assert merged[f"{LINEAR}.lora_down.weight"].shape[0] == 12 and merged[f"{TE}.lora_down.weight"].shape[0] == 4


def test_merge_by_svd_to_a_lower_rank_is_the_truncated_sum():
    a, b = random_lora(1), random_lora(2)
    merged = merge_loras([(a, 1.0), (b, 1.0)], "svd", rank=3)
    total = (deltas(a)[LINEAR] + deltas(b)[LINEAR]).double()
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    assert (deltas(merged)[LINEAR].double() - (u[:, :3] * s[:3]) @ vh[:3]).abs().max() < 1e-4
    assert merged[f"{LINEAR}.alpha"].item() == 3.0


def test_apply_deltas_adds_to_the_named_rows_in_the_tensors_dtype():
    weights = {"w": torch.zeros(6, 4, dtype=torch.float16), "other": torch.ones(2)}
    d = {"q": torch.ones(2, 4), "k": torch.full((2, 4), 2.0), "x": torch.ones(1)}
    out, missing = apply_deltas(weights, {"q": ("w", slice(0, 2)), "k": ("w", slice(2, 4))}, d)
    assert missing == ["x"] and out["w"].dtype == torch.float16 and out["other"] is weights["other"]
    assert out["w"][:2].eq(1).all() and out["w"][2:4].eq(2).all() and out["w"][4:].eq(0).all()
    assert weights["w"].eq(0).all()  # the input is not changed


def test_block_labels_and_inspect():
    assert block_of("lora_unet_down_blocks_0_attentions_0_proj_in") == "IN01"
    assert block_of("lora_unet_down_blocks_1_attentions_1_proj_in") == "IN05"
    assert block_of("lora_unet_down_blocks_2_downsamplers_0_conv") == "IN09"
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == "M00"
    assert block_of("lora_unet_up_blocks_1_attentions_2_proj_in") == "OUT05"
    assert block_of("lora_unet_up_blocks_3_attentions_2_proj_out") == "OUT11"
    assert block_of(TE) == "TE"
    sd = random_lora(rank=2, alpha=1.0)
    info = inspect_lora(sd, {"ss_base_model_version": "sd_v1", "ss_tag_frequency": "not json",
                             "ss_network_args": json.dumps({"conv_dim": 4}), "weird_field": "x" * 400,
                             "ss_training_started_at": "1700000000"})
    assert info["kind"] == "LoCon" and info["base_model"] == "sd_v1" and info["modules"] == 4
    blocks = {b["block"]: b for b in info["blocks"]}
    assert list(blocks) == ["TE", "IN01", "OUT05"]
    expected_in01 = math.sqrt(sum(deltas(sd)[n].double().norm().item() ** 2 for n in (LINEAR, CONV)))
    assert blocks["IN01"]["norm"] == pytest.approx(expected_in01, rel=1e-6)
    assert blocks["IN01"]["ranks"] == [2] and blocks["IN01"]["alphas"] == [1.0] and blocks["IN01"]["conv_modules"] == 1
    card = {s["section"]: dict(s["rows"]) for s in info["card"]}
    assert card["Dataset"]["ss_tag_frequency"] == "not json"  # shown as written, no failure
    assert card["Network"]["ss_network_args"] == "conv_dim=4"
    assert card["Training"]["ss_training_started_at"] == "2023-11-14 22:13 UTC"
    assert card["Other"]["weird_field"].endswith("(400 characters)")


def test_metadata_card_never_fails_on_odd_values():
    odd = {"ss_dataset_dirs": json.dumps([1, 2]), "ss_tag_frequency": json.dumps({"a": {"x": "y"}}),
           "ss_training_finished_at": "yesterday", "ss_network_args": "[1]", "": ""}
    rows = {k: v for s in metadata_card(odd) for k, v in s["rows"]}
    assert rows["ss_training_finished_at"] == "yesterday" and rows["ss_dataset_dirs"] == "[1, 2]"


def test_text_encoder_key_maps_for_clip_and_openclip():
    from lora_gui.engine.lora_tools.checkpoint import text_encoder_key_map

    clip = "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"
    assert text_encoder_key_map([clip], {clip: (8, 8)}) == {
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj": (clip, None)}
    fused = "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"
    fc1 = "cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight"
    got = text_encoder_key_map([fused, fc1, "cond_stage_model.model.ln_final.weight"],
                               {fused: (3 * 16, 16), fc1: (64, 16)})
    prefix = "lora_te_text_model_encoder_layers_2_"
    assert got == {prefix + "self_attn_q_proj": (fused, slice(0, 16)),
                   prefix + "self_attn_k_proj": (fused, slice(16, 32)),
                   prefix + "self_attn_v_proj": (fused, slice(32, 48)),
                   prefix + "mlp_fc1": (fc1, None)}
    weights = {fused: torch.zeros(48, 16), fc1: torch.zeros(64, 16)}
    merged, _ = apply_deltas(weights, got, {prefix + "self_attn_k_proj": torch.ones(16, 16)})
    assert merged[fused][16:32].eq(1).all() and merged[fused][:16].eq(0).all() and merged[fused][32:].eq(0).all()
