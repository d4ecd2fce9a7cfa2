"""The offline demo (tiny model + drawn dataset) and base-model loading."""

from __future__ import annotations

import hashlib
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_gui.engine.demo import DEMO_PROMPTS, DemoPaths, build_demo  # noqa: E402
from lora_gui.engine.model_detect import (  # noqa: E402
    SHIPPED_CONFIGS,
    _expected_ldm_shapes,
    inspect_checkpoint,
    select_config,
)
from lora_gui.engine.model_files import ModelLoadError  # noqa: E402
from lora_gui.engine.model_load import load_base_model  # noqa: E402

torch.set_num_threads(1)


# Shared fixture: the lead may move it to tests/conftest.py unchanged.
@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoPaths:
    return build_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def from_folder(demo):
    return load_base_model(demo.model_dir)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _image(tokenizer, text_encoder, unet, vae, scheduler_dir: Path) -> np.ndarray:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(scheduler_dir, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe(DEMO_PROMPTS[0], num_inference_steps=2, output_type="np", generator=gen).images


# --------------------------------------------------------------------------------------------
# Part 1: the demo
# --------------------------------------------------------------------------------------------


def test_two_builds_with_the_same_seed_are_bit_identical(demo, tmp_path):
    again = build_demo(tmp_path / "again", seed=0)
    first, second = _hashes(demo.root), _hashes(again.root)
    assert first == second
    assert len(first) > 40
    other = _hashes(build_demo(tmp_path / "other", seed=1).root)
    assert other["model.safetensors"] != first["model.safetensors"]
    assert other["dataset/5_shapes/shapes_00.png"] != first["dataset/5_shapes/shapes_00.png"]


def test_demo_layout(demo):
    from PIL import Image

    assert demo.single_file == demo.root / "model.safetensors" and demo.single_file.is_file()
    assert (demo.model_dir / "model_index.json").is_file()
    shapes, circles = demo.dataset_dir / "5_shapes", demo.dataset_dir / "3_circles"
    assert len(list(shapes.glob("*.png"))) == 12 and len(list(shapes.glob("*.txt"))) == 12
    assert len(list(circles.glob("*.png"))) == 6 and len(list(circles.glob("*.txt"))) == 5
    assert len(list((demo.reg_dir / "1_shape").glob("*.png"))) == 4
    caption = (shapes / "shapes_00.txt").read_text().strip()
    assert len(caption.split(", ")) == 3 and caption.split(", ")[1].endswith(" background")
    sizes = [Image.open(p).size for p in demo.dataset_dir.rglob("*.png")]
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert all(48 <= s <= 160 for size in sizes for s in size)
    assert len(DEMO_PROMPTS) >= 2


def test_rebuild_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo folder"):
        build_demo(tmp_path)


def test_folder_loads_offline_and_makes_an_image(demo):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo.model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("red circle", height=64, width=64, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert sum(p.numel() for p in pipe.unet.parameters()) < 3_000_000


def test_tokenizer_round_trip(demo):
    from transformers import CLIPTokenizer

    from lora_gui.engine.tokenizer import clip_tokenizer

    tok = CLIPTokenizer.from_pretrained(demo.model_dir / "tokenizer", local_files_only=True)
    ids = tok("a red circle").input_ids
    # 2000 merges: "a</w>", "red</w>", "cir", "c", "le</w>" between BOS and EOS.
    assert len(tok) == 2514 and len(ids) == 7
    assert ids[0] == tok.bos_token_id == 2512 and ids[-1] == tok.eos_token_id == 2513
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[7:] == [tok.eos_token_id] * 70
    full = clip_tokenizer()
    assert len(full) == 49408
    assert full("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SD 2's padding


# --------------------------------------------------------------------------------------------
# Part 2: loading
# --------------------------------------------------------------------------------------------


def test_folder_load(from_folder):
    m = from_folder
    assert (m.version, m.is_v2, m.prediction_type, m.notes) == ("sd_v1", False, "epsilon", [])
    assert type(m.noise_scheduler).__name__ == "DDPMScheduler"
    cfg = m.noise_scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.num_train_timesteps) == (
        0.00085,
        0.012,
        "scaled_linear",
        1000,
    )


def test_single_file_equals_folder(demo, from_folder):
    single = load_base_model(demo.single_file)
    assert single.config_dir == demo.model_dir  # the same-stem sibling folder supplies the configs
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(single, part), getattr(from_folder, part)), part
    assert single.tokenizer("red circle").input_ids == from_folder.tokenizer("red circle").input_ids
    a = _image(
        from_folder.tokenizer, from_folder.text_encoder, from_folder.unet, from_folder.vae, demo.model_dir
    )
    b = _image(single.tokenizer, single.text_encoder, single.unet, single.vae, demo.model_dir)
    assert np.array_equal(a, b)


def test_single_file_has_ldm_layout(demo):
    sd = load_file(demo.single_file)
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # upsampler after a plain block
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in sd)


class _Callback:  # stands for pytorch_lightning objects stored in real .ckpt files
    def __init__(self):
        self.best = 1.0


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_ckpt_loads_the_same_without_running_code(demo, from_folder, tmp_path):
    sd = load_file(demo.single_file)
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "callbacks": [_Callback(), _Payload(marker)]}, ckpt)
    with pytest.raises(Exception):  # noqa: B017 - torch's safe loader refuses it: the fallback is exercised
        torch.load(ckpt, weights_only=True)
    loaded = load_base_model(ckpt, config_dir=demo.model_dir)
    assert not marker.exists()
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, part), getattr(from_folder, part)), part
    plain = tmp_path / "plain.ckpt"
    torch.save(sd, plain)  # no state_dict level, weights_only works
    assert _same_weights(load_base_model(plain, config_dir=demo.model_dir).unet, from_folder.unet)


def test_flags_that_disagree_are_reported(demo):
    m = load_base_model(demo.model_dir, v2=True, v_parameterization=True)
    assert (m.version, m.is_v2, m.prediction_type) == ("sd_v1", False, "v_prediction")
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    assert any("SD 1.x although v2 was set" in n for n in m.notes)
    assert any("uses epsilon but v_parameterization is on" in n for n in m.notes)


def test_vae_path_replaces_the_vae(demo, from_folder, tmp_path):
    from lora_gui.engine.ldm_keys import vae_to_ldm

    for source in (demo.model_dir, demo.single_file):
        m = load_base_model(demo.model_dir, vae_path=source)
        assert _same_weights(m.vae, from_folder.vae)
        assert any("Using the VAE" in n for n in m.notes)
    bare = tmp_path / "vae.safetensors"  # a standalone VAE file: LDM names, no prefix
    save_file({k: v.contiguous() for k, v in vae_to_ldm(from_folder.vae.state_dict()).items()}, str(bare))
    assert _same_weights(load_base_model(demo.model_dir, vae_path=bare).vae, from_folder.vae)


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, str(path))
    return path


def test_errors_name_the_path(demo, tmp_path):
    lora = _write(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0_x.lora_down.weight": (4, 8)})
    sdxl = _write(
        tmp_path / "xl.safetensors",
        {
            "conditioner.embedders.1.model.positional_embedding": (77, 8),
            "model.diffusion_model.out.2.bias": (4,),
        },
    )
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    truncated = tmp_path / "broken.ckpt"
    truncated.write_bytes(b"PK\x03\x04 truncated")
    other = _write(tmp_path / "other.safetensors", {"weight": (2, 2)})
    renamed = tmp_path / "renamed.ckpt"  # safetensors content under a .ckpt name is still read
    renamed.write_bytes(lora.read_bytes())
    text = tmp_path / "model.txt"
    text.write_text("hello")
    not_model = tmp_path / "folder"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("hi")
    cases = {
        tmp_path / "missing.safetensors": "does not exist",
        lora: "is a LoRA file",
        renamed: "is a LoRA file",
        text: "neither a .safetensors nor a .ckpt",
        sdxl: "is an SDXL model but model.family is sd: set model.family to auto or sdxl",
        corrupt: "damaged or incomplete",
        truncated: "damaged or incomplete",
        other: "does not look like a Stable Diffusion",
        not_model: "not a diffusers model folder",
    }
    for path, text in cases.items():
        with pytest.raises(ModelLoadError) as err:
            load_base_model(path)
        assert str(path) in str(err.value) and text in str(err.value), str(err.value)
        assert isinstance(err.value, ValueError)
    with pytest.raises(ModelLoadError, match="does not match the weights"):
        load_base_model(demo.single_file, config_dir=SHIPPED_CONFIGS["sd1"])
    with pytest.raises(ModelLoadError, match="VAE .* does not exist"):
        load_base_model(demo.model_dir, vae_path=tmp_path / "nope.safetensors")


def test_inspect_checkpoint(demo):
    sd2 = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    }
    assert inspect_checkpoint(sd2) == "sd2"
    assert inspect_checkpoint({"model.diffusion_model.x.attn2.to_k.weight": torch.zeros(8, 1024)}) == "sd2"
    assert inspect_checkpoint({"model.diffusion_model.x.attn2.to_k.weight": (320, 768)}) == "sd1"
    assert inspect_checkpoint({"model.diffusion_model.x.attn2.to_k.weight": (640, 2048)}) == "sdxl"
    assert inspect_checkpoint({"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ()}) == "lora"
    assert inspect_checkpoint({"weight": (3,)}) == "unknown"
    assert inspect_checkpoint(demo.single_file) == "sd1"
    assert inspect_checkpoint(demo.model_dir) == "sd1"


def test_shipped_configs_are_chosen_by_shape(tmp_path):
    """Full-size SD 1.5 / SD 2.x key shapes (built on the meta device) pick the shipped configs."""
    sd15 = dict(_expected_ldm_shapes(str(SHIPPED_CONFIGS["sd1"])))
    assert sum(k.startswith("model.diffusion_model.") for k in sd15) == 686  # as in real SD 1.5 files
    assert sum(k.startswith("first_stage_model.") for k in sd15) == 248
    prefix = "cond_stage_model.transformer.text_model."
    sd15[prefix + "embeddings.token_embedding.weight"] = (49408, 768)
    sd15.update({f"{prefix}encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)})
    file = tmp_path / "sd15.safetensors"
    assert inspect_checkpoint(sd15) == "sd1"
    assert select_config(file, sd15, "sd1") == SHIPPED_CONFIGS["sd1"]

    sd2 = dict(_expected_ldm_shapes(str(SHIPPED_CONFIGS["sd2"])))
    sd2["cond_stage_model.model.token_embedding.weight"] = (49408, 1024)
    sd2.update({f"cond_stage_model.model.transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(24)})
    assert inspect_checkpoint(sd2) == "sd2"
    assert select_config(file, sd2, "sd2") == SHIPPED_CONFIGS["sd2"]
    with pytest.raises(ModelLoadError, match="not the shapes of a known model"):
        select_config(file, sd2, "sd1")  # SD 2 shapes do not fit the SD 1.5 config


# --------------------------------------------------------------------------------------------
# A tiny SD 2.x-shaped model (1024-wide cross-attention), as a folder and as an OpenCLIP-layout file
# --------------------------------------------------------------------------------------------


def _openclip_layout(text_encoder) -> dict[str, torch.Tensor]:
    """transformers CLIP keys -> SD 2's ``cond_stage_model.model.*`` (OpenCLIP) keys, for the test file."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{t}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{t}"] for q in "qkv"])
            out[f"{dst}attn.out_proj.{t}"] = sd[f"{src}self_attn.out_proj.{t}"]
            out[f"{dst}ln_1.{t}"] = sd[f"{src}layer_norm1.{t}"]
            out[f"{dst}ln_2.{t}"] = sd[f"{src}layer_norm2.{t}"]
            out[f"{dst}mlp.c_fc.{t}"] = sd[f"{src}mlp.fc1.{t}"]
            out[f"{dst}mlp.c_proj.{t}"] = sd[f"{src}mlp.fc2.{t}"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_gui.engine.demo import _tiny_components
    from lora_gui.engine.ldm_keys import unet_to_ldm, vae_to_ldm
    from lora_gui.engine.tokenizer import clip_tokenizer

    tokenizer, _, _, vae, _ = _tiny_components(0)
    tokenizer = clip_tokenizer(100, pad_token="!")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=1024,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=16,
            hidden_act="gelu",
        )
    )
    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    root = tmp_path_factory.mktemp("sd2")
    folder = root / "tiny2"
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    state = {"model.diffusion_model." + k: v.contiguous() for k, v in unet_to_ldm(unet.state_dict()).items()}
    state.update({"first_stage_model." + k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict()).items()})
    state.update(_openclip_layout(te))
    single = root / "tiny2.safetensors"
    save_file(state, str(single))
    return folder, single


def test_sd2_folder_and_single_file(tiny_sd2):
    folder, single = tiny_sd2
    assert inspect_checkpoint(folder) == "sd2" and inspect_checkpoint(single) == "sd2"
    a = load_base_model(folder)
    assert (a.version, a.is_v2, a.prediction_type) == ("sd_v2", True, "epsilon")
    assert any("SD 2.x although v2 was not set" in n for n in a.notes)
    assert any("uses v_prediction but v_parameterization is off" in n for n in a.notes)
    assert a.tokenizer.pad_token == "!"
    b = load_base_model(single, v2=True, v_parameterization=True)
    assert (b.version, b.is_v2, b.prediction_type, b.config_dir) == ("sd_v2_v", True, "v_prediction", folder)
    assert not any("v2" in n or "v_parameterization" in n for n in b.notes)
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(a, part), getattr(b, part)), part
