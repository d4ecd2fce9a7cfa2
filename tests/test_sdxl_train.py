"""SDXL end to end on the tiny SDXL demo (issue 13 acceptance): the files a run writes, the LoRA
loading into diffusers' SDXL pipeline and reproducing the trained model, determinism, single file
== folder, stop/resume, the loss falling from the command line, refusals, v-prediction with zero
terminal SNR, fp8 storage and a replacement VAE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_gui import events as ev
from lora_gui.engine import reporting
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# The tiny SDXL U-Net (transformer depths 1, 2 and 2 in the middle): 24 + 44 + 22 + 66 + 36
# modules; each tiny text encoder has 3 layers x 6 = 18.
TINY_UNET_MODULES, TINY_TE_MODULES = 192, 18


@pytest.fixture(scope="session")
def xl(tmp_path_factory):
    from lora_gui.engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo-sdxl"), seed=0, family="sdxl")


def xl_settings(demo, out: Path, *extra: str):
    return io.apply_overrides(io.load_preset("demo-tiny-sdxl-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0", *extra])


def train(settings, commands=None, sink=None):
    events: list[ev.Event] = []

    def record(event):
        events.append(event)
        if sink:
            sink(event)

    result = run_training(settings, record, commands)
    return result, events


def test_a_sdxl_run_writes_the_expected_files_keys_and_metadata(xl, tmp_path):
    s = xl_settings(xl, tmp_path, "images.epochs=2", "images.save_every_n_epochs=1", "training.batch_size=8",
                    "samples.sample_every_n_epochs=2", "samples.sample_prompts=demoshape, red circle --s 2")
    result, events = train(s)
    assert result.status == "finished", result.message
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
                   and not str(p.relative_to(tmp_path)).startswith("logs/"))
    assert files == sorted(["demo-sdxl-lora-000001.safetensors", "demo-sdxl-lora.safetensors",
                            "demo-sdxl-lora_settings.json", "demo-sdxl-lora_tags.txt",
                            f"sample/demo-sdxl-lora_{result.step:06d}_00.png"])
    with safe_open(str(result.output_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] for k in keys}
    assert len([m for m in modules if m.startswith("lora_unet_")]) == TINY_UNET_MODULES
    assert len([m for m in modules if m.startswith("lora_te1_text_model_encoder_layers_")]) == TINY_TE_MODULES
    assert len([m for m in modules if m.startswith("lora_te2_text_model_encoder_layers_")]) == TINY_TE_MODULES
    assert len(modules) == TINY_UNET_MODULES + 2 * TINY_TE_MODULES
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in modules
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0" in modules
    assert all(f"{m}.alpha" in keys for m in modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    logs = [e.message for e in events if isinstance(e, ev.Log)]
    estimate = [m for m in logs if m.startswith("Estimated peak memory: ")]
    training = [m for m in logs if m.startswith("Training ")]
    assert len(estimate) == 1 and logs.index(estimate[0]) < logs.index(training[0])


def _pipeline(demo, trainer=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(demo.model_dir, local_files_only=True, add_watermarker=False)
    if trainer is not None:
        pipe.unet = trainer.acc.unwrap_model(trainer.unet)
        pipe.text_encoder, pipe.text_encoder_2 = trainer.model.text_encoder, trainer.model.text_encoder_2
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    return pipe("demoshape, red circle, blue background", num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("conv_dim", [0, 4])
def test_sdxl_lora_loads_with_diffusers_and_reproduces_the_trained_model(xl, tmp_path, conv_dim):
    s = xl_settings(xl, tmp_path, "images.max_steps=6", "training.learning_rate=0.01",
                    "training.network_dim=4", "training.network_alpha=2", f"advanced.conv_dim={conv_dim}",
                    "advanced.conv_alpha=1")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    for model in (trainer.unet, trainer.model.text_encoder, trainer.model.text_encoder_2):
        model.train(False)
    trained = _image(_pipeline(xl, trainer))
    base = _image(_pipeline(xl))
    loaded_pipe = _pipeline(xl)
    loaded_pipe.load_lora_weights(str(result.output_path))
    in_file = {k.rsplit(".", 2)[0] for k in load_file(str(result.output_path)) if k.startswith("lora_unet_")}
    # LoCon adds 17 resnets x 3 + 10 skip convs + 2 down- and 2 upsamplers on the tiny U-Net
    assert len(in_file) == TINY_UNET_MODULES + (65 if conv_dim else 0)
    assert sum(1 for m in loaded_pipe.unet.modules() if hasattr(m, "lora_A")) == len(in_file)
    loaded = _image(loaded_pipe)
    assert np.abs(loaded - trained).max() < 1e-4
    assert np.abs(loaded - base).max() > 1e-3


def test_same_seed_is_bit_identical_and_single_file_equals_folder(xl, tmp_path):
    runs = []
    for name, base in (("a", xl.model_dir), ("b", xl.model_dir), ("c", xl.single_file)):
        s = xl_settings(xl, tmp_path / name, "images.max_steps=3", f"model.base_model={base}",
                        "images.random_crop=true", "images.cache_latents=false")
        result, _ = train(s)
        assert result.status == "finished", result.message
        runs.append(load_file(str(result.output_path)))
    for other in runs[1:]:
        assert runs[0].keys() == other.keys() and all(torch.equal(runs[0][k], other[k]) for k in runs[0])
    result, _ = train(xl_settings(xl, tmp_path / "d", "images.max_steps=3", "training.seed=7"))
    different = load_file(str(result.output_path))
    assert any(not torch.equal(runs[0][k], different[k]) for k in runs[0] if k.endswith("up.weight"))


def test_stop_and_resume_is_bit_identical(xl, tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "REPORT_INTERVAL_S", 0.0)
    common = ["images.max_steps=6", "training.batch_size=2", "model.save_state=true", "images.flip_aug=true"]
    full, full_events = train(xl_settings(xl, tmp_path / "full", *common))
    assert full.status == "finished", full.message
    commands = ev.CommandQueue()

    def stop_at_3(event):
        if isinstance(event, ev.LossReported) and event.step == 3:
            commands.put(ev.Stop())

    out = tmp_path / "resumed"
    first, _ = train(xl_settings(xl, out, *common), commands, stop_at_3)
    assert first.status == "stopped" and first.step == 3
    second, second_events = train(xl_settings(xl, out, *common, f"model.load_previous_save_state={first.state_dir}"))
    assert second.status == "finished", second.message
    full_losses = [(e.step, e.loss) for e in full_events if isinstance(e, ev.LossReported)]
    after = [(e.step, e.loss) for e in second_events if isinstance(e, ev.LossReported)]
    assert after == full_losses[3:]
    a, b = load_file(str(full.output_path)), load_file(str(second.output_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_trains_the_sdxl_demo_preset_headless_and_the_loss_falls(tmp_path):
    """`lora-gui train --preset demo-tiny-sdxl-cpu` on a fresh demo (built on first use)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lora_gui.cli", "train", "--preset", "demo-tiny-sdxl-cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA: outputs/demo-sdxl/demo-sdxl-lora.safetensors" in proc.stdout
    assert (tmp_path / "demo-sdxl" / "model.safetensors").is_file()  # the SDXL demo was built
    acc = EventAccumulator(str(tmp_path / "outputs/demo-sdxl/logs/demo-sdxl-lora"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss/train")]
    validation = [e.value for e in acc.Scalars("loss/validation")]
    n = max(1, len(losses) // 5)
    assert len(losses) > 50
    assert np.mean(losses[-n:]) < np.mean(losses[:n])
    assert validation[-1] < validation[0]


def _refusal(xl, tmp_path, base, family="auto"):
    result, _ = train(xl_settings(xl, tmp_path, "images.max_steps=1", f"model.base_model={base}",
                                  f"model.family={family}"))
    assert result.status == "failed"
    return result.message


def test_refiner_inpainting_and_other_families_are_refused_with_a_sentence(xl, demo, tmp_path):
    state = load_file(str(xl.single_file))
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in state.items()
               if not k.startswith("conditioner.embedders.0.")}
    save_file(refiner, str(tmp_path / "refiner.safetensors"))
    inpaint = dict(state)
    conv_in = inpaint["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    assert "is the SDXL refiner" in _refusal(xl, tmp_path / "o1", tmp_path / "refiner.safetensors")
    assert "is an SDXL inpainting model" in _refusal(xl, tmp_path / "o2", tmp_path / "inpaint.safetensors")
    msg = _refusal(xl, tmp_path / "o3", demo.single_file, family="sdxl")
    assert "is an SD 1.x model but model.family is sdxl: set model.family to auto or sd" in msg
    msg = _refusal(xl, tmp_path / "o4", xl.single_file, family="sd")
    assert "is an SDXL model but model.family is sd: set model.family to auto or sdxl" in msg


def test_v_prediction_with_zero_terminal_snr(xl, tmp_path):
    s = xl_settings(xl, tmp_path, "images.max_steps=2", "model.v_parameterization=true",
                    "advanced.zero_terminal_snr=true", "advanced.min_snr_gamma=5")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    scheduler = trainer.model.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)  # SNR 0 at the last step
    with safe_open(str(result.output_path), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"


def test_fp8_unet_storage_runs_on_the_cpu_and_says_what_it_saves(xl, tmp_path):
    s = xl_settings(xl, tmp_path, "images.max_steps=2", "advanced.fp8_base=true")
    events: list[ev.Event] = []
    trainer = Trainer(s, events.append, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    frozen = [p for n, p in trainer.unet.named_parameters() if n.endswith("to_q.base_layer.weight")]
    assert frozen and all(p.dtype == torch.float8_e4m3fn for p in frozen)
    assert any(isinstance(e, ev.Log) and "fp8 U-Net storage on the CPU" in e.message for e in events)


def test_a_replacement_vae_is_used(xl, tmp_path):
    result, events = train(xl_settings(xl, tmp_path, "images.max_steps=1", f"model.vae={xl.model_dir / 'vae'}",
                                       f"model.base_model={xl.single_file}"))
    assert result.status == "finished", result.message
    assert any(isinstance(e, ev.Log) and "Using the VAE from" in e.message for e in events)


def test_unet_only_caches_both_encoders_text_conditioning(xl, tmp_path):
    s = xl_settings(xl, tmp_path, "images.max_steps=2", "training.unet_only=true", "labels.shuffle_caption=false")
    trainer = Trainer(s, lambda e: None, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished", result.message
    caption = next(iter(trainer.text_cache))
    states, pooled = trainer.text_cache[caption]
    assert states.shape == (77, 32 + 64) and pooled.shape == (64,)  # CLIP-L + bigG widths, bigG's pooled
    with torch.no_grad():
        fresh_states, fresh_pooled = trainer.family.encode_text(trainer.model, [caption], s, trainer.device)
    # (encoded in a batch of many captions: the same numbers up to the batch's float rounding)
    assert torch.allclose(states, fresh_states[0], atol=1e-5) and torch.allclose(pooled, fresh_pooled[0], atol=1e-5)
    keys = load_file(str(result.output_path)).keys()
    assert keys and not any(k.startswith("lora_te") for k in keys)


def test_the_advanced_settings_of_sd_work_for_sdxl(xl, tmp_path):
    result, events = train(xl_settings(
        xl, tmp_path, "images.max_steps=3", f"model.reg_img_folder={xl.reg_dir}", "advanced.prior_loss_weight=0.5",
        "advanced.noise_offset=0.05", "advanced.multires_noise_iterations=3", "advanced.min_snr_gamma=5",
        "advanced.network_dropout=0.1", "advanced.conv_dim=2", "advanced.conv_alpha=1",
        "labels.max_token_length=150"))
    assert result.status == "finished", result.message
    losses = [e.loss for e in events if isinstance(e, ev.LossReported)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    keys = load_file(str(result.output_path)).keys()
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in keys)  # LoCon on a resnet
