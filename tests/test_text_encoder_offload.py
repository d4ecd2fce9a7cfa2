"""Where the frozen modules sit (issue 14 point 4, issue 13 point 5): with cached text outputs and
frozen text encoders, the encoders leave the device once the captions, the validation captions and
the sample prompts are encoded, and samples and the validation loss come out bit-identical to a run
that keeps them; an fp8 or NF4 base is converted in CPU memory before it moves to the device.

There is no GPU here (the training device is the CPU), so the moves are observed by recording every
``Module.to`` call, and the run that proves the text encoders are not used after set-up makes them
raise once they are released."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gui import events as ev
from lora_gui.engine import evaluation, setup
from lora_gui.engine.families import family_for
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

torch.set_num_threads(1)

PRESETS = {"flux": "demo-tiny-flux-cpu", "sdxl": "demo-tiny-sdxl-cpu", "sd": "demo-tiny-cpu"}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Each family's demo, built when a test first asks for it."""
    from lora_gui.engine.demo import build_demo

    class Demos(dict):
        def __missing__(self, family):
            self[family] = build_demo(tmp_path_factory.mktemp(f"demo-{family}"), seed=0, family=family)
            return self[family]

    return Demos()


def cached_text_settings(demo, family: str, out: Path, *extra: str):
    """Frozen text encoders and captions that never change (no shuffle): the text outputs are cached."""
    return io.apply_overrides(io.load_preset(PRESETS[family]), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}", f"model.output_folder={out}",
        "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0", "training.unet_only=true",
        "labels.shuffle_caption=false", "training.validation_split=0", "training.validation_every_n_steps=0",
        *extra])


class MoveLog:
    """Every ``nn.Module.to`` call (module, device or None) and the conversions, in order."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, object, torch.device | None]] = []
        real_to = torch.nn.Module.to

        def to(module, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            self.calls.append(("to", module, device))
            return real_to(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)

    def mark(self, what: str, module=None) -> None:
        self.calls.append((what, module, None))

    def moves(self, module) -> list[tuple[int, torch.device]]:
        """(position, device) of each ``.to`` call on ``module`` that names a device."""
        return [(i, d) for i, (kind, m, d) in enumerate(self.calls) if kind == "to" and m is module and d is not None]

    def position(self, what: str) -> list[int]:
        return [i for i, (kind, _, _) in enumerate(self.calls) if kind == what]


def _set_up(settings) -> Trainer:
    trainer = Trainer(settings, lambda e: None, ev.CommandQueue())
    trainer._setup()
    return trainer


@pytest.mark.parametrize("family", ["flux", "sdxl", "sd"])
def test_cached_text_encoders_leave_the_device_after_every_prompt_is_encoded(demos, family, tmp_path, monkeypatch):
    log = MoveLog(monkeypatch)

    family_cls = type(family_for(cached_text_settings(demos[family], family, tmp_path)))
    encode_text = family_cls.encode_text
    monkeypatch.setattr(family_cls, "encode_text",
                        lambda self, *a, **k: (log.mark("encode"), encode_text(self, *a, **k))[1])
    t = _set_up(cached_text_settings(demos[family], family, tmp_path, "training.validation_split=0.2"))
    assert t.text_cache is not None and t.prompt_cache is not None
    # the captions, the validation captions, each sample prompt and negative prompt, and "" (the estimate's)
    prompts = {text for p in t.sample_prompts for text in (p.prompt, p.negative)}
    assert set(t.prompt_cache) == prompts | {""} and len(t.sample_prompts) == 2
    assert {t.dataset.fixed_caption(i) for i in t.dataset.validation_items()} <= set(t.text_cache)
    last_encoding = log.position("encode")[-1]
    for encoder in t.text_encoders:
        moves = log.moves(encoder)
        assert moves[0][1] == t.device  # onto the device to encode ...
        assert moves[-1] == (moves[-1][0], torch.device("cpu")) and moves[-1][0] > last_encoding  # ... then home
        assert all(p.device.type == "cpu" for p in encoder.parameters())
    assert all(p.device == t.device for p in t.unet.parameters())


def test_text_encoders_stay_on_the_device_when_they_are_needed(demos, tmp_path, monkeypatch):
    """Shuffled captions change every step: nothing is cached and the encoders stay on the device."""
    log = MoveLog(monkeypatch)
    s = cached_text_settings(demos["sdxl"], "sdxl", tmp_path, "labels.shuffle_caption=true")
    t = _set_up(s)
    assert t.text_cache is None and t.prompt_cache is None
    for encoder in t.text_encoders:
        assert [d for _, d in log.moves(encoder)] == [t.device]
    assert evaluation._prompt_encoder(t) == t._encode


def test_a_prompt_outside_the_cache_brings_the_encoders_back_for_that_step(demos, tmp_path, monkeypatch):
    t = _set_up(cached_text_settings(demos["flux"], "flux", tmp_path))
    log = MoveLog(monkeypatch)
    encode = evaluation._prompt_encoder(t)
    prompt = t.sample_prompts[0].prompt
    assert encode([prompt]) is t.prompt_cache[prompt]
    assert not log.calls  # a cached prompt moves nothing
    states, pooled = encode(["a prompt nobody cached"])
    with torch.no_grad():
        fresh_states, fresh_pooled = t._encode(["a prompt nobody cached"])
    assert torch.equal(states, fresh_states) and torch.equal(pooled, fresh_pooled)
    for encoder in t.text_encoders:
        assert [d for _, d in log.moves(encoder)] == [t.device, torch.device("cpu")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_samples_and_validation_are_bit_identical_without_the_text_encoders(demos, family, tmp_path, monkeypatch):
    """Once the offloaded run has released its text encoders, calling one raises; its samples,
    validation losses, losses and LoRA equal those of a run that keeps the encoders and encodes each
    sample prompt as it renders it (what the engine did before)."""
    extra = ("images.max_steps=4", "training.validation_split=0.2", "training.validation_every_n_steps=2",
             "samples.sample_every_n_steps=4", "samples.test_seed=5")
    with monkeypatch.context() as m:
        m.setattr(setup, "_release_text_encoders", lambda t: None)  # the encoders stay, as before
        kept, kept_events = _run(cached_text_settings(demos[family], family, tmp_path / "kept", *extra))
    release = setup._release_text_encoders

    def release_for_good(t):
        release(t)
        for encoder in t.text_encoders:
            encoder.forward = _used_after_release

    monkeypatch.setattr(setup, "_release_text_encoders", release_for_good)
    gone, gone_events = _run(cached_text_settings(demos[family], family, tmp_path / "gone", *extra))
    assert kept.status == gone.status == "finished", gone.message
    assert kept.losses == gone.losses and kept.validation_losses == gone.validation_losses
    assert len(gone.validation_losses) == 2
    a, b = load_file(str(kept.output_path)), load_file(str(gone.output_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kept_samples, gone_samples = _samples(kept_events), _samples(gone_events)
    assert len(gone_samples) == 4  # two prompts at step 0 and at step 4
    assert [Path(p).read_bytes() for p in kept_samples] == [Path(p).read_bytes() for p in gone_samples]


def _used_after_release(*args, **kwargs):
    raise AssertionError("a text encoder was used after it left the device")


def _run(settings):
    events: list[ev.Event] = []
    return run_training(settings, events.append), events


def _samples(events) -> list[str]:
    return [e.path for e in events if isinstance(e, ev.SampleReady)]


@pytest.mark.parametrize("option,convert", [("fp8_base", "store_in_fp8"), ("nf4_base", "store_in_nf4")])
def test_the_base_is_stored_smaller_in_cpu_memory_before_it_moves(demos, tmp_path, monkeypatch, option, convert):
    """fp8 / NF4 conversion first, then the move: the 16-bit transformer never goes to the device whole.
    (NF4's layers are quantized as each one moves: bitsandbytes quantizes on the move.)"""
    import importlib

    log = MoveLog(monkeypatch)
    module = importlib.import_module(f"lora_gui.engine.{option[:3]}")
    real = getattr(module, convert)

    def recording(model, *args):
        log.mark("convert", model)
        assert all(p.device.type == "cpu" for p in model.parameters())
        return real(model, *args)

    monkeypatch.setattr(module, convert, recording)
    t = _set_up(cached_text_settings(demos["flux"], "flux", tmp_path, f"advanced.{option}=true"))
    (converted,) = log.position("convert")
    assert log.calls[converted][1] is t.unet
    unet_moves = log.moves(t.unet)
    assert unet_moves and all(i > converted for i, _ in unet_moves)
    assert unet_moves[-1][1] == t.device
    if option == "fp8_base":
        assert any(p.dtype == torch.float8_e4m3fn for p in t.unet.parameters())
