"""Evaluation during a run: the validation loss on held-out images and the sample images."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from lora_gui import events as ev
from lora_gui.dataset.summary import derive_seed

# Validation noises each held-out image at these fractions of the timestep range.
VALIDATION_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def validate(t, epoch: int | None = None) -> None:
    """Validation loss on the held-out images at fixed noise and fixed timesteps, so that two
    evaluations differ only because the LoRA changed. ``epoch``: the 1-based epoch (default: the
    current one; at the end of an epoch ``progress.epoch`` already counts the finished one)."""
    batches = t.dataset.validation_batches()
    if not batches:
        return
    with _evaluating(t):
        total, count = 0.0, 0
        t_max = t.family.num_train_timesteps(t.model)
        with torch.no_grad():
            for index, items in enumerate(batches):
                batch = t.dataset.load_batch(items, augment=False)
                latents = t._latents(batch)
                for fraction in VALIDATION_TIMESTEP_FRACTIONS:
                    gen = torch.Generator().manual_seed(derive_seed(t.settings.training.seed, "val", index, fraction))
                    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                    timesteps = torch.full((latents.shape[0],), int(fraction * t_max), device=t.device)
                    loss = t._weighted_loss(latents, noise, timesteps, batch.captions, batch.is_reg,
                                            t.family.batch_conditioning(t.model, batch, t.device), mask=batch.mask)
                    total, count = total + float(loss) * len(items), count + len(items)
    value, p = total / count, t.progress
    t.validation_losses.append((p.step, value))
    t.emit(ev.ValidationLoss(step=p.step, epoch=p.epoch + 1 if epoch is None else epoch, loss=value))
    if t._writer is not None:
        t._writer.add_scalar("loss/validation", value, p.step)


def prepare_samples(t) -> None:
    from lora_gui.engine.sampling import SamplePrompt, parse_prompts

    sm = t.settings.samples
    defaults = SamplePrompt(prompt="", width=sm.sample_width, height=sm.sample_height,
                            cfg_scale=sm.sample_cfg_scale, steps=sm.sample_steps)
    t.sample_prompts = parse_prompts(sm.sample_prompts, defaults)
    for note in (n for p in t.sample_prompts for n in p.notes):
        t.log(note, "warning")


def sample(t, step: int, epoch: int, strength: float | None = None) -> None:
    """Render the sample prompts with the LoRA as it is now (at ``strength``, when given), and
    announce each image."""
    if not t.sample_prompts or not t.is_main:
        return
    t._flush(force=True)
    at = f" at strength {strength:g}" if strength is not None else ""
    t.log(f"Making {len(t.sample_prompts)} sample images at step {step}{at}")
    stem = f"{t.name}_{step:06d}" + (f"_w{strength:g}" if strength is not None else "")
    with _evaluating(t):
        t.vae.to(t.device)
        written = t.family.generate_samples(
            t.model, t.sample_prompts, t.settings, encode=_prompt_encoder(t), out_dir=t.out_dir / "sample",
            stem=stem, device=t.device, dtype=t.weight_dtype)
        if t.device.type == "cuda" and t.settings.images.cache_latents:
            t.vae.to("cpu")
    for index, (path, prompt) in enumerate(written):
        if path not in t.files:
            t.files.append(path)
        t.emit(ev.SampleReady(step=step, epoch=epoch, path=str(path), prompt=prompt, index=index,
                              strength=strength))


def _prompt_encoder(t):
    """What the sample pipelines encode prompts with: the set-up's prompt cache when the text
    encoders have left the device (``setup._release_text_encoders``), else the text encoders."""
    cache = t.prompt_cache
    if cache is None:
        return t._encode

    def encode(texts: list[str]):
        if len(texts) == 1 and texts[0] in cache:
            return cache[texts[0]]
        with text_encoders_on_device(t), torch.no_grad():
            return t._encode(texts)

    return encode


@contextlib.contextmanager
def text_encoders_on_device(t):
    """The text encoders on the training device for one step, and back where they waited."""
    homes = [next(encoder.parameters()).device for encoder in t.text_encoders]
    for encoder in t.text_encoders:
        encoder.to(t.device)
    try:
        yield
    finally:
        for encoder, home in zip(t.text_encoders, homes):
            encoder.to(home)


def strength_sweep(t, epoch: int) -> None:
    """``samples.strength_sweep``: the sample prompts at each LoRA strength (the network's output
    multiplier), once at the end of a finished run; the multiplier is 1 again afterwards."""
    from lora_gui.engine.sampling import image_seed
    from lora_gui.settings.schema import parse_strengths

    strengths = parse_strengths(t.settings.samples.strength_sweep)
    if not strengths or not t.sample_prompts or not t.is_main:
        return
    # Every strength renders with the same seed per prompt (drawn once here when neither --d nor
    # samples.test_seed fixes it), so the images differ only by the LoRA's strength.
    prompts = t.sample_prompts
    t.sample_prompts = [dataclasses.replace(p, seed=image_seed(p, t.settings.samples.test_seed, i))
                        for i, p in enumerate(prompts)]
    try:
        for strength in strengths:
            t.network.set_multiplier(strength)
            sample(t, t.progress.step, epoch, strength=strength)
    finally:
        t.network.set_multiplier(1.0)
        t.sample_prompts = prompts


@contextlib.contextmanager
def _evaluating(t):
    """The trained models in eval mode (no dropout) and, with a schedule-free optimizer, the LoRA at
    its averaged weights; training mode and the training weights come back afterwards."""
    from lora_gui.engine.optim import averaged_weights

    for model in t.trained_models:
        model.train(False)
    try:
        with averaged_weights(t.optimizer):
            yield
    finally:
        for model in t.trained_models:
            model.train(True)
