"""The training engine end to end on the tiny demo model (issue: engine part 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gui import events as ev
from lora_gui.engine.sampling import PromptLineError, SamplePrompt, parse_prompt_line, parse_prompts
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

ROOT = Path(__file__).resolve().parents[1]


def demo_settings(demo, out: Path, *extra: str):
    s = io.load_preset("demo-tiny-cpu")
    return io.apply_overrides(s, [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0", *extra])


def train(settings):
    events: list[ev.Event] = []
    result = run_training(settings, events.append)
    assert result.status == "finished", result.message
    return result, events


def lora_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_a_short_run_writes_exactly_the_expected_files(demo, tmp_path):
    s = demo_settings(demo, tmp_path, "images.epochs=2", "images.save_every_n_epochs=1",
                      "samples.sample_every_n_epochs=2", "training.batch_size=4",
                      "samples.sample_prompts=demoshape, red circle --s 3")
    result, events = train(s)
    steps = result.step
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    logs = [f for f in files if f.startswith("logs/")]
    assert len(logs) == 1 and logs[0].startswith("logs/demo-lora/events.out.tfevents.")
    assert [f for f in files if not f.startswith("logs/")] == sorted([
        "demo-lora-000001.safetensors", "demo-lora.safetensors", "demo-lora_settings.json",
        "demo-lora_tags.txt", f"sample/demo-lora_{steps:06d}_00.png"])
    # the run's settings are saved next to the outputs and load back equal
    assert io.load_settings(tmp_path / "demo-lora_settings.json") == s
    kinds = [e.kind for e in events]
    assert kinds[0] == "log" and "started" in kinds and kinds[-1] == "finished"
    assert kinds.index("started") < kinds.index("loss") < kinds.index("sample") < kinds.index("finished")
    losses = [e for e in events if isinstance(e, ev.LossReported)]
    assert [e.step for e in losses] == list(range(1, steps + 1))
    saved = [e for e in events if isinstance(e, ev.CheckpointSaved)]
    assert [Path(e.path).name for e in saved] == ["demo-lora-000001.safetensors", "demo-lora.safetensors"]
    # a second run with the same name never overwrites: it saves as demo-lora_2
    before = (tmp_path / "demo-lora.safetensors").read_bytes()
    result2, _ = train(io.apply_overrides(s, ["images.max_steps=1", "images.save_every_n_epochs=0"]))
    assert result2.output_path.name == "demo-lora_2.safetensors"
    assert (tmp_path / "demo-lora.safetensors").read_bytes() == before


def test_lora_file_format_and_metadata(demo, tmp_path):
    s = demo_settings(demo, tmp_path, "images.max_steps=2", "training.network_dim=4",
                      "training.network_alpha=2", "training.clip_skip=2",
                      "model.training_comment=hello")
    result, _ = train(s)
    with safe_open(str(result.output_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    te = [k for k in keys if k.startswith("lora_te_")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    for module in {k.rsplit(".", 2)[0] for k in keys}:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(keys)
    tensors = lora_tensors(result.output_path)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    assert tensors[te[0]].dtype == torch.float32  # the demo preset saves float
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_v2", "ss_output_name", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                "ss_num_train_images", "ss_num_reg_images", "ss_num_epochs", "ss_epoch", "ss_steps",
                "ss_max_train_steps", "ss_lr_scheduler", "ss_optimizer", "ss_clip_skip",
                "ss_max_token_length", "ss_seed", "ss_noise_offset", "ss_mixed_precision",
                "ss_resolution", "ss_training_comment", "ss_tag_frequency", "ss_dataset_dirs",
                "ss_bucket_info", "ss_sd_model_name", "ss_training_started_at",
                "ss_training_finished_at", "ss_session_id", "sshs_model_hash", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.title", "modelspec.resolution", "modelspec.date",
                "modelspec.prediction_type", "modelspec.trigger_phrase"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_clip_skip"] == "2" and meta["ss_steps"] == "2"
    assert meta["ss_training_comment"] == "hello" and meta["modelspec.trigger_phrase"] == "demoshape"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    freq = json.loads(meta["ss_tag_frequency"])
    assert set(freq) == {"5_shapes", "3_circles"} and all(isinstance(v, int) for d in freq.values()
                                                          for v in d.values())
    assert json.loads(meta["ss_dataset_dirs"])["5_shapes"] == {"n_repeats": 5, "img_count": 12}
    body = result.output_path.read_bytes()
    header = int.from_bytes(body[:8], "little")
    # the hash is of the body as serialised with the ss_* metadata only (kohya's rule)
    from lora_gui.engine.network import addnet_hash
    assert meta["sshs_model_hash"] == addnet_hash(tensors, {k: v for k, v in meta.items()})
    assert header > 0
    # minimal metadata
    result2, _ = train(io.apply_overrides(s, ["model.no_meta=true", "model.output_name=minimal"]))
    with safe_open(str(result2.output_path), "pt") as f:
        minimal = f.metadata()
    # sd-scripts: SS_METADATA_MINIMUM_KEYS (ss_network_args only when there are network args), plus
    # the ModelSpec keys and the sshs_* hashes that every save carries
    assert {k for k in minimal if k.startswith("ss_")} == {
        "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2", "ss_base_model_version"}
    assert {"modelspec.title", "modelspec.architecture", "sshs_model_hash"} <= set(minimal)


def _pipeline(demo, unet=None, text_encoder=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo.model_dir, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    if unet is not None:
        pipe.unet, pipe.text_encoder = unet, text_encoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    return pipe("demoshape, red circle, blue background", num_inference_steps=3, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_in_diffusers_and_reproduces_the_trained_model(demo, tmp_path):
    s = demo_settings(demo, tmp_path, "images.max_steps=6", "training.learning_rate=0.01",
                      "training.network_dim=4", "training.network_alpha=2")
    events: list[ev.Event] = []
    trainer = Trainer(s, events.append, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished"
    trainer.unet.eval()
    trainer.model.text_encoder.eval()
    trained = _image(_pipeline(demo, trainer.unet, trainer.model.text_encoder))
    base = _image(_pipeline(demo))
    loaded_pipe = _pipeline(demo)
    loaded_pipe.load_lora_weights(str(result.output_path))
    loaded = _image(loaded_pipe)
    assert np.abs(loaded - trained).max() < 1e-4
    assert np.abs(loaded - base).max() > 1e-3
    # the text encoder LoRA was trained and is part of the file
    assert any(k.startswith("lora_te_") for k in lora_tensors(result.output_path))


def test_same_seed_gives_bit_identical_lora_and_single_file_equals_folder(demo, tmp_path):
    runs = []
    for name, base in (("a", demo.model_dir), ("b", demo.model_dir), ("c", demo.single_file)):
        s = demo_settings(demo, tmp_path / name, "images.max_steps=3", f"model.base_model={base}",
                          "labels.shuffle_caption=true", "images.flip_aug=true")
        runs.append(lora_tensors(train(s)[0].output_path))
    for other in runs[1:]:
        assert runs[0].keys() == other.keys()
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])
    different = lora_tensors(train(demo_settings(demo, tmp_path / "d", "images.max_steps=3",
                                                 "training.seed=7"))[0].output_path)
    assert any(not torch.equal(runs[0][k], different[k]) for k in runs[0] if k.endswith("up.weight"))


def test_unet_only_and_text_only(demo, tmp_path):
    r1, _ = train(demo_settings(demo, tmp_path / "u", "images.max_steps=1", "training.unet_only=true"))
    assert all(k.startswith("lora_unet_") for k in lora_tensors(r1.output_path))
    r2, _ = train(demo_settings(demo, tmp_path / "t", "images.max_steps=1", "training.text_only=true"))
    assert all(k.startswith("lora_te_") for k in lora_tensors(r2.output_path))


def test_start_from_existing_lora(demo, tmp_path):
    first, _ = train(demo_settings(demo, tmp_path / "a", "images.max_steps=2"))
    s = demo_settings(demo, tmp_path / "b", "images.max_steps=1", f"model.lora_model_for_resume={first.output_path}",
                      "training.learning_rate=0.0001")
    events: list[ev.Event] = []
    trainer = Trainer(s, events.append, ev.CommandQueue())
    trainer._setup()
    loaded = trainer.network.state_dict_kohya()
    original = lora_tensors(first.output_path)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    bad = demo_settings(demo, tmp_path / "c", "images.max_steps=1", "training.network_dim=8",
                        f"model.lora_model_for_resume={first.output_path}")
    result = run_training(bad, events.append)
    assert result.status == "failed" and "lora_model_for_resume" in result.message


def test_save_formats_and_precision(demo, tmp_path):
    for fmt in ("ckpt", "pt"):
        r, _ = train(demo_settings(demo, tmp_path / fmt, "images.max_steps=1", f"model.save_as={fmt}",
                                   "model.save_precision=fp16"))
        assert r.output_path.suffix == f".{fmt}"
        data = torch.load(r.output_path, weights_only=True)
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in data)
        assert {v.dtype for v in data.values()} == {torch.float16}


@pytest.mark.parametrize("extra,words", [
    (("model.img_folder=/nonexistent/images",), ["img_folder", "/nonexistent/images"]),
    (("model.base_model=/nonexistent/model.safetensors",), ["/nonexistent/model.safetensors"]),
    (("training.mixed_precision=fp16",), ["fp16", "CUDA"]),
    (("samples.sample_prompts=a cat --w wide",), ["sample_prompts", "line 1"]),
])
def test_failures_end_with_a_sentence(demo, tmp_path, extra, words):
    events: list[ev.Event] = []
    result = run_training(demo_settings(demo, tmp_path, "images.max_steps=1", *extra), events.append)
    assert result.status == "failed"
    assert isinstance(events[-1], ev.Failed)
    for word in words:
        assert word in events[-1].message
    assert not list(tmp_path.glob("*.safetensors"))


def test_mixed_precision_bf16_on_cpu_trains(demo, tmp_path):
    r, _ = train(demo_settings(demo, tmp_path, "images.max_steps=2", "training.mixed_precision=bf16"))
    assert all(torch.isfinite(t).all() for t in lora_tensors(r.output_path).values())


def test_sample_prompt_parsing():
    d = SamplePrompt(prompt="", width=512, height=512, cfg_scale=7.0, steps=20)
    p = parse_prompt_line("a photo of mychar, smiling --n lowres, blurry --w 512 --h 768 --d 42 --l 7.5 --s 28", d)
    assert p == SamplePrompt("a photo of mychar, smiling", "lowres, blurry", 512, 768, 42, 7.5, 28)
    assert parse_prompt_line("   ", d) is None and parse_prompt_line("# comment", d) is None
    assert parse_prompt_line("plain prompt", d) == SamplePrompt("plain prompt", "", 512, 512, None, 7.0, 20)
    assert [x.prompt for x in parse_prompts("a\n\n# b\nc --s 3", d)] == ["a", "c"]
    with pytest.raises(PromptLineError, match="line 2.*not a number"):
        parse_prompts("ok\nbad --w wide", d)
    with pytest.raises(PromptLineError, match="--x"):
        parse_prompts("bad --x 1", d)


def test_sample_png_carries_its_prompt(demo, tmp_path):
    from PIL import Image

    s = demo_settings(demo, tmp_path, "images.max_steps=1", "samples.sample_every_n_steps=1",
                      "samples.sample_prompts=demoshape, green square --n blurry --d 5 --s 2 --w 64 --h 96",
                      "samples.sample_sampler=ddim")
    _, events = train(s)
    samples = [e for e in events if isinstance(e, ev.SampleReady)]
    assert [e.step for e in samples] == [0, 1]  # before training, then every step
    image = Image.open(samples[-1].path)
    assert image.size == (64, 96)
    text = image.text["parameters"]
    assert text.startswith("demoshape, green square\nNegative prompt: blurry")
    assert "Seed: 5" in text and "Steps: 2" in text and "Sampler: ddim" in text


@pytest.mark.slow
def test_cli_trains_the_demo_preset_and_the_loss_goes_down(tmp_path):
    """`lora-gui train presets/demo-tiny-cpu.json` on a fresh demo (built on first use)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lora_gui.cli", "train",
                           str(ROOT / "presets" / "demo-tiny-cpu.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA: outputs/demo/demo-lora.safetensors" in proc.stdout
    assert (tmp_path / "outputs/demo/demo-lora.safetensors").exists()
    logs = list((tmp_path / "outputs/demo/logs/demo-lora").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss/train")]
    validation = [e.value for e in acc.Scalars("loss/validation")]
    n = max(1, len(losses) // 5)
    assert len(losses) > 50
    assert np.mean(losses[-n:]) < np.mean(losses[:n])
    assert validation[-1] < validation[0]


def test_cli_reports_failure_with_one_sentence(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_gui.cli", "train", "--preset", "sd15-character",
                           "--set", "model.base_model=/nowhere/model.safetensors", "--set", "training.mixed_precision=no",
                           "--set",
                           f"model.img_folder={tmp_path}", "--set", f"model.output_folder={tmp_path}/o"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "/nowhere/model.safetensors" in proc.stderr
