"""Each training feature changes what the engine computes, and is recorded in the saved LoRA.

Most checks build the Trainer's pieces (``Trainer._setup``) on the tiny demo model and call the
step's parts directly (``_noise``, ``_weighted_loss``, ``_encode``, ``dataset.load_batch``); a few
short real runs cover the saved file, resume, validation, divergence and diffusers loading.
Every feature test compares against the feature switched off, so it fails if the feature does
nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_gui import events as ev
from lora_gui.engine import reporting
from lora_gui.engine import train as train_module
from lora_gui.engine.network import ADAPTER_NAME, load_lora_file
from lora_gui.engine.noise import training_target
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

# --- helpers ---------------------------------------------------------------------------------------


def demo_settings(demo, out: Path, *overrides: str):
    """The demo preset on the session demo, short, with no samples, intermediate saves or validation."""
    base = io.load_preset("demo-tiny-cpu")
    return io.apply_overrides(
        base,
        [
            f"model.base_model={demo.model_dir}",
            f"model.img_folder={demo.dataset_dir}",
            f"model.output_folder={out}",
            "samples.sample_every_n_epochs=0",
            "images.save_every_n_epochs=0",
            "images.max_steps=2",
            "training.validation_split=0",
            *overrides,
        ],
    )


def set_up(settings) -> tuple[Trainer, list]:
    """A Trainer with everything built (model, data, LoRA, optimizer), ready for `_step`."""
    events: list = []
    trainer = Trainer(settings, events.append, ev.CommandQueue())
    trainer.t_start = time.time()
    trainer._setup()
    trainer.close()
    return trainer, events


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_lora_file(path)[0]


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def run(settings, commands=None, sink=None) -> tuple[train_module.TrainingResult, list]:
    events: list = []

    def on_event(event):
        events.append(event)
        if sink:
            sink(event)

    return run_training(settings, on_event, commands), events


def of_type(events, cls) -> list:
    return [e for e in events if isinstance(e, cls)]


def _randomise_lora(trainer: Trainer, seed: int = 0) -> None:
    """Random LoRA weights (a fresh LoRA's up weights are zero, so it would change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def base(demo, tmp_path_factory):
    """One set-up Trainer with every feature off (train both parts, cached latents)."""
    trainer, _ = set_up(demo_settings(demo, tmp_path_factory.mktemp("base")))
    return trainer


@pytest.fixture
def with_settings(base):
    """Temporarily change the settings the step functions of `base` read."""
    original = base.settings

    def change(*overrides: str) -> Trainer:
        base.settings = io.apply_overrides(original, list(overrides))
        return base

    yield change
    base.settings = original


def _fixed_inputs(trainer: Trainer, batch_size: int = 2, seed: int = 0):
    items = next(b for b in trainer.dataset.epoch_batches(0) if len(b) >= batch_size)[:batch_size]
    batch = trainer.dataset.load_batch(items, 0, 0)
    latents = trainer._latents(batch)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    return batch, latents, noise


def _per_sample_losses(trainer, latents, noise, timesteps, captions, is_reg) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(
            [
                trainer._weighted_loss(
                    latents[i : i + 1],
                    noise[i : i + 1],
                    timesteps[i : i + 1],
                    captions[i : i + 1],
                    is_reg[i : i + 1],
                )
                for i in range(latents.shape[0])
            ]
        )


# --- noise ---------------------------------------------------------------------------------------


def test_noise_offset_shifts_the_mean_of_each_sample_and_channel(with_settings):
    latents = torch.zeros(64, 4, 8, 8)
    plain = with_settings("advanced.noise_offset=0")._noise(latents, torch.Generator().manual_seed(3))
    shifted = with_settings("advanced.noise_offset=0.5")._noise(latents, torch.Generator().manual_seed(3))
    # The same white noise plus offset * N(0, 1), constant over each (sample, channel) plane.
    diff = shifted - plain
    assert torch.allclose(diff, diff.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    assert diff.abs().max() > 0.1
    # Std of the per-plane means: 1/8 for white 8x8 noise; sqrt(1/64 + 0.25) ~ 0.52 with the offset.
    assert plain.mean(dim=(2, 3)).std() < 0.2
    assert 0.4 < shifted.mean(dim=(2, 3)).std() < 0.65


def _neighbour_correlation(noise: torch.Tensor) -> float:
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_multires_noise_adds_low_frequency_noise(with_settings):
    latents = torch.zeros(8, 4, 64, 64)
    plain = with_settings("advanced.multires_noise_iterations=0")._noise(
        latents, torch.Generator().manual_seed(1)
    )
    pyramid = with_settings(
        "advanced.multires_noise_iterations=6", "advanced.multires_noise_discount=0.8"
    )._noise(latents, torch.Generator().manual_seed(1))
    weaker = with_settings(
        "advanced.multires_noise_iterations=6", "advanced.multires_noise_discount=0.3"
    )._noise(latents, torch.Generator().manual_seed(1))
    assert abs(_neighbour_correlation(plain)) < 0.03  # white noise
    # Up-sampled coarse noise is smooth (level 0 is a second white noise at weight 1, as in
    # sd-scripts, so the smooth share is about 1.6 / 3.6 of the energy at discount 0.8).
    assert _neighbour_correlation(pyramid) > 0.15
    assert 0.01 < _neighbour_correlation(weaker) < _neighbour_correlation(pyramid)  # discount matters
    assert abs(float(pyramid.std()) - 1.0) < 1e-4  # renormalised to unit variance


# --- loss weights and targets --------------------------------------------------------------------


def test_min_snr_gamma_weights_the_loss_by_min_snr_over_snr(with_settings):
    trainer = with_settings("advanced.min_snr_gamma=0")
    batch, latents, noise = _fixed_inputs(trainer)
    timesteps = torch.tensor([20, 900])
    plain = _per_sample_losses(trainer, latents, noise, timesteps, batch.captions, batch.is_reg)
    trainer = with_settings("advanced.min_snr_gamma=5")
    weighted = _per_sample_losses(trainer, latents, noise, timesteps, batch.captions, batch.is_reg)
    alphas = trainer.scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[1]  # a low-noise step is down-weighted, a high-noise one is not
    torch.testing.assert_close(weighted / plain, torch.clamp(snr, max=5) / snr, rtol=1e-5, atol=0)
    assert weighted[0] < 0.5 * plain[0]


def test_prior_loss_weight_scales_the_loss_of_regularisation_samples(demo, tmp_path):
    trainer, _ = set_up(
        demo_settings(
            demo, tmp_path, f"model.reg_img_folder={demo.reg_dir}", "advanced.prior_loss_weight=0.25"
        )
    )
    # Each epoch has as many reg samples as training samples, and batches carry the flag.
    ds = trainer.dataset
    assert len(ds.reg_items) == len(ds.train_items) > 0
    flags = [item.is_reg for batch in ds.epoch_batches(0) for item in batch]
    assert flags.count(True) == flags.count(False)
    reg_batch = next(b for b in ds.epoch_batches(0) if all(i.is_reg for i in b))
    assert ds.load_batch(reg_batch, 0, 0).is_reg.all()

    batch, latents, noise = _fixed_inputs(trainer)
    timesteps = torch.tensor([300, 600])
    as_train = _per_sample_losses(
        trainer, latents, noise, timesteps, batch.captions, torch.tensor([False, False])
    )
    as_reg = _per_sample_losses(
        trainer, latents, noise, timesteps, batch.captions, torch.tensor([True, True])
    )
    torch.testing.assert_close(as_reg, 0.25 * as_train)
    with torch.no_grad():
        mixed = trainer._weighted_loss(latents, noise, timesteps, batch.captions, torch.tensor([True, False]))
    torch.testing.assert_close(mixed, (0.25 * as_train[0] + as_train[1]) / 2)


def test_v_parameterization_trains_on_the_velocity(demo, tmp_path):
    trainer, events = set_up(
        demo_settings(demo, tmp_path, "model.v_parameterization=true", "advanced.min_snr_gamma=5")
    )
    scheduler = trainer.scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert any("v_prediction" in e.message for e in of_type(events, ev.Log) if e.level == "warning")
    batch, latents, noise = _fixed_inputs(trainer)
    timesteps = torch.tensor([100, 700])
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    assert torch.equal(target, velocity) and not torch.allclose(target, noise)
    with torch.no_grad():
        loss = trainer._weighted_loss(latents, noise, timesteps, batch.captions, batch.is_reg)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = trainer.unet(noisy, timesteps, trainer._text_states(batch.captions)).sample
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=5) / (snr + 1)  # Min-SNR for v-prediction
    per_sample = F.mse_loss(pred, velocity, reduction="none").mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_sample * weights).mean())
    eps_loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    assert not torch.isclose(loss, eps_loss)


# --- the network ---------------------------------------------------------------------------------


def test_conv_dim_adds_locon_modules(demo, tmp_path, base):
    trainer, _ = set_up(demo_settings(demo, tmp_path, "advanced.conv_dim=4", "advanced.conv_alpha=2"))
    plain = set(base.network.module_names()["unet"])
    locon = set(trainer.network.module_names()["unet"])
    assert plain < locon
    added = locon - plain
    for part in (
        "_resnets_0_conv1",
        "_resnets_0_conv2",
        "_time_emb_proj",
        "_conv_shortcut",
        "_downsamplers_0_conv",
        "_upsamplers_0_conv",
    ):
        assert any(part in name for name in added), part
    sd = trainer.network.state_dict_kohya()
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv1}.lora_down.weight"].shape[0] == 4 and sd[f"{conv1}.lora_down.weight"].ndim == 4
    assert sd[f"{conv1}.lora_down.weight"].shape[2:] == (3, 3)
    assert float(sd[f"{conv1}.alpha"]) == 2.0
    # The conv LoRA weights are trained (in the optimizer).
    conv_layer = trainer.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(conv_layer.lora_A[ADAPTER_NAME].weight) in trained


def test_network_dropout_makes_train_mode_outputs_random(demo, tmp_path, base):
    trainer, _ = set_up(demo_settings(demo, tmp_path, "advanced.network_dropout=0.5"))
    saved = [p.detach().clone() for p in base.params]
    for t in (trainer, base):
        _randomise_lora(t)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([500])

    def twice(t: Trainer, train: bool):
        t.unet.train(train)
        t.model.text_encoder.train(train)
        with torch.no_grad():
            outs = [t.unet(latents, timesteps, t._encode(["red circle"])).sample for _ in range(2)]
        t.unet.train(True)
        t.model.text_encoder.train(True)
        return outs

    a, b = twice(trainer, True)
    assert not torch.allclose(a, b)  # dropout active while training
    a, b = twice(trainer, False)
    assert torch.equal(a, b)  # and off for validation / samples
    a, b = twice(base, True)
    assert torch.equal(a, b)  # no dropout without the setting
    with torch.no_grad():
        for p, s in zip(base.params, saved):
            p.copy_(s)


# --- text ----------------------------------------------------------------------------------------


def test_clip_skip_uses_the_penultimate_layer_and_the_final_layer_norm(with_settings):
    caption = ["demoshape, red circle, blue background"]
    with torch.no_grad():
        last = with_settings("training.clip_skip=1")._encode(caption)
        trainer = with_settings("training.clip_skip=2")
        skipped = trainer._encode(caption)
        ids = trainer.model.tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = trainer.model.text_encoder(ids, output_hidden_states=True)
        norm = getattr(trainer.model.text_encoder, "text_model", trainer.model.text_encoder).final_layer_norm
    assert skipped.shape == last.shape == (1, 77, 32)
    torch.testing.assert_close(last, out.last_hidden_state)
    torch.testing.assert_close(skipped, norm(out.hidden_states[-2]))
    assert not torch.allclose(skipped, last)
    assert not torch.allclose(skipped, out.hidden_states[-2])  # the layer norm is applied


def test_max_token_length_225_encodes_three_chunks(with_settings):
    head = "demoshape, " + ", ".join(f"red circle {i}" for i in range(14))
    a, b = [head + ", blue background, large"], [head + ", green square, small"]
    with torch.no_grad():
        short = with_settings("labels.max_token_length=75")
        assert short._encode(a).shape == (1, 77, 32)
        truncated = torch.equal(short._encode(a), short._encode(b))
        long = with_settings("labels.max_token_length=225")
        ea, eb = long._encode(a), long._encode(b)
    assert ea.shape == (1, 3 * 75 + 2, 32)  # sd-scripts: BOS + 3 x 75 + EOS
    assert truncated  # 75 tokens: the tails differ beyond what is encoded
    assert not torch.equal(ea, eb)  # 225 tokens: nothing is skipped
    n_tokens = len(long.model.tokenizer(a[0], add_special_tokens=False).input_ids)
    assert 75 < n_tokens <= 225


# --- data augmentation and captions --------------------------------------------------------------


def test_color_aug_changes_the_pixels(demo, tmp_path):
    trainer, _ = set_up(
        demo_settings(
            demo, tmp_path, "images.color_aug=true", "images.cache_latents=false", "images.flip_aug=false"
        )
    )
    ds = trainer.dataset
    assert ds.latent_cache is None
    items = ds.epoch_batches(0)[0]
    augmented = ds.load_batch(items, 0, 0)
    plain = ds.load_batch(items, augment=False)
    assert augmented.latents is None and augmented.pixels.shape == plain.pixels.shape
    assert (augmented.pixels - plain.pixels).abs().max() > 0.05
    # The training step encodes the augmented pixels.
    assert not torch.allclose(trainer._latents(augmented), trainer._latents(plain))


def test_random_crop_changes_the_crop(demo, tmp_path):
    trainer, _ = set_up(
        demo_settings(
            demo, tmp_path, "images.random_crop=true", "images.cache_latents=false", "images.flip_aug=false"
        )
    )
    ds = trainer.dataset
    differ = 0
    for index, items in enumerate(ds.epoch_batches(0)[:6]):
        cropped = ds.load_batch(items, 0, index)
        centred = ds.load_batch(items, augment=False)
        differ += int((cropped.pixels - centred.pixels).abs().amax(dim=(1, 2, 3)).gt(0.05).sum())
    assert differ >= 2


def test_caption_dropout_empties_captions(demo, tmp_path, with_settings):
    trainer, _ = set_up(demo_settings(demo, tmp_path, "labels.caption_dropout_rate=0.5"))
    assert trainer.text_cache is None  # captions change, so the text encoder output is not cached
    captions = [
        c
        for i, items in enumerate(trainer.dataset.epoch_batches(0)[:10])
        for c in trainer.dataset.load_batch(items, 0, i).captions
    ]
    assert 3 <= captions.count("") <= len(captions) - 3
    assert all(c.startswith("demoshape") for c in captions if c)
    # Without dropout no caption is empty.
    plain = with_settings()
    assert "" not in [
        c
        for i, items in enumerate(plain.dataset.epoch_batches(0)[:10])
        for c in plain.dataset.load_batch(items, 0, i).captions
    ]


# --- the saved file ------------------------------------------------------------------------------


def test_saved_lora_records_every_feature(demo, tmp_path):
    settings = demo_settings(
        demo,
        tmp_path,
        f"model.reg_img_folder={demo.reg_dir}",
        "model.v_parameterization=true",
        "advanced.noise_offset=0.05",
        "advanced.multires_noise_iterations=4",
        "advanced.multires_noise_discount=0.4",
        "advanced.min_snr_gamma=5",
        "advanced.prior_loss_weight=0.75",
        "advanced.conv_dim=4",
        "advanced.conv_alpha=2",
        "advanced.network_dropout=0.1",
        "training.clip_skip=2",
        "labels.max_token_length=225",
        "images.color_aug=true",
        "images.random_crop=true",
        "images.cache_latents=false",
        "labels.caption_dropout_rate=0.2",
    )
    result, events = run(settings)
    assert result.status == "finished", result.message
    tensors, meta = load_lora_file(result.output_path)
    expected = {
        "ss_noise_offset": "0.05",
        "ss_multires_noise_iterations": "4",
        "ss_multires_noise_discount": "0.4",
        "ss_min_snr_gamma": "5.0",
        "ss_v_parameterization": "True",
        "ss_base_model_version": "sd_v1_v",
        "modelspec.prediction_type": "v",
        "ss_prior_loss_weight": "0.75",
        "ss_network_dropout": "0.1",
        "ss_clip_skip": "2",
        "ss_max_token_length": "225",
        "ss_color_aug": "True",
        "ss_random_crop": "True",
        "ss_caption_dropout_rate": "0.2",
        "ss_num_reg_images": "4",
    }
    assert {k: meta.get(k) for k in expected} == expected
    # network_dropout is sd-scripts' own flag (ss_network_dropout), not a network arg
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    assert any("_resnets_" in k and k.endswith("conv2.lora_up.weight") for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())


# --- stop and resume ------------------------------------------------------------------------------


def _stop_at(step: int, commands: ev.CommandQueue):
    def sink(event):
        if isinstance(event, ev.LossReported) and event.step == step:
            commands.put(ev.Stop())

    return sink


RESUME_CASES = [
    # optimizer, accumulation, dataset, stop at: the demo (one long epoch, stop mid-epoch), and a
    # 6-image set of 3 batches per epoch with accumulation 2 (2 steps per epoch, the second a
    # single batch), stopped mid-epoch 2 and resumed across 2 more epoch boundaries.
    ("AdamW", 1, "demo", 4),
    ("AdamW8bit", 1, "demo", 4),
    ("AdamW", 2, "small", 3),
]


@pytest.mark.parametrize("optimizer,accumulation,dataset,stop", RESUME_CASES)
def test_stop_and_resume_equals_an_uninterrupted_run(
    demo, tmp_path, monkeypatch, optimizer, accumulation, dataset, stop
):
    # Report every loss at once (not every 0.5 s), so the Stop sent on the loss of step `stop`
    # is polled at the end of that very step.
    monkeypatch.setattr(reporting, "REPORT_INTERVAL_S", 0.0)
    common = [
        "images.max_steps=8",
        "training.batch_size=2",
        "model.save_state=true",
        f"training.optimizer={optimizer}",
        f"training.gradient_accumulation_steps={accumulation}",
    ]
    if dataset == "small":
        common += [f"model.img_folder={_tiny_dataset(demo, tmp_path / 'data', n=6)}", "images.buckets=false"]
    full, full_events = run(demo_settings(demo, tmp_path / "full", *common))
    assert full.status == "finished", full.message
    assert full.step == 8 and [e.step for e in of_type(full_events, ev.LossReported)] == list(range(1, 9))
    full_losses = {e.step: e for e in of_type(full_events, ev.LossReported)}

    commands = ev.CommandQueue()
    out = tmp_path / "resumed"
    first, first_events = run(demo_settings(demo, out, *common), commands, _stop_at(stop, commands))
    assert first.status == "stopped" and first.step == stop
    assert first.output_path == out / f"demo-lora-step{stop:06d}.safetensors" and first.output_path.is_file()
    assert first.state_dir == out / f"demo-lora-step{stop:06d}-state" and first.state_dir.is_dir()
    assert of_type(first_events, ev.Finished)[0].stopped
    before = of_type(first_events, ev.LossReported)
    assert [(e.step, e.loss) for e in before] == [(s, full_losses[s].loss) for s in range(1, stop + 1)]

    second, second_events = run(
        demo_settings(demo, out, *common, f"model.load_previous_save_state={first.state_dir}")
    )
    assert second.status == "finished", second.message
    assert second.output_path == out / "demo-lora.safetensors"
    after = of_type(second_events, ev.LossReported)
    # Continues mid-epoch at the next step, with the same losses, epochs and learning rates.
    assert [(e.step, e.epoch, e.loss, e.lr) for e in after] == [
        (s, full_losses[s].epoch, full_losses[s].loss, full_losses[s].lr) for s in range(stop + 1, 9)
    ]
    assert after[0].epoch == before[-1].epoch
    # Bit-identical on CPU: every random draw is seeded per (epoch, batch); the optimizer state,
    # scheduler, step and LoRA weights come back from the state folder.
    assert_same_tensors(lora_tensors(second.output_path), lora_tensors(full.output_path))


def test_accumulation_ends_with_each_epoch(demo, tmp_path):
    """3 batches per epoch with accumulation 2: 2 optimizer steps per epoch, as planned."""
    data = _tiny_dataset(demo, tmp_path / "data", n=6)
    result, events = run(
        demo_settings(
            demo,
            tmp_path / "out",
            f"model.img_folder={data}",
            "images.buckets=false",
            "images.max_steps=0",
            "images.epochs=2",
            "training.gradient_accumulation_steps=2",
        )
    )
    started = of_type(events, ev.Started)[0]
    assert (started.steps_per_epoch, started.total_steps) == (2, 4)
    assert result.status == "finished" and result.step == 4
    assert [(e.step, e.epoch) for e in of_type(events, ev.LossReported)] == [(1, 1), (2, 1), (3, 2), (4, 2)]


# --- validation ----------------------------------------------------------------------------------


def test_validation_loss_at_the_interval_and_deterministic(demo, tmp_path):
    # 6 images, 1 held out: 5 in 3 batches per epoch; every 2 steps and at the end of each epoch.
    data = _tiny_dataset(demo, tmp_path / "data", n=6)
    overrides = (
        f"model.img_folder={data}",
        "images.buckets=false",
        "images.max_steps=0",
        "images.epochs=2",
        "training.validation_split=0.2",
        "training.validation_every_n_steps=2",
        "training.validation_every_n_epochs=1",
    )
    values = []
    for name in ("a", "b"):
        result, events = run(demo_settings(demo, tmp_path / name, *overrides))
        assert result.status == "finished", result.message
        val = of_type(events, ev.ValidationLoss)
        # Steps 2, 4, 6 by the step interval; step 3 ends epoch 1 (step 6 ends epoch 2: once only).
        assert [(e.step, e.epoch) for e in val] == [(2, 1), (3, 1), (4, 2), (6, 2)]
        assert result.validation_losses == [(e.step, e.loss) for e in val]
        values.append([e.loss for e in val])
    assert values[0] == values[1]
    assert len(set(values[0])) == 4  # it follows the LoRA's training
    assert all(math.isfinite(v) and v > 0 for v in values[0])


# --- optimizers and schedulers --------------------------------------------------------------------

OPTIMIZER_CASES = [
    ("AdamW", "constant", ""),
    ("AdamW8bit", "constant_with_warmup", ""),
    ("Lion", "linear", ""),
    ("SGDNesterov", "cosine", ""),
    ("Prodigy", "cosine_with_restarts", ""),
    ("DAdaptAdam", "polynomial", ""),
    ("Adafactor", "adafactor", ""),
    ("Adafactor", "constant", ""),
    ("AdamW", "cosine", "weight_decay=0.1 betas=0.9,0.99"),
]


@pytest.mark.parametrize("optimizer,scheduler,args", OPTIMIZER_CASES)
def test_every_optimizer_and_scheduler_takes_three_steps(with_settings, optimizer, scheduler, args):
    from lora_gui.engine.optim import build_optimizer, build_scheduler

    lr = "1.0" if optimizer in ("Prodigy", "DAdaptAdam") else "0.001"
    trainer = with_settings(
        f"training.optimizer={optimizer}",
        f"training.lr_scheduler={scheduler}",
        f"training.optimizer_args={args}",
        f"training.learning_rate={lr}",
        "training.lr_warmup_steps=0" if scheduler != "constant_with_warmup" else "training.lr_warmup_steps=1",
    )
    params = trainer.params
    groups = [
        {"params": trainer.network.unet_parameters(), "lr": trainer.settings.effective_unet_lr},
        {"params": trainer.network.text_encoder_parameters(), "lr": trainer.settings.effective_text_encoder_lr},
    ]
    opt = build_optimizer(trainer.settings, groups)
    sched = build_scheduler(trainer.settings, opt, total_steps=6)
    before = [p.detach().clone() for p in params]
    batches = trainer.dataset.epoch_batches(0)
    for i in range(3):
        loss = trainer._loss(trainer.dataset.load_batch(batches[i], 0, i), 0, i)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    if args:
        assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["betas"] == (0.9, 0.99)
    with torch.no_grad():  # leave the shared LoRA as it was
        for a, p in zip(before, params):
            p.copy_(a)


def _lr_trace(with_settings, *overrides, steps=8):
    from lora_gui.engine.optim import build_optimizer, build_scheduler

    trainer = with_settings("training.learning_rate=1.0", "training.lr_warmup_steps=0", *overrides)
    opt = build_optimizer(trainer.settings, [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}])
    sched = build_scheduler(trainer.settings, opt, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_cycles_and_power_take_effect(with_settings):
    one = _lr_trace(
        with_settings, "training.lr_scheduler=cosine_with_restarts", "training.lr_scheduler_num_cycles=1"
    )
    two = _lr_trace(
        with_settings, "training.lr_scheduler=cosine_with_restarts", "training.lr_scheduler_num_cycles=2"
    )
    assert all(a >= b for a, b in zip(one, one[1:]))  # one cycle: only decreasing
    assert two[4] == pytest.approx(1.0) and two[3] < 0.5  # two cycles: a restart half-way
    linear = _lr_trace(with_settings, "training.lr_scheduler=polynomial", "training.lr_scheduler_power=1")
    square = _lr_trace(with_settings, "training.lr_scheduler=polynomial", "training.lr_scheduler_power=2")
    assert linear[4] == pytest.approx(0.5, abs=1e-3) and square[4] == pytest.approx(0.25, abs=1e-3)


def test_bad_optimizer_argument_fails_naming_it(demo, tmp_path):
    from lora_gui.engine.optim import OptimizerSettingError, build_optimizer

    result, events = run(demo_settings(demo, tmp_path, "training.optimizer_args=nonsense_arg=1"))
    assert result.status == "failed"
    failed = of_type(events, ev.Failed)
    assert len(failed) == 1 and "optimizer_args" in failed[0].message and "nonsense_arg" in failed[0].message
    assert result.message == failed[0].message
    assert not list(tmp_path.glob("*.safetensors"))
    # Every optimizer refuses it by name.
    for name in ("AdamW", "AdamW8bit", "Lion", "SGDNesterov", "Prodigy", "DAdaptAdam", "Adafactor"):
        s = io.apply_overrides(
            io.defaults(),
            [
                f"training.optimizer={name}",
                "training.optimizer_args=nonsense_arg=1",
                "training.lr_scheduler=constant",
            ],
        )
        with pytest.raises(OptimizerSettingError, match="optimizer_args.*nonsense_arg"):
            build_optimizer(s, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}])


# --- divergence ----------------------------------------------------------------------------------


def _tiny_dataset(demo, root: Path, n: int = 2) -> Path:
    """n demo images of one bucket in a `1_tiny` folder: one step per epoch with batch 2."""
    folder = root / "1_tiny"
    folder.mkdir(parents=True)
    for png in sorted((demo.dataset_dir / "5_shapes").glob("*.png"))[:n]:
        shutil.copy(png, folder / png.name)
        shutil.copy(png.with_suffix(".txt"), folder / f"{png.stem}.txt")
    return root


def test_divergence_stops_and_keeps_the_previous_checkpoint(demo, tmp_path):
    data = _tiny_dataset(demo, tmp_path / "data")
    out = tmp_path / "out"
    saved: dict[Path, str] = {}

    def remember(event):
        if isinstance(event, ev.CheckpointSaved):
            saved[Path(event.path)] = hashlib.sha256(Path(event.path).read_bytes()).hexdigest()

    settings = demo_settings(
        demo,
        out,
        f"model.img_folder={data}",
        "images.buckets=false",
        "images.max_steps=0",
        "images.epochs=8",
        "images.save_every_n_epochs=1",
        "training.optimizer=SGDNesterov",
        "training.lr_scheduler=constant",
        "training.lr_warmup_steps=0",
        "training.max_grad_norm=0",
    )
    # The settings cap the learning rate at 10; hand the engine an absurd one past validation.
    settings = settings.model_copy(
        update={"training": settings.training.model_copy(update={"learning_rate": 1e30})}
    )
    result, events = run(settings, sink=remember)
    assert result.status == "failed"
    failed = of_type(events, ev.Failed)[0]
    assert "learning rate" in failed.message and "learning_rate" in failed.message
    assert failed.step == result.step == 2 and len(result.losses) == 1
    assert saved, "a checkpoint was saved before the loss diverged"
    for path, digest in saved.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert all(torch.isfinite(t).all() for t in lora_tensors(path).values())
    on_disk = set(out.glob("*.safetensors"))
    assert on_disk == set(saved)
    assert not (out / "demo-lora.safetensors").exists()


# --- diffusers -----------------------------------------------------------------------------------


def test_locon_lora_loads_in_diffusers_and_reproduces_the_trained_model(demo, tmp_path):
    from diffusers import StableDiffusionPipeline

    settings = demo_settings(
        demo,
        tmp_path,
        "advanced.conv_dim=4",
        "advanced.conv_alpha=2",
        "images.max_steps=3",
        "training.learning_rate=0.01",
        "training.lr_warmup_steps=0",
        "training.lr_scheduler=constant",
        "model.save_precision=float",
    )
    events: list = []
    trainer = Trainer(settings, events.append, ev.CommandQueue())
    result = trainer.run()
    assert result.status == "finished"

    def render(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            image = pipe(
                "red circle, blue background",
                num_inference_steps=3,
                width=64,
                height=64,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
        return image

    loaded = StableDiffusionPipeline.from_pretrained(
        demo.model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    without = render(loaded)
    loaded.load_lora_weights(str(result.output_path))
    with_lora = render(loaded)
    from peft.tuners.lora import LoraLayer

    # diffusers put the LoCon conv layers and the text-encoder layers in place too.
    assert isinstance(loaded.unet.down_blocks[0].resnets[0].conv1, LoraLayer)
    assert isinstance(loaded.unet.down_blocks[0].downsamplers[0].conv, LoraLayer)
    assert sum(isinstance(m, LoraLayer) for m in loaded.text_encoder.modules()) == 18
    assert sum(isinstance(m, LoraLayer) for m in loaded.unet.modules()) == len(
        trainer.network.module_names()["unet"]
    )

    trainer.unet.eval()
    trainer.model.text_encoder.eval()
    in_memory = StableDiffusionPipeline(
        vae=loaded.vae,
        text_encoder=trainer.model.text_encoder,
        tokenizer=trainer.model.tokenizer,
        unet=trainer.acc.unwrap_model(trainer.unet),
        scheduler=loaded.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    trained = render(in_memory)
    assert (trained - without).abs().max() > 1e-2  # the LoRA (conv part included) changes the image
    assert (with_lora - trained).abs().max() < 1e-4


# --- VAE, gradient checkpointing, workers ----------------------------------------------------------


@pytest.mark.parametrize("which", ["single_file", "model_dir", "vae_folder"])
def test_replacement_vae(demo, tmp_path, base, which):
    from diffusers import AutoencoderKL

    if which in ("single_file", "model_dir"):  # the demo's own VAE, read from the file or the folder
        vae_path = demo.single_file if which == "single_file" else demo.model_dir
        expected = base.vae
    else:  # a different VAE folder: its weights must be the ones used
        vae = AutoencoderKL.from_pretrained(demo.model_dir, subfolder="vae", local_files_only=True)
        with torch.no_grad():
            vae.encoder.conv_in.weight.mul_(1.5)
        vae_path = tmp_path / "my-vae"
        vae.save_pretrained(vae_path)
        expected = vae
    trainer, events = set_up(
        demo_settings(demo, tmp_path / "out", f"model.vae={vae_path}", "images.cache_latents=false")
    )
    assert any(f"Using the VAE from {vae_path}" in e.message for e in of_type(events, ev.Log))
    for (name, a), b in zip(trainer.vae.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name
    batch = trainer.dataset.load_batch(trainer.dataset.epoch_batches(0)[0], 0, 0)
    latents = trainer._latents(batch)
    base_latents = base.vae.encode(batch.pixels).latent_dist.mean * base.vae.config.scaling_factor
    assert torch.allclose(latents, base_latents) == (which != "vae_folder")
    loss = trainer._loss(batch, 0, 0)
    assert torch.isfinite(loss)


def test_gradient_checkpointing_gives_the_same_result(demo, tmp_path):
    results = {}
    for gc in (False, True):
        settings = demo_settings(
            demo,
            tmp_path / str(gc),
            f"training.gradient_checkpointing={str(gc).lower()}",
            "training.learning_rate=0.01",
        )
        trainer = Trainer(settings, lambda e: None, ev.CommandQueue())
        result = trainer.run()
        assert result.status == "finished"
        assert trainer.unet.is_gradient_checkpointing == gc
        assert trainer.model.text_encoder.is_gradient_checkpointing == gc
        results[gc] = result
    assert len(results[True].losses) == 2
    # Step 2's loss depends on step 1's gradients of both parts.
    for a, b in zip(results[False].losses, results[True].losses):
        assert abs(a - b) < 1e-5
    assert_same_tensors(
        lora_tensors(results[False].output_path), lora_tensors(results[True].output_path), atol=1e-6
    )


def test_data_loader_workers_give_the_same_lora(demo, tmp_path):
    data = _tiny_dataset(demo, tmp_path / "data", n=6)
    outputs = []
    for workers in (0, 2):
        extra = ["training.persistent_workers=true"] if workers else []
        settings = demo_settings(
            demo,
            tmp_path / f"w{workers}",
            f"model.img_folder={data}",
            f"training.num_workers={workers}",
            *extra,
            "images.max_steps=0",
            "images.epochs=3",
            "images.cache_latents=false",
            "images.color_aug=true",
            "images.random_crop=true",
            "training.learning_rate=0.01",
        )
        result, events = run(settings)
        assert result.status == "finished", result.message
        assert of_type(events, ev.Started)[0].epochs == 3
        outputs.append((result.losses, lora_tensors(result.output_path)))
    assert outputs[0][0] == outputs[1][0]
    assert_same_tensors(outputs[0][1], outputs[1][1])
