"""The LyCORIS network types (issue 16): LoCon, LoHa, LoKr, IA3, GLoRA, Full, Diag-OFT, BOFT and
DoRA, trained on the tiny demo model through lycoris-lora, saved in the LyCORIS key format, loaded
back by an independent loader, resumed bit-identically, and imported from kohya_ss presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui import events as ev
from lora_gui.engine import reporting
from lora_gui.engine.network_lycoris import file_network_type
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io
from lora_gui.settings.errors import SettingsError
from lora_gui.settings.foreign import convert

PRESETS = Path(__file__).parent / "fixtures" / "kohya_ss_presets"

# The tensor names of each algorithm (lycoris/modules/*.py, what A1111/Forge/ComfyUI read).
SUFFIXES = {
    "LoCon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "LoKr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    "IA3": {"weight", "on_input"},
    "GLoRA": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "Full": {"diff", "diff_b"},
    "Diag-OFT": {"oft_blocks", "alpha"},
    "BOFT": {"oft_blocks", "alpha"},
}
ALGO = {"LoCon": "locon", "LoHa": "loha", "LoKr": "lokr", "IA3": "ia3", "GLoRA": "glora",
        "Full": "full", "Diag-OFT": "diag-oft", "BOFT": "boft"}


def _cases(fast: tuple[str, bool]) -> list:
    """Every type (and DoRA on LoRA and LoCon); all but ``fast`` are marked slow."""
    def case(network_type: str, dora: bool = False):
        marks = () if (network_type, dora) == fast else (pytest.mark.slow,)
        return pytest.param(network_type, dora, marks=marks, id=network_type + ("+DoRA" if dora else ""))

    return [case(t) for t in SUFFIXES] + [case("LoRA", True), case("LoCon", True)]


def demo_settings(demo, out: Path, network_type: str, dora: bool, *extra: str):
    s = io.load_preset("demo-tiny-cpu")
    return io.apply_overrides(s, [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0",
        f"advanced.network_type={network_type}", f"advanced.dora_wd={dora}", "advanced.conv_dim=2",
        "training.network_dim=4", "training.network_alpha=2", "training.learning_rate=0.01", *extra])


def _pipeline(demo):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo.model_dir, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    return pipe("demoshape, red circle, blue background", num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def _sd_modules(pipe) -> dict:
    """kohya module name -> module of an SD pipeline (diffusers' U-Net paths, CLIP's text_model paths)."""
    models = {"lora_unet": pipe.unet, "lora_te_text_model": pipe.text_encoder}
    return {f"{prefix}_{path}".replace(".", "_"): module
            for prefix, model in models.items() for path, module in model.named_modules()}


def _load_with_lycoris(modules: dict, path: Path) -> None:
    """lycoris-lora's own loader (create_network_from_weights, module by module): it tells each
    module's algorithm from the file's key names, builds it from the tensors and hooks it into the
    fresh model. Not through its network class, which first builds a default network that
    lycoris 4.1.3 cannot build on a diffusers U-Net ("duplicated lora name:
    lora_unet_time_embedding_linear_1"); and not merged, because 4.1.3's LoHa merge applies
    alpha / dim twice (test_loha_file_is_the_hadamard_formula checks the file against the formula)."""
    from lycoris.modules import get_module, make_module

    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}
    loaded = []
    for name, module in modules.items():
        if name in names:
            kind, params = get_module(sd, name)
            loaded.append(make_module(kind, params, name, module).eval())
    for module in loaded:
        module.apply_to()
    assert len(loaded) == len(names)


def _merge_by_formula(modules: dict, path: Path) -> None:
    """Where lycoris-lora 4.1.3's own loader fails (LoKr: it re-derives the Kronecker split from the
    shapes and gets some layers wrong; IA3: make_module_from_state_dict is called with one argument
    too many), the file is merged by the formulas A1111's built-in Lora extension applies
    (network_lokr.py, network_ia3.py): LoKr W += kron(w1, w2) * alpha / dim (dim = rank of a
    decomposed factor, else scale 1); IA3 W += W * w along the output (or input) channels."""
    sd = load_file(str(path))
    names = {k.split(".")[0] for k in sd}
    merged = 0
    with torch.no_grad():
        for name, module in modules.items():
            if name not in names:
                continue
            t = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == name}
            weight = module.weight
            if "on_input" in t:
                w = t["weight"].flatten()
                view = ([1, -1] if int(t["on_input"]) else [-1, 1]) + [1] * (weight.dim() - 2)
                delta = weight * w.view(view)
            else:
                w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
                w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
                dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else (
                    t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None)
                if w2.dim() == 4:
                    w1 = w1[:, :, None, None]
                delta = torch.kron(w1, w2).reshape(weight.shape)
                delta = delta * (float(t["alpha"]) / dim if dim else 1.0)
            weight += delta
            merged += 1
    assert merged == len(names)


def _expected_suffixes(network_type: str, dora: bool) -> set[str]:
    suffixes = set(SUFFIXES["LoCon" if network_type == "LoRA" else network_type])
    return suffixes | {"dora_scale"} if dora else suffixes


@pytest.mark.parametrize("network_type,dora", _cases(fast=("LoHa", False)))
def test_trains_saves_lycoris_keys_and_reloads_with_identical_images(demo, tmp_path, network_type, dora):
    s = demo_settings(demo, tmp_path, network_type, dora, "images.max_steps=2")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    path = result.output_path
    tensors = load_file(str(path))
    # key names: lora_unet_<path> / lora_te_text_model_<path>, then the algorithm's tensor names
    assert {k.split(".", 1)[1] for k in tensors} == _expected_suffixes(network_type, dora)
    assert all(re.fullmatch(r"lora_(unet|te_text_model)_[a-z0-9_]+\.[a-z0-9_.]+", k) for k in tensors)
    q_proj = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {k.split(".")[0] for k in tensors} >= {q_proj, to_q}
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in tensors)  # conv_dim=2
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ALGO.get(network_type, "locon") and args["preset"] == "full"
    assert args.get("dora_wd", "False") == str(dora)
    assert file_network_type(tensors) == {"LoCon": "LoRA", "Diag-OFT": "OFT", "BOFT": "OFT"}.get(
        network_type, network_type) + (" with DoRA" if dora else "")

    trainer.unet.eval()
    trainer.model.text_encoder.eval()
    trained_pipe = _pipeline(demo)
    trained_pipe.unet, trained_pipe.text_encoder = trainer.unet, trainer.model.text_encoder
    trained = _image(trained_pipe)
    base = _image(_pipeline(demo))
    loaded_pipe = _pipeline(demo)
    if network_type in ("LoKr", "IA3"):
        _merge_by_formula(_sd_modules(loaded_pipe), path)
    else:
        _load_with_lycoris(_sd_modules(loaded_pipe), path)
    loaded = _image(loaded_pipe)
    assert np.abs(loaded - trained).max() < 1e-4
    assert np.abs(trained - base).max() > 1e-4  # the network changed the images


@pytest.mark.slow
def test_lycoris_locon_file_loads_in_diffusers(demo, tmp_path):
    """LyCORIS LoCon (no DoRA) is lora_down/lora_up: diffusers' kohya converter loads it."""
    s = demo_settings(demo, tmp_path, "LoCon", False, "images.max_steps=2")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    trainer.unet.eval()
    trainer.model.text_encoder.eval()
    trained_pipe = _pipeline(demo)
    trained_pipe.unet, trained_pipe.text_encoder = trainer.unet, trainer.model.text_encoder
    loaded_pipe = _pipeline(demo)
    loaded_pipe.load_lora_weights(str(result.output_path))
    assert np.abs(_image(loaded_pipe) - _image(trained_pipe)).max() < 1e-4


def _stop_at(step: int, commands: ev.CommandQueue):
    def sink(event):
        if isinstance(event, ev.LossReported) and event.step == step:
            commands.put(ev.Stop())

    return sink


@pytest.mark.parametrize("network_type,dora", _cases(fast=("LoRA", True)))
def test_stop_and_resume_is_bit_identical(demo, tmp_path, monkeypatch, network_type, dora):
    monkeypatch.setattr(reporting, "REPORT_INTERVAL_S", 0.0)
    common = ["images.max_steps=4", "model.save_state=true"]
    full = run_training(demo_settings(demo, tmp_path / "full", network_type, dora, *common), lambda e: None)
    assert full.status == "finished", full.message
    out = tmp_path / "resumed"
    commands = ev.CommandQueue()
    first = run_training(demo_settings(demo, out, network_type, dora, *common), _stop_at(2, commands),
                         commands)
    assert first.status == "stopped" and first.step == 2
    second = run_training(demo_settings(demo, out, network_type, dora, *common,
                                        f"model.load_previous_save_state={first.state_dir}"), lambda e: None)
    assert second.status == "finished", second.message
    a, b = load_file(str(full.output_path)), load_file(str(second.output_path))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(str(first.output_path))[k]) for k in a)


def test_start_from_a_file_of_the_same_type_and_a_sentence_for_another(demo, tmp_path):
    first = run_training(demo_settings(demo, tmp_path / "a", "LoHa", False, "images.max_steps=1",
                                       "model.save_state=true"), lambda e: None)
    assert first.status == "finished", first.message
    resumed = run_training(demo_settings(demo, tmp_path / "a", "LoKr", False, "images.max_steps=2",
                                         f"model.load_previous_save_state={first.state_dir}"), lambda e: None)
    assert resumed.status == "failed" and resumed.message.startswith("model.load_previous_save_state: ")
    assert "holds a LoHa network but these settings train a LoKr network" in resumed.message
    start = f"model.lora_model_for_resume={first.output_path}"
    trainer = Trainer(demo_settings(demo, tmp_path / "b", "LoHa", False, "images.max_steps=1", start),
                      lambda e: None, ev.CommandQueue())
    trainer._setup()
    loaded, original = trainer.network.state_dict_kohya(), load_file(str(first.output_path))
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)
    for network_type, dora, wanted in (("LoKr", False, "LoKr"), ("LoRA", False, "LoRA"),
                                       ("LoHa", True, "LoHa with DoRA")):
        result = run_training(demo_settings(demo, tmp_path / f"c{network_type}{dora}", network_type, dora,
                                            "images.max_steps=1", start), lambda e: None)
        assert result.status == "failed"
        assert result.message.startswith("model.lora_model_for_resume: ")
        assert f"holds a LoHa network but these settings train a {wanted} network" in result.message


def test_file_network_type_reads_the_key_format():
    t = torch.zeros(1)
    assert file_network_type({"lora_unet_x.lora_down.weight": t, "lora_unet_x.alpha": t}) == "LoRA"
    assert file_network_type({"lora_unet_x.lora_down.weight": t, "lora_unet_x.dora_scale": t}) == \
        "LoRA with DoRA"
    assert file_network_type({"lora_te_x.hada_w1_a": t}) == "LoHa"
    assert file_network_type({"lora_te_x.lokr_w1_a": t, "lora_te_x.dora_scale": t}) == "LoKr with DoRA"
    assert file_network_type({"lora_unet_x.weight": t, "lora_unet_x.on_input": t}) == "IA3"
    assert file_network_type({"lora_unet_x.diff": t}) == "Full"
    assert file_network_type({"lora_unet_x.oft_blocks": t}) == "OFT"
    assert file_network_type({"something": t}) == "unknown"


def test_dora_needs_a_decomposable_type():
    with pytest.raises(SettingsError) as info:
        io.apply_overrides(io.load_preset("demo-tiny-cpu"), ["advanced.network_type=IA3",
                                                             "advanced.dora_wd=true"])
    assert "advanced.dora_wd" in str(info.value) and "IA3" in str(info.value)


# kohya_ss presets/lora/*.json (bmaltais/kohya_ss): type and LyCORIS arguments as imported.
# (network_dim, network_alpha, conv_dim, conv_alpha, use_tucker, factor, network_dropout)
PRESET_EXPECTED = {
    "loha-sd15.json": ("LoHa", 32, 16, 8, 4, True, -1, 0.0),
    "lokr-sd15.json": ("LoKr", 64, 64, 64, 64, False, -1, 0.0),
    "ia3-sd15.json": ("IA3", 64, 64, 64, 64, False, -1, 0.0),
    # no conv_dim in the file: lycoris.kohya uses network_dim / network_alpha for the convs
    "iA3-Prodigy-sd15.json": ("IA3", 1024, 1024, 1024, 1024, False, -1, 0.3),
    "sd15-EDG_LoConOptiSettings.json": ("LoCon", 64, 64, 32, 1, False, -1, 0.0),
    "sd15-EDG_LoHaOptiSettings.json": ("LoHa", 32, 32, 32, 1, False, -1, 0.0),
    # dim 100000 (the full-matrix trick) becomes our maximum, which is full-matrix LoKr too
    "sd15-LoKr_v20.json": ("LoKr", 1024, 1, 1024, 1, False, 6, 0.0),
    "SDXL-LoHA_AI_Characters_v10.json": ("LoHa", 32, 32, 16, 16, False, -1, 0.0),
    "SDXL-LoKR_v10.json": ("LoKr", 64, 64, 64, 64, True, -1, 0.0),
}


@pytest.mark.parametrize("name", sorted(PRESET_EXPECTED))
def test_kohya_ss_lycoris_presets_import_with_type_and_arguments(name):
    s, report = convert(json.loads((PRESETS / name).read_text()))
    adv, tr = s.advanced, s.training
    got = (adv.network_type, tr.network_dim, tr.network_alpha, adv.conv_dim, adv.conv_alpha,
           adv.use_tucker, adv.factor, adv.network_dropout)
    assert got == PRESET_EXPECTED[name]
    assert report.mapped["LoRA_type"] == "advanced.network_type"
    assert adv.lycoris_preset == "full" and not adv.dora_wd
    for key in ("factor", "decompose_both", "use_scalar", "rescaled", "train_norm", "LyCORIS_preset"):
        assert key not in report.ignored


def test_kohya_lora_types_keep_their_meaning():
    assert convert({"LoRA_type": "Standard", "conv_dim": 8})[0].advanced.conv_dim == 0
    s, _ = convert({"LoRA_type": "Kohya LoCon", "conv_dim": 8})
    assert (s.advanced.network_type, s.advanced.conv_dim) == ("LoRA", 8)
    s, report = convert({"LoRA_type": "LyCORIS/Diag-OFT", "constrain": 0.5, "rescaled": True,
                         "train_on_input": True})
    assert (s.advanced.network_type, s.advanced.constrain, s.advanced.rescaled) == ("Diag-OFT", 0.5, True)
    assert "train_on_input" in report.ignored
    s, report = convert({"LoRA_type": "LyCORIS/DyLoRA"})
    assert s.advanced.network_type == "LoRA" and any("DyLoRA" in n for n in report.notes)


def test_loha_file_is_the_hadamard_formula(demo):
    """The saved LoHa tensors give the trained forward by the formula A1111/ComfyUI apply:
    W' = W + (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank (Hyeon-Woo et al. 2022, FedPara)."""
    from transformers import CLIPTextModel

    from lora_gui.engine.network_lycoris import LycorisNetwork, LycorisSpec

    te = CLIPTextModel.from_pretrained(demo.model_dir / "text_encoder")
    spec = LycorisSpec(network_type="LoHa", rank=4, alpha=2.0, conv_rank=0, conv_alpha=1.0,
                       preset="full", train_unet=False)
    network = LycorisNetwork.apply(None, te, spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.text_encoder_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sd = network.state_dict_kohya()
    name = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    layer = te.get_submodule("encoder.layers.1.mlp.fc1")
    x = torch.randn(5, layer.in_features, generator=gen)
    delta = (sd[f"{name}.hada_w1_a"] @ sd[f"{name}.hada_w1_b"]) * (sd[f"{name}.hada_w2_a"] @ sd[f"{name}.hada_w2_b"])
    expected = x @ (layer.weight + delta * float(sd[f"{name}.alpha"]) / 4).T + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert float(sd[f"{name}.alpha"]) == 2.0 and sd[f"{name}.hada_w1_b"].shape == (4, layer.in_features)


# --- SDXL -------------------------------------------------------------------------------------------
# LyCORIS on SDXL is named as lycoris-lora names it under sd-scripts' SDXL U-Net (the original module
# paths, sdxl_original_unet.py) with both text encoders: lora_unet_input_blocks_..., lora_te1_/lora_te2_.
# On the tiny SDXL demo the "full" preset with conv_dim > 0 finds the 192 transformer modules, 17 resnets
# x 3 (in_layers_2, emb_layers_1, out_layers_3), 10 skip convs, 2 downsamplers (op) and 2 upsamplers (conv):
# 257 U-Net modules (the count of kohya's LoCon); 3 layers x 6 in each text encoder. The preset's
# diffusers-only names (conv_in, conv_out, time_embedding.*) name no module of that U-Net: none here.
XL_UNET_MODULES, XL_TE_MODULES = 192 + 65, 18


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from lora_gui.engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo-sdxl"), seed=0, family="sdxl")


def _xl_pipeline(xl, trainer=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl.model_dir, local_files_only=True, add_watermarker=False)
    if trainer is not None:
        pipe.unet = trainer.acc.unwrap_model(trainer.unet)
        pipe.text_encoder, pipe.text_encoder_2 = trainer.model.text_encoder, trainer.model.text_encoder_2
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        model.train(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_modules(xl, pipe) -> dict:
    """kohya module name -> module of an SDXL pipeline, found the way A1111 and ComfyUI find a file's
    U-Net keys: ``lora_unet_<p>`` is the single file's ``model.diffusion_model.<p>`` (the original
    U-Net's paths); the diffusers module is the one holding that very weight (the demo's random
    weights are unique). The text encoders by their CLIP paths (lora_te1_ CLIP-L, lora_te2_ bigG)."""
    by_bytes: dict[bytes, list[str]] = {}
    for name, param in pipe.unet.named_parameters():
        if name.endswith(".weight"):
            by_bytes.setdefault(param.detach().numpy().tobytes(), []).append(name.removesuffix(".weight"))
    unet_modules, modules = dict(pipe.unet.named_modules()), {}
    with safe_open(str(xl.single_file), "pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
                found = by_bytes.get(f.get_tensor(key).numpy().tobytes(), [])
                if len(found) == 1:  # norms (all ones) are ambiguous; no network targets them here
                    path = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
                    modules[f"lora_unet_{path}".replace(".", "_")] = unet_modules[found[0]]
    for prefix, te in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        for path, module in te.named_modules():
            path = path if path.startswith("text_model.") else f"text_model.{path}"
            modules[f"{prefix}_{path}".replace(".", "_")] = module
    return modules


@pytest.mark.parametrize("network_type", ["LoHa", pytest.param("LoKr", marks=pytest.mark.slow)])
def test_sdxl_lycoris_file_has_sdxl_keys_reloads_and_reproduces_the_trained_model(xl, tmp_path, network_type):
    s = io.apply_overrides(io.load_preset("demo-tiny-sdxl-cpu"), [
        f"model.base_model={xl.model_dir}", f"model.img_folder={xl.dataset_dir}", f"model.output_folder={tmp_path}",
        "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0", "training.validation_split=0",
        "training.validation_every_n_steps=0", "images.max_steps=2", f"advanced.network_type={network_type}",
        "advanced.conv_dim=2", "advanced.conv_alpha=1", "training.network_dim=4", "training.network_alpha=2",
        "training.learning_rate=0.01", "training.unet_only=false"])
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    tensors = load_file(str(result.output_path))
    names = {k.split(".")[0] for k in tensors}
    assert {k.split(".", 1)[1] for k in tensors} == SUFFIXES[network_type]
    assert len([n for n in names if n.startswith("lora_unet_")]) == XL_UNET_MODULES
    assert len([n for n in names if n.startswith("lora_te1_text_model_encoder_layers_")]) == XL_TE_MODULES
    assert len([n for n in names if n.startswith("lora_te2_text_model_encoder_layers_")]) == XL_TE_MODULES
    assert len(names) == XL_UNET_MODULES + 2 * XL_TE_MODULES
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
            "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
            "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
            "lora_unet_output_blocks_0_0_skip_connection"} <= names
    with safe_open(str(result.output_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(meta["ss_network_args"])["algo"] == ALGO[network_type]

    trained = _image(_xl_pipeline(xl, trainer))
    base = _image(_xl_pipeline(xl))
    loaded_pipe = _xl_pipeline(xl)
    modules = _sdxl_modules(xl, loaded_pipe)
    assert names <= modules.keys()  # every key names a module of the single file's layout
    if network_type == "LoKr":
        _merge_by_formula(modules, result.output_path)
    else:
        _load_with_lycoris(modules, result.output_path)
    loaded = _image(loaded_pipe)
    assert np.abs(loaded - trained).max() < 1e-4
    assert np.abs(trained - base).max() > 1e-4  # the network changed the images

    # the engine reads its own file back (start from a LoRA): the same tensors in the same modules
    again = Trainer(io.apply_overrides(s, [f"model.lora_model_for_resume={result.output_path}",
                                           f"model.output_folder={tmp_path / 'again'}"]),
                    lambda e: None, ev.CommandQueue())
    again._setup()
    try:
        reread = again.network.state_dict_kohya()
        assert reread.keys() == tensors.keys() and all(torch.equal(reread[k], tensors[k]) for k in tensors)
    finally:
        again.close()


def test_the_attn_only_preset_trains_the_u_nets_attention_layers(demo):
    """lycoris-lora's attn-only preset names sd-scripts' CrossAttention class; on diffusers' U-Net the
    same layers are Attention's to_q/to_k/to_v/to_out.0 (4 per attention), named as sd-scripts names them."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from transformers import CLIPTextModel

    from lora_gui.engine.network_lycoris import LycorisNetwork, LycorisSpec

    unet = UNet2DConditionModel.from_pretrained(demo.model_dir / "unet")
    te = CLIPTextModel.from_pretrained(demo.model_dir / "text_encoder")
    spec = LycorisSpec(network_type="LoHa", rank=4, alpha=2.0, conv_rank=0, conv_alpha=1.0,
                       preset="attn-only", train_unet=True, train_text_encoder=True)
    network = LycorisNetwork.apply(unet, te, spec)
    attentions = [name for name, m in unet.named_modules() if isinstance(m, Attention)]
    unet_names = {lora.lora_name for lora in network.net.unet_loras}
    assert len(attentions) > 0 and unet_names == {
        f"lora_unet_{a.replace('.', '_')}_{layer}" for a in attentions
        for layer in ("to_q", "to_k", "to_v", "to_out_0")}
    # the tiny demo: 22 attentions x 4 = 88 U-Net modules; the text encoder's CLIPAttention:
    # q/k/v/out_proj in each of its 3 layers = 12, and no MLP (attention only)
    assert len(unet_names) == 88 and len(attentions) == 22
    te_names = {lora.lora_name for lora in network.net.text_encoder_loras}
    assert te_names == {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(3)
                        for p in ("q", "k", "v", "out")}
