"""FLUX.1 on the tiny Flux demo (issue 14 acceptance): the objective against hand-computed values,
the files a run writes, both LoRA formats loading into diffusers' FluxPipeline and reproducing the
trained model, separate files == folder, determinism, stop/resume, the loss falling, the
sd-scripts module counts on a Flux-dev-shaped model on the meta device, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui import events as ev
from lora_gui.engine.families.flux_objective import (
    image_ids,
    pack,
    resolution_mu,
    sample_sigmas,
    shift_sigma,
    time_shift,
    training_sigmas,
    unpack,
)
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

torch.set_num_threads(1)
FLUX_DEV = Path(__file__).resolve().parents[1] / "lora_gui" / "engine" / "configs" / "flux-dev"
# The tiny transformer: 2 double blocks x 10 linears + 2 single blocks x 3 (sd-scripts' modules);
# in memory q, k, v and the single blocks' mlp input are separate linears: 2 x 14 + 2 x 6.
TINY_KOHYA_MODULES, TINY_PEFT_LAYERS = 26, 40


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    from lora_gui.engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo-flux"), seed=0, family="flux")


def flux_settings(demo, out: Path, *extra: str, base: Path | None = None):
    return io.apply_overrides(io.load_preset("demo-tiny-flux-cpu"), [
        f"model.base_model={base or demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0", *extra])


def train(settings, commands=None):
    events: list[ev.Event] = []
    return run_training(settings, events.append, commands), events


# --- the objective, by hand ------------------------------------------------------------------------


def test_packing_round_trips_and_matches_the_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    packed = pack(latents)
    assert packed.shape == (2, 6, 64)
    # token (row 0, column 1) holds channel 0's 2x2 patch at rows 0-1, columns 2-3, then channel 1's
    assert packed[0, 1, :4].tolist() == [latents[0, 0, 0, 2], latents[0, 0, 0, 3], latents[0, 0, 1, 2],
                                         latents[0, 0, 1, 3]]
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 4, 6))
    assert torch.equal(unpack(packed, 4, 6), latents)
    ids = image_ids(4, 6, "cpu", torch.float32)
    assert ids.tolist()[:4] == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32))


def test_sigmas_follow_the_shifted_schedule_by_hand():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # s t / (1 + (s - 1) t): t = 0.5, s = 3 -> 1.5 / 2 = 0.75; t = 0.25 -> 0.75 / 1.5 = 0.5
    assert shift_sigma(torch.tensor([0.5, 0.25]), 3.0).tolist() == [0.75, 0.5]
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(training_sigmas(3.0), scheduler.sigmas, atol=1e-6)
    # Flux's resolution shift: mu = 0.5 at 256 tokens, 1.15 at 4096; time_shift(mu, 0.5) = e^mu / (e^mu + 1)
    assert resolution_mu(256) == pytest.approx(0.5) and resolution_mu(4096) == pytest.approx(1.15)
    assert float(time_shift(1.15, torch.tensor(0.5))) == pytest.approx(np.exp(1.15) / (np.exp(1.15) + 1))


def test_timestep_sampling_draws_as_sd_scripts_names_them():
    from types import SimpleNamespace

    adv = SimpleNamespace(timestep_sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=2.0,
                          weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    normal = torch.randn(4, generator=torch.Generator().manual_seed(5))
    t = torch.sigmoid(2.0 * normal)
    expected = {"shift": t * 3 / (1 + 2 * t), "sigmoid": t, "uniform": torch.rand(4, generator=torch.Generator().manual_seed(5)),
                "logit_normal": torch.sigmoid(normal),
                "flux_shift": np.exp(resolution_mu(16)) / (np.exp(resolution_mu(16)) + (1 / t - 1))}
    for kind, want in expected.items():
        adv.timestep_sampling = kind
        got = sample_sigmas(adv, 4, (8, 8), torch.Generator().manual_seed(5), training_sigmas(3.0))
        assert torch.allclose(got, want.float(), atol=1e-6), kind


def test_noise_and_target_are_rectified_flow():
    from lora_gui.engine.families.flux import Flux
    from lora_gui.engine.families.flux_load import FluxModel

    model = FluxModel(*[None] * 7, variant="dev")
    latents, noise = torch.ones(2, 16, 2, 2), torch.full((2, 16, 2, 2), 3.0)
    timesteps = torch.tensor([250.0, 1000.0])
    noisy = Flux().add_noise(model, latents, noise, timesteps)
    # sigma 0.25: 0.75 * 1 + 0.25 * 3 = 1.5; sigma 1: pure noise
    assert noisy[0].unique().tolist() == [1.5] and noisy[1].unique().tolist() == [3.0]
    assert Flux().target(model, latents, noise, timesteps).unique().tolist() == [2.0]  # noise - latents


# --- runs on the tiny demo ---------------------------------------------------------------------------


def _pipeline(demo, transformer=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(demo.model_dir, local_files_only=True)
    if transformer is not None:
        pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    return pipe("demoshape, red circle, blue background", num_inference_steps=3, height=64, width=64,
                guidance_scale=3.5, max_sequence_length=32, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.mark.slow
def test_a_flux_run_writes_the_expected_files_keys_and_metadata(fx, tmp_path):
    s = flux_settings(fx, tmp_path, "images.epochs=2", "images.save_every_n_epochs=1", "training.batch_size=8",
                      "samples.sample_every_n_epochs=2", "samples.sample_prompts=demoshape, red circle --g 3.5 --s 2",
                      "training.validation_split=0.2", "training.validation_every_n_steps=2")
    result, events = train(s)
    assert result.status == "finished", result.message
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
                   and not str(p.relative_to(tmp_path)).startswith("logs/"))
    assert files == sorted(["demo-flux-lora-000001.safetensors", "demo-flux-lora.safetensors",
                            "demo-flux-lora_settings.json", "demo-flux-lora_tags.txt",
                            f"sample/demo-flux-lora_{result.step:06d}_00.png"])
    with safe_open(str(result.output_path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert len(modules) == TINY_KOHYA_MODULES
    assert {"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_0_txt_mlp_2",
            "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_single_blocks_1_linear1",
            "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin"} <= modules
    # fused q/k/v: 3 downs of rank 4 stacked, block-diagonal up, alpha 3 x 2 so alpha / rank stays 2 / 4
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 32) and tensors[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert float(tensors[f"{qkv}.alpha"]) == 6.0 and float(tensors["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 2.0
    assert torch.count_nonzero(tensors[f"{qkv}.lora_up.weight"][:32, 4:]) == 0  # off-diagonal blocks are zero
    # linear1 = q, k, v (32 each) and the mlp input (128): 4 x rank 4, alpha 8
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (224, 16)
    assert float(tensors["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert [e for e in events if isinstance(e, ev.ValidationLoss)] and result.validation_losses
    assert [e for e in events if isinstance(e, ev.SampleReady)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,blocks,layers", [("kohya", "double", 28), ("diffusers", "all", TINY_PEFT_LAYERS)])
def test_flux_lora_loads_with_diffusers_and_reproduces_the_trained_model(fx, tmp_path, fmt, blocks, layers):
    """diffusers' kohya-Flux reader splits single blocks' linear1 at Flux's real widths (3072 x 3 +
    12288) only, so the tiny model's kohya file is loaded by diffusers with double blocks only; the
    next test checks the single blocks' fused keys the way ComfyUI applies them."""
    s = flux_settings(fx, tmp_path, "images.max_steps=6", "training.learning_rate=0.02", "training.network_dim=4",
                      "training.network_alpha=2", f"model.flux_lora_format={fmt}", f"advanced.flux_train_blocks={blocks}")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    trained_transformer = trainer.acc.unwrap_model(trainer.unet)
    trained_transformer.train(False)
    trained = _image(_pipeline(fx, trained_transformer))
    base = _image(_pipeline(fx))
    loaded_pipe = _pipeline(fx)
    loaded_pipe.load_lora_weights(str(result.output_path))
    assert sum(1 for m in loaded_pipe.transformer.modules() if hasattr(m, "lora_A")) == layers
    loaded = _image(loaded_pipe)
    assert np.abs(trained - base).max() > 1e-3
    assert np.abs(loaded - trained).max() < 1e-4


def _effective_weights(transformer) -> dict[str, torch.Tensor]:
    """Every linear's weight with its LoRA merged: W + B A alpha / r."""
    out = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            out[f"{name}.weight"] = module.base_layer.weight + delta
    return out


@pytest.mark.slow
def test_kohya_flux_file_merged_into_the_original_layout_equals_the_trained_model(fx, tmp_path):
    """What ComfyUI and Forge do with a kohya Flux LoRA: W_fused += up @ down * alpha / rank on the
    original checkpoint's fused linears (qkv, linear1, ...)."""
    from lora_gui.engine.families.flux_convert import to_diffusers
    from lora_gui.engine.model_files import read_state_dict

    s = flux_settings(fx, tmp_path, "images.max_steps=4", "training.learning_rate=0.02")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    original = read_state_dict(fx.single_file)
    lora = load_file(str(result.output_path))
    modules = {k.removesuffix(".alpha") for k in lora if k.endswith(".alpha")}
    assert len(modules) == TINY_KOHYA_MODULES
    for m in modules:
        down, up, alpha = lora[f"{m}.lora_down.weight"], lora[f"{m}.lora_up.weight"], float(lora[f"{m}.alpha"])
        key = m.removeprefix("lora_unet_").replace("_", ".")
        for a, b in (("img.attn", "img_attn"), ("txt.attn", "txt_attn"), ("img.mlp", "img_mlp"),
                     ("txt.mlp", "txt_mlp"), ("img.mod", "img_mod"), ("txt.mod", "txt_mod"), ("double.blocks", "double_blocks"),
                     ("single.blocks", "single_blocks")):
            key = key.replace(a, b)
        original[f"{key}.weight"] = original[f"{key}.weight"] + up @ down * (alpha / down.shape[0])
    merged = to_diffusers(original, dict(trainer.unet.config))
    effective = _effective_weights(trainer.acc.unwrap_model(trainer.unet))
    assert len(effective) == TINY_PEFT_LAYERS
    for name, weight in effective.items():
        assert torch.allclose(merged[name.replace(".base_layer", "")], weight, atol=1e-6), name


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_separate_files_equal_the_folder(fx, tmp_path):
    runs = []
    for name, base in (("a", fx.model_dir), ("b", fx.model_dir), ("c", fx.single_file)):
        result, _ = train(flux_settings(fx, tmp_path / name, "images.max_steps=3", "images.cache_latents=false",
                                        "images.random_crop=true", base=base))
        assert result.status == "finished", result.message
        runs.append((load_file(str(result.output_path)), result.losses))
    for other, losses in runs[1:]:
        assert runs[0][1] == losses
        assert runs[0][0].keys() == other.keys() and all(torch.equal(runs[0][0][k], other[k]) for k in other)
    result, _ = train(flux_settings(fx, tmp_path / "d", "images.max_steps=3", "training.seed=7"))
    different = load_file(str(result.output_path))
    assert any(not torch.equal(runs[0][0][k], different[k]) for k in different if k.endswith("up.weight"))


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(fx, tmp_path, monkeypatch):
    from lora_gui.engine import reporting

    monkeypatch.setattr(reporting, "REPORT_INTERVAL_S", 0.0)
    common = ["images.max_steps=6", "training.batch_size=2", "model.save_state=true", "images.flip_aug=true"]
    full, full_events = train(flux_settings(fx, tmp_path / "full", *common))
    assert full.status == "finished", full.message
    commands = ev.CommandQueue()
    events: list[ev.Event] = []

    def record(event):
        events.append(event)
        if isinstance(event, ev.LossReported) and event.step == 3:
            commands.put(ev.Stop())

    out = tmp_path / "resumed"
    first = run_training(flux_settings(fx, out, *common), record, commands)
    assert first.status == "stopped" and first.step == 3
    second, second_events = train(flux_settings(fx, out, *common, f"model.load_previous_save_state={first.state_dir}"))
    assert second.status == "finished", second.message
    full_losses = [(e.step, e.loss) for e in full_events if isinstance(e, ev.LossReported)]
    after = [(e.step, e.loss) for e in second_events if isinstance(e, ev.LossReported)]
    assert after == full_losses[3:]
    a, b = load_file(str(full.output_path)), load_file(str(second.output_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_loss_falls_and_the_validation_loss_with_it(fx, tmp_path):
    s = flux_settings(fx, tmp_path, "images.max_steps=40", "training.learning_rate=0.005", "training.batch_size=4",
                      "training.validation_split=0.2", "training.validation_every_n_steps=10", "training.network_dim=8",
                      "training.network_alpha=8", "advanced.timestep_sampling=sigmoid")
    result, _ = train(s)
    assert result.status == "finished", result.message
    n = 8
    assert np.mean(result.losses[-n:]) < np.mean(result.losses[:n])
    validation = [v for _, v in result.validation_losses]
    assert len(validation) >= 4 and validation[-1] < validation[0]


# --- sd-scripts' module counts on FLUX.1-dev's shapes (meta device) ---------------------------------


def _meta_flux_network(**adv):
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel

    from lora_gui.engine.families.flux import Flux
    from lora_gui.engine.families.flux_load import FluxModel
    from lora_gui.engine.network import NetworkSpec

    options = SimpleNamespace(**{"flux_train_blocks": "all", "flux_train_modulation": True,
                                 "flux_block_indices": "", **adv})
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(FLUX_DEV / "transformer")))
    model = FluxModel(*[None] * 4, transformer, None, None, variant="dev", lora_options=options)
    return Flux().apply_network(model, NetworkSpec(rank=16, alpha=16, train_text_encoder=False))


def _sd_scripts_names(double=range(19), single=range(38), modulation=True) -> set[str]:
    """The names sd-scripts' lora_flux gives every Linear of DoubleStreamBlock / SingleStreamBlock
    (prefix lora_unet, module path with dots as underscores)."""
    double_linears = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv", "txt_attn_proj",
                      "txt_mlp_0", "txt_mlp_2"] + (["img_mod_lin", "txt_mod_lin"] if modulation else [])
    single_linears = ["linear1", "linear2"] + (["modulation_lin"] if modulation else [])
    return ({f"lora_unet_double_blocks_{i}_{n}" for i in double for n in double_linears}
            | {f"lora_unet_single_blocks_{i}_{n}" for i in single for n in single_linears})


@pytest.mark.parametrize("adv,count,expected", [
    ({}, 304, _sd_scripts_names()),  # 19 x 10 + 38 x 3
    ({"flux_train_modulation": False}, 228, _sd_scripts_names(modulation=False)),  # 19 x 8 + 38 x 2
    ({"flux_train_blocks": "single"}, 114, _sd_scripts_names(double=())),
    ({"flux_train_blocks": "double"}, 190, _sd_scripts_names(single=())),
    ({"flux_block_indices": "double:0-9 single:10,12"}, 106,
     _sd_scripts_names(double=range(10), single=(10, 12))),  # 10 x 10 + 2 x 3
])
def test_flux_dev_lora_modules_are_sd_scripts_lora_flux(adv, count, expected):
    from lora_gui.engine.families.flux_lora import kohya_module

    network = _meta_flux_network(**adv)
    names = {kohya_module(orig) for orig in network.flux_modules}
    assert len(names) == count and names == expected
    # in memory: q, k, v (and linear1's mlp part) are separate diffusers linears
    fused = sum(len(parts) for parts in network.flux_modules.values())
    assert len(network.module_names()["unet"]) == fused


# --- refusals and detection ---------------------------------------------------------------------------


def _refusal(fx, out, *extra, base=None):
    result, _ = train(flux_settings(fx, out, "images.max_steps=1", *extra, base=base))
    assert result.status == "failed"
    return result.message


@pytest.mark.slow
def test_sd_only_settings_and_other_flux_files_are_refused_with_a_sentence(fx, tmp_path):
    from safetensors.torch import save_file

    from lora_gui.engine.families import detect_family

    assert detect_family(str(fx.model_dir)) == "flux" and detect_family(str(fx.single_file)) == "flux"
    for setting, words in (("advanced.noise_offset=0.05", "advanced.noise_offset does not apply to Flux"),
                           ("advanced.min_snr_gamma=5", "advanced.min_snr_gamma does not apply to Flux"),
                           ("model.v_parameterization=true", "model.v_parameterization does not apply to Flux"),
                           ("training.clip_skip=2", "training.clip_skip does not apply to Flux")):
        assert words in _refusal(fx, tmp_path / setting.split("=")[0], setting)
    state = load_file(str(fx.single_file))
    fill = dict(state, **{"img_in.weight": torch.zeros(state["img_in.weight"].shape[0], 384)})
    save_file(fill, str(tmp_path / "flux1-fill-dev.safetensors"))
    assert "is FLUX.1 Fill" in _refusal(fx, tmp_path / "o1", base=tmp_path / "flux1-fill-dev.safetensors")
    save_file(state, str(tmp_path / "flux1-kontext-dev.safetensors"))
    assert "is FLUX.1 Kontext" in _refusal(fx, tmp_path / "o2", base=tmp_path / "flux1-kontext-dev.safetensors")
    msg = _refusal(fx, tmp_path / "o3", "model.ae=/nonexistent/ae.safetensors", base=fx.single_file)
    assert "model.ae: /nonexistent/ae.safetensors does not exist" in msg


def test_dev_and_schnell_are_told_apart_by_the_guidance_embedding():
    from lora_gui.engine.families.flux_load import SHIPPED, _expected_shapes, select_config, variant_of

    dev, schnell = _expected_shapes(str(SHIPPED["dev"])), _expected_shapes(str(SHIPPED["schnell"]))
    assert variant_of(dev) == "dev" and variant_of(schnell) == "schnell"
    assert "guidance_in.in_layer.weight" in dev and dev["double_blocks.18.img_attn.qkv.weight"] == (9216, 3072)
    assert dev["single_blocks.37.linear1.weight"] == (21504, 3072)  # 3 x 3072 + 12288
    assert select_config(SHIPPED["dev"] / "model.safetensors", schnell) == SHIPPED["schnell"]


@pytest.mark.slow
def test_fp8_stored_flux_base_trains_on_the_cpu(fx, tmp_path):
    s = flux_settings(fx, tmp_path, "images.max_steps=2", "advanced.fp8_base=true")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    frozen = [p for n, p in trainer.unet.named_parameters() if n.endswith("to_q.base_layer.weight")]
    assert frozen and all(p.dtype == torch.float8_e4m3fn for p in frozen)
    assert all(np.isfinite(result.losses))


@pytest.mark.slow
def test_nf4_quantized_flux_base_trains_on_the_cpu(fx, tmp_path):
    import bitsandbytes as bnb

    s = flux_settings(fx, tmp_path, "images.max_steps=2", "advanced.nf4_base=true")
    events: list[ev.Event] = []
    trainer = Trainer(s, events.append, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    quantized = [m for m in trainer.unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) >= TINY_PEFT_LAYERS  # every LoRA target's base, and the embedders
    assert all(m.weight.dtype == torch.uint8 for m in quantized)
    assert any(isinstance(e, ev.Log) and "4-bit NF4" in e.message for e in events)
    assert all(np.isfinite(result.losses)) and len(load_file(str(result.output_path))) == 3 * TINY_KOHYA_MODULES


@pytest.mark.slow
def test_block_swap_on_the_cpu_trains_bit_identically_and_samples(fx, tmp_path):
    """advanced.blocks_to_swap = 2 swaps the last double block and both single blocks (with gradient
    checkpointing, which it needs); on the CPU there is no other memory to swap to, so the blocks are
    copied within it: the same numbers, and a note saying so."""
    plain, _ = train(flux_settings(fx, tmp_path / "plain", "images.max_steps=3", "training.gradient_checkpointing=true"))
    swapped, events = train(flux_settings(fx, tmp_path / "swap", "images.max_steps=3", "advanced.blocks_to_swap=2",
                                          "training.gradient_checkpointing=true", "samples.sample_every_n_steps=3"))
    assert plain.status == swapped.status == "finished", swapped.message
    assert plain.losses == swapped.losses
    a, b = load_file(str(plain.output_path)), load_file(str(swapped.output_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [e.message for e in events if isinstance(e, ev.Log)]
    assert any("advanced.blocks_to_swap: on the CPU" in m for m in logs)
    assert any(isinstance(e, ev.SampleReady) for e in events)  # sampling runs through the swap hooks too
    assert "at most 2" in _refusal(fx, tmp_path / "r1", "advanced.blocks_to_swap=3",
                                   "training.gradient_checkpointing=true")
    assert "needs training.gradient_checkpointing" in _refusal(fx, tmp_path / "r3", "advanced.blocks_to_swap=1")
    assert "does not combine with advanced.nf4_base" in _refusal(fx, tmp_path / "r2", "advanced.blocks_to_swap=1",
                                                                 "advanced.nf4_base=true")


def test_flux_presets_load_and_say_what_they_are_for():
    from lora_gui.dataset.memory import guess_family

    presets = {name: io.load_preset(name) for name in
               ("demo-tiny-flux-cpu", "flux-dev-character-24gb", "flux-dev-16gb", "flux-schnell")}
    assert all(s.model.family == "flux" and not s.train_text_encoder for s in presets.values())
    assert presets["flux-dev-character-24gb"].advanced.fp8_base and presets["flux-dev-16gb"].advanced.nf4_base
    assert presets["flux-dev-16gb"].images.resolution == "768"
    assert presets["flux-schnell"].samples.sample_steps == 4
    assert presets["flux-schnell"].advanced.t5xxl_max_token_length == 256
    assert all(presets[n].advanced.guidance_scale == 1.0 for n in ("flux-dev-character-24gb", "flux-dev-16gb"))
    assert guess_family(str(FLUX_DEV)) == "flux"


def test_a_kohya_ss_flux_config_imports_with_sd_scripts_names():
    from lora_gui.settings.foreign import import_foreign

    doc = {"flux1_checkbox": True, "sdxl": False, "ae": "/m/ae.safetensors", "clip_l": "/m/clip_l.safetensors",
           "t5xxl": "/m/t5xxl_fp16.safetensors", "timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
           "model_prediction_type": "raw", "guidance_scale": 1.0, "t5xxl_max_token_len": 512, "train_blocks": "single"}
    out = import_foreign(doc)
    model, adv = out.document["model"], out.document["advanced"]
    assert model["family"] == "flux" and model["ae"] == "/m/ae.safetensors" and model["t5xxl"].endswith("fp16.safetensors")
    assert (adv["timestep_sampling"], adv["discrete_flow_shift"], adv["model_prediction_type"]) == ("shift", 3.1582, "raw")
    assert adv["t5xxl_max_token_length"] == 512 and adv["flux_train_blocks"] == "single"
