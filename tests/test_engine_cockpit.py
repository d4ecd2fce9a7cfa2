"""What the run cockpit shows, computed by the engine: every checkpoint with its validation loss,
only the best N intermediate checkpoints kept (never the final one), and a strength sweep of
samples at the end (samples at LoRA strengths, the network's output multiplier)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_engine_features import _tiny_dataset, demo_settings, of_type, run

from lora_gui import events as ev
from lora_gui.settings import SettingsError, io


def _pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


@pytest.mark.slow  # one 12-step run with validation, 3 intermediate saves and samples: ~15 s
def test_checkpoints_carry_validation_loss_best_kept_and_strength_sweep(demo, tmp_path):
    # 6 images, 1 held out: 5 in 3 batches per epoch, 4 epochs = 12 steps.
    data = _tiny_dataset(demo, tmp_path / "data", n=6)
    out = tmp_path / "out"
    settings = demo_settings(
        demo, out, f"model.img_folder={data}", "images.buckets=false", "images.max_steps=0",
        "images.epochs=4", "training.validation_split=0.2", "training.validation_every_n_steps=0",
        "training.validation_every_n_epochs=1", "images.save_every_n_epochs=1",
        "images.keep_best_checkpoints=2", "samples.sample_every_n_steps=12",
        "samples.sample_prompts=demoshape, red circle", "samples.strength_sweep=0, 1",
        "samples.test_seed=1")  # the same seed for every sample (without it each image draws its own)
    result, events = run(settings)
    assert result.status == "finished", result.message
    val = {e.step: e.loss for e in of_type(events, ev.ValidationLoss)}
    saves = of_type(events, ev.CheckpointSaved)
    assert [(s.step, s.final) for s in saves] == [(3, False), (6, False), (9, False), (12, True)]
    for s in saves:  # each save's loss is the validation loss measured at its step
        assert s.validation_loss == val[s.step]
    ranked = sorted(saves[:3], key=lambda s: s.validation_loss)
    assert all(Path(s.path).is_file() for s in ranked[:2])  # the two best are kept
    assert not Path(ranked[2].path).exists()  # the worst one was deleted
    assert ranked[2].path not in map(str, result.files)
    assert (out / "demo-lora.safetensors").is_file()  # the final one is always kept

    samples = of_type(events, ev.SampleReady)
    regular = {e.step: e.path for e in samples if e.strength is None}
    sweep = {e.strength: e.path for e in samples if e.strength is not None}
    assert sorted(regular) == [0, 12] and sorted(sweep) == [0.0, 1.0]
    # Strength 0 switches the LoRA off: the untrained LoRA's sample (its up weights are zero);
    # strength 1 is the trained LoRA as sampled at the last step. Same seed, same prompt.
    assert _pixels(sweep[0.0]) == _pixels(regular[0])
    assert _pixels(sweep[1.0]) == _pixels(regular[12])
    assert _pixels(sweep[0.0]) != _pixels(sweep[1.0])
    assert sweep[0.0].endswith("_w0_00.png") and sweep[1.0].endswith("_w1_00.png")


def test_strength_sweep_setting_is_parsed_and_checked():
    doc = io.defaults()
    assert io.apply_overrides(doc, ["samples.strength_sweep=0.5;0.75, 1.0,1"]).samples.strength_sweep \
        == "0.5, 0.75, 1"
    for bad, words in (("0.5, strong", "'strong' is not a number"), ("0.5, 3", "3 is outside 0 to 2")):
        with pytest.raises(SettingsError, match=words):
            io.apply_overrides(doc, [f"samples.strength_sweep={bad}"])


@pytest.mark.slow  # a 3-step LoHa run with samples: ~10 s
def test_strength_sweep_scales_a_lycoris_network_too(demo, tmp_path):
    """Strength 0 switches a LyCORIS network off as well (LoHa starts as no change, so the
    untrained step-0 sample is the base model's)."""
    settings = demo_settings(
        demo, tmp_path / "out", "advanced.network_type=LoHa", "images.max_steps=3",
        "samples.sample_every_n_steps=3", "samples.sample_prompts=demoshape, red circle",
        "samples.strength_sweep=0, 1", "samples.test_seed=1")
    result, events = run(settings)
    assert result.status == "finished", result.message
    samples = of_type(events, ev.SampleReady)
    regular = {e.step: e.path for e in samples if e.strength is None}
    sweep = {e.strength: e.path for e in samples if e.strength is not None}
    assert _pixels(sweep[0.0]) == _pixels(regular[0])
    assert _pixels(sweep[1.0]) == _pixels(regular[3])
    assert _pixels(sweep[0.0]) != _pixels(sweep[1.0])
