"""LoRA injection and the kohya file format (lora_gui.engine.network).

The end-to-end check is the one users care about: a LoRA we save loads into a fresh diffusers
pipeline with ``pipe.load_lora_weights`` and gives the same images as the network we trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re

import pytest

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from lora_gui.engine.network import (  # noqa: E402
    LoraNetwork,
    NetworkSpec,
    addnet_hash,
    load_lora_file,
    save_lora,
)

torch.set_num_threads(1)

N_TE_LAYERS = 2
N_TRANSFORMERS = 4 + 1 + 6  # 2 down blocks x 2 layers, the mid block, 2 up blocks x 3 layers
N_UNET_ATTN = N_TRANSFORMERS * 12  # proj_in, proj_out, attn1/attn2 q/k/v/out.0, ff.net.0.proj, ff.net.2
N_TE = N_TE_LAYERS * 6  # q/k/v/out_proj, fc1, fc2


# --------------------------------------------------------------------------------------------
# a tiny SD-1.x pipeline, built once per module
# --------------------------------------------------------------------------------------------


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    # transformers 5 ignores vocab_file=/merges_file= (it builds an empty 2-token tokenizer).
    tok = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16
    )
    assert tok("a cat").input_ids == [
        tokens.index(t) for t in ("<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>")
    ]
    return tok


@pytest.fixture(scope="module")
def base_pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=N_TE_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=16,
            projection_dim=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(base_pipe):
    return copy.deepcopy(base_pipe)


@pytest.fixture
def fresh_pipe(base_pipe):
    return copy.deepcopy(base_pipe)


def images(pipe) -> np.ndarray:
    out = pipe(
        "a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return out.images


def randomise_up(network: LoraNetwork, seed: int = 1, std: float = 0.3) -> None:
    """Up weights start at zero (LoRA is a no-op); give them values so the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.unet_parameters() + network.text_encoder_parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def kohya_name(part: str, module_path: str) -> str:
    """The naming rule, written independently of the engine: dots -> underscores, te gets text_model_."""
    if part == "unet":
        return "lora_unet_" + module_path.replace(".", "_")
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return "lora_te_" + module_path.replace(".", "_")


def lora_layers(model, part: str) -> dict[str, LoraLayer]:
    return {kohya_name(part, n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def unet_eps(pipe, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    return pipe.unet(x, 500, encoder_hidden_states=ctx).sample


# --------------------------------------------------------------------------------------------
# 1. diffusers loads what we save and computes the same images
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_rank", [0, 2], ids=["lora", "locon"])
def test_saved_lora_loads_in_diffusers_with_identical_images(pipe, fresh_pipe, tmp_path, conv_rank):
    base = images(pipe)
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=conv_rank, conv_alpha=3 if conv_rank else None)
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, spec)
    assert np.array_equal(images(pipe), base), "up = 0 at init, so the fresh LoRA must not change anything"
    randomise_up(network)
    ours = images(pipe)
    assert np.abs(ours - base).max() > 1e-2

    sd = network.state_dict_kohya()
    path = save_lora(tmp_path / "mine.safetensors", sd, {"ss_network_dim": "4"}, "safetensors")
    fresh_pipe.load_lora_weights(str(path))
    theirs = images(fresh_pipe)
    assert np.abs(theirs - ours).max() < 1e-4

    # No key silently skipped: diffusers made a LoRA layer for every module we saved, with our
    # weights and our per-module scale alpha / rank (linear 2/4, conv 3/2).
    for part, model in (("unet", fresh_pipe.unet), ("text_encoder", fresh_pipe.text_encoder)):
        loaded = lora_layers(model, part)
        assert sorted(loaded) == sorted(network.module_names()[part])
        for name, layer in loaded.items():
            (adapter,) = layer.lora_A.keys()
            torch.testing.assert_close(layer.lora_A[adapter].weight, sd[f"{name}.lora_down.weight"])
            torch.testing.assert_close(layer.lora_B[adapter].weight, sd[f"{name}.lora_up.weight"])
            is_conv = sd[f"{name}.lora_down.weight"].shape[-1] == 3
            assert layer.scaling[adapter] == pytest.approx(3 / 2 if is_conv else 2 / 4)
    n_conv = sum(
        1 for k, v in sd.items() if k.endswith("lora_down.weight") and v.ndim == 4 and v.shape[-1] == 3
    )
    assert (n_conv > 0) == (conv_rank > 0)


def test_lora_forward_is_base_plus_scaled_up_down(pipe):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    base_linear = copy.deepcopy(pipe.unet.get_submodule(path))
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=2))
    randomise_up(network)
    sd = network.state_dict_kohya()
    name = kohya_name("unet", path)
    x = torch.randn(3, 32)
    expected = base_linear(x) + x @ sd[f"{name}.lora_down.weight"].T @ sd[f"{name}.lora_up.weight"].T * (
        2 / 4
    )
    torch.testing.assert_close(pipe.unet.get_submodule(path)(x), expected)


# --------------------------------------------------------------------------------------------
# 2. keys, shapes, alpha, init, trainability
# --------------------------------------------------------------------------------------------


def test_kohya_keys_shapes_and_alpha(pipe):
    network = LoraNetwork.apply(
        pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=3)
    )
    sd = network.state_dict_kohya()
    names = network.module_names()
    all_names = names["unet"] + names["text_encoder"]
    assert len(names["text_encoder"]) == N_TE
    assert len([n for n in names["unet"] if "_attentions_" in n]) == N_UNET_ATTN
    assert set(sd) == {f"{n}.{s}" for n in all_names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in names["text_encoder"])
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names["text_encoder"]
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names["text_encoder"]
    for n in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_1_attentions_1_proj_out",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_up_blocks_0_resnets_2_time_emb_proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ):
        assert n in names["unet"], n
    # Outside the kohya target set: stem/head convs, time embedding, norms.
    assert not [n for n in names["unet"] if re.search(r"conv_in|conv_out|time_embedding|norm", n)]

    def shapes(name):
        return tuple(sd[f"{name}.lora_down.weight"].shape), tuple(sd[f"{name}.lora_up.weight"].shape)

    assert shapes("lora_te_text_model_encoder_layers_0_mlp_fc1") == ((4, 32), (48, 4))
    assert shapes("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") == (
        (4, 32),
        (32, 4),
    )
    assert shapes("lora_unet_down_blocks_0_attentions_0_proj_in") == ((4, 32, 1, 1), (32, 4, 1, 1))
    assert shapes("lora_unet_down_blocks_0_resnets_0_conv1") == ((2, 32, 3, 3), (32, 2, 1, 1))
    assert shapes("lora_unet_down_blocks_1_resnets_0_conv_shortcut") == ((4, 32, 1, 1), (64, 4, 1, 1))
    for name in all_names:
        alpha = sd[f"{name}.alpha"]
        assert alpha.ndim == 0 and alpha.dtype == torch.float32
        conv3x3 = sd[f"{name}.lora_down.weight"].shape[-1] == 3
        assert alpha.item() == (3.0 if conv3x3 else 2.0)

    half = network.state_dict_kohya(torch.float16)
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert half["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 3.0


def test_init_and_only_lora_parameters_train(pipe):
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=2, conv_rank=2))
    sd = network.state_dict_kohya()
    for name in network.module_names()["unet"] + network.module_names()["text_encoder"]:
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        assert not up.any()
        # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1 / math.sqrt(down[0].numel())
        assert down.abs().max() <= bound + 1e-7 and down.abs().max() > 0.5 * bound
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 1.0  # kohya's default conv_alpha

    lora = {id(p) for p in network.unet_parameters() + network.text_encoder_parameters()}
    for model in (pipe.unet, pipe.text_encoder):
        for p in model.parameters():
            assert p.requires_grad == (id(p) in lora)
    assert len(lora) == 2 * sum(len(v) for v in network.module_names().values())
    assert all(p.dtype == torch.float32 for p in network.unet_parameters())


def test_fp16_base_keeps_float32_lora(pipe):
    pipe.unet.half()
    network = LoraNetwork.apply(pipe.unet, None, NetworkSpec(rank=4, alpha=2, train_text_encoder=False))
    assert {p.dtype for p in network.unet_parameters()} == {torch.float32}
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.base_layer.weight.dtype == torch.float16
    assert layer(torch.randn(2, 32, dtype=torch.float16)).dtype == torch.float16


# --------------------------------------------------------------------------------------------
# 3. unet-only, text-encoder-only, dropout
# --------------------------------------------------------------------------------------------


def test_unet_only(pipe):
    network = LoraNetwork.apply(
        pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4, train_text_encoder=False)
    )
    assert network.text_encoder_parameters() == [] and network.module_names()["text_encoder"] == []
    assert len(network.unet_parameters()) == 2 * N_UNET_ATTN
    assert all(k.startswith("lora_unet_") for k in network.state_dict_kohya())
    assert not lora_layers(pipe.text_encoder, "text_encoder")
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


def test_text_encoder_only(pipe):
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4, train_unet=False))
    assert network.unet_parameters() == [] and network.module_names()["unet"] == []
    assert len(network.text_encoder_parameters()) == 2 * N_TE
    assert all(k.startswith("lora_te_") for k in network.state_dict_kohya())
    assert not lora_layers(pipe.unet, "unet")
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="at least one"):
        NetworkSpec(rank=4, alpha=4, train_unet=False, train_text_encoder=False)
    with pytest.raises(ValueError, match="probability"):
        NetworkSpec(rank=4, alpha=4, dropout=1.5)
    with pytest.raises(ValueError, match="rank"):
        NetworkSpec(rank=0, alpha=4)


def test_dropout_is_stochastic_in_train_mode_only(pipe):
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4, dropout=0.5))
    randomise_up(network)
    with torch.no_grad():
        pipe.unet.train()
        a, b = unet_eps(pipe), unet_eps(pipe)
        assert (a - b).abs().max() > 1e-3
        pipe.unet.eval()
        c, d = unet_eps(pipe), unet_eps(pipe)
        assert torch.equal(c, d)


def test_no_dropout_is_deterministic_in_train_mode(pipe):
    network = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4, dropout=0.0))
    randomise_up(network)
    pipe.unet.train()
    with torch.no_grad():
        assert torch.equal(unet_eps(pipe), unet_eps(pipe))


def test_apply_twice_is_refused(pipe):
    LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4))
    with pytest.raises(ValueError, match="already has LoRA"):
        LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4))


# --------------------------------------------------------------------------------------------
# 4. start from an existing LoRA
# --------------------------------------------------------------------------------------------


def test_load_state_dict_kohya_round_trip(pipe, fresh_pipe, tmp_path):
    spec = NetworkSpec(rank=4, alpha=2, conv_rank=2, conv_alpha=3)
    first = LoraNetwork.apply(pipe.unet, pipe.text_encoder, spec)
    randomise_up(first)
    saved = save_lora(tmp_path / "first", first.state_dict_kohya(), None, "safetensors")
    tensors, _ = load_lora_file(saved)

    second = LoraNetwork.apply(fresh_pipe.unet, fresh_pipe.text_encoder, spec)
    second.load_state_dict_kohya(tensors)
    a, b = first.state_dict_kohya(), second.state_dict_kohya()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(unet_eps(pipe), unet_eps(fresh_pipe))
    assert all(p.requires_grad for p in second.unet_parameters())


def test_loaded_alpha_and_half_precision_file(pipe, fresh_pipe):
    first = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=2))
    randomise_up(first)
    sd = first.state_dict_kohya(torch.float16)
    sd = {k: (torch.tensor(8.0, dtype=torch.float16) if k.endswith(".alpha") else v) for k, v in sd.items()}
    second = LoraNetwork.apply(fresh_pipe.unet, fresh_pipe.text_encoder, NetworkSpec(rank=4, alpha=2))
    second.load_state_dict_kohya(sd)
    # The file's alpha wins (kohya behaviour), so the network computes what the file computes.
    layer = fresh_pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert layer.scaling["default"] == pytest.approx(8 / 4)
    out = second.state_dict_kohya()
    assert out["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"].item() == 8.0
    assert all(p.dtype == torch.float32 for p in second.unet_parameters())


def test_rank_mismatch_is_one_clear_sentence(pipe, fresh_pipe):
    first = LoraNetwork.apply(pipe.unet, pipe.text_encoder, NetworkSpec(rank=4, alpha=4))
    other = LoraNetwork.apply(fresh_pipe.unet, fresh_pipe.text_encoder, NetworkSpec(rank=8, alpha=4))
    with pytest.raises(ValueError) as info:
        other.load_state_dict_kohya(first.state_dict_kohya())
    msg = str(info.value)
    assert "rank 4 in the file, 8 here" in msg and "network_dim" in msg
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0


def test_missing_and_unexpected_keys_are_named(pipe, fresh_pipe):
    unet_only = LoraNetwork.apply(pipe.unet, None, NetworkSpec(rank=4, alpha=4, train_text_encoder=False))
    full = LoraNetwork.apply(fresh_pipe.unet, fresh_pipe.text_encoder, NetworkSpec(rank=4, alpha=4))
    with pytest.raises(
        ValueError, match=r"24 keys of this network are missing .*lora_te_text_model_encoder_layers_0"
    ):
        full.load_state_dict_kohya(unet_only.state_dict_kohya())
    sd = full.state_dict_kohya()
    sd["lora_unet_conv_in.lora_down.weight"] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"1 keys in the file are not in this network \(lora_unet_conv_in"):
        full.load_state_dict_kohya(sd)


# --------------------------------------------------------------------------------------------
# 5. files: formats, metadata, no overwrite, hash
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_sd():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=g, dtype=torch.float32).half(),
        "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=g).half(),
        "lora_unet_x.alpha": torch.tensor(2.0, dtype=torch.float16),
    }


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "pt"])
def test_formats_round_trip(tmp_path, small_sd, fmt):
    meta = {"ss_network_dim": "4", "modelspec.title": "x"}
    path = save_lora(tmp_path / "out" / "mylora", small_sd, meta, fmt)
    assert path == tmp_path / "out" / f"mylora.{fmt}" and path.is_file()
    tensors, metadata = load_lora_file(path)
    assert tensors.keys() == small_sd.keys()
    assert all(torch.equal(tensors[k], small_sd[k]) and tensors[k].dtype == torch.float16 for k in small_sd)
    assert metadata == (meta if fmt == "safetensors" else {})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no temp file left behind"
    if fmt != "safetensors":
        assert torch.load(path, weights_only=True).keys() == small_sd.keys()  # a plain dict


def test_existing_file_is_not_overwritten(tmp_path, small_sd):
    path = save_lora(tmp_path / "a.safetensors", small_sd, {"ss_v": "1"}, "safetensors")
    before = path.read_bytes()
    changed = {k: v + 1 for k, v in small_sd.items()}
    with pytest.raises(FileExistsError, match="already exists"):
        save_lora(path, changed, {"ss_v": "2"}, "safetensors")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    save_lora(path, changed, {"ss_v": "2"}, "safetensors", overwrite=True)
    assert load_lora_file(path)[1] == {"ss_v": "2"}


def test_wrong_suffix_and_bad_metadata_are_refused(tmp_path, small_sd):
    with pytest.raises(ValueError, match=r"ends in \.ckpt but the format is safetensors"):
        save_lora(tmp_path / "a.ckpt", small_sd, None, "safetensors")
    with pytest.raises(ValueError, match="Unknown LoRA file format"):
        save_lora(tmp_path / "a", small_sd, None, "bin")
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora(tmp_path / "a", small_sd, {"ss_network_dim": 4}, "safetensors")
    assert list(tmp_path.iterdir()) == []


def test_addnet_hash_is_sha256_of_the_body_with_training_metadata_only(tmp_path, small_sd):
    ss = {"ss_network_dim": "4", "ss_seed": "1"}
    path = save_lora(tmp_path / "h", small_sd, ss, "safetensors")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + n :]).hexdigest()
    assert addnet_hash(small_sd, ss) == expected
    # User metadata (modelspec.*, the hash itself) does not change it; the tensors do.
    assert (
        addnet_hash(small_sd, {**ss, "modelspec.title": "renamed", "sshs_model_hash": expected}) == expected
    )
    assert addnet_hash({k: v * 2 for k, v in small_sd.items()}, ss) != expected


# --------------------------------------------------------------------------------------------
# 6. the real SD 1.5 / CLIP-L shapes (meta device: no memory, no download)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd15_module_counts_and_names():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def build():
        with torch.device("meta"):
            unet = UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280),
                cross_attention_dim=768,
                attention_head_dim=8,
                layers_per_block=2,
            )
            te = CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=768,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    intermediate_size=3072,
                    vocab_size=49408,
                )
            )
        return unet, te

    unet, te = build()
    names = LoraNetwork.apply(unet, te, NetworkSpec(rank=4, alpha=1)).module_names()
    assert len(names["unet"]) == 192 and len(names["text_encoder"]) == 72
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names["unet"]
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names["unet"]
    assert "lora_unet_mid_block_attentions_0_proj_in" in names["unet"]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names["text_encoder"]
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names["text_encoder"]

    # LoCon adds 22 resnets x (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 down- and
    # 3 up-samplers = 86 modules: sd-scripts reports "create LoRA for U-Net: 278 modules".
    unet, te = build()
    network = LoraNetwork.apply(unet, te, NetworkSpec(rank=8, alpha=4, conv_rank=4, conv_alpha=1))
    assert len(network.module_names()["unet"]) == 278
    unet.to_empty(device="cpu")
    te.to_empty(device="cpu")
    sd = network.state_dict_kohya(torch.float16)
    assert len(sd) == 3 * (278 + 72)
    assert sd[
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    ].shape == (8, 768)
    assert sd["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_up.weight"].shape == (
        320,
        8,
    )
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (8, 320, 1, 1)
    assert sd["lora_unet_mid_block_resnets_1_conv2.lora_down.weight"].shape == (4, 1280, 3, 3)
    assert sd["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"].shape == (3072, 8)
