"""The retention rules of periodic saves together: keep_best_checkpoints (validation loss) and
sd-scripts' save_last_n_epochs / save_last_n_steps (+ _state). A file is deleted only when every
active rule drops it, never twice, never the final one, and each deletion is one log line.

The saves go through the real ``checkpoint.save_epoch`` / ``save_step`` on a stand-in trainer
(a one-tensor LoRA, the validation loss set by hand), so each case runs in milliseconds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_gui import events as ev
from lora_gui.engine import checkpoint
from lora_gui.settings import io


class _Family:
    def lora_file_tensors(self, model, network, settings, dtype):
        return {"lora_unet_x.lora_down.weight": torch.ones(1, 2, dtype=dtype)}


def _trainer(tmp_path: Path, monkeypatch, *overrides: str):
    settings = io.apply_overrides(io.defaults(), ["model.output_name=demo", *overrides])
    # The metadata needs a real run's facts; what these tests look at is which files stay.
    monkeypatch.setattr(checkpoint, "build_metadata", lambda *a, **k: {})
    monkeypatch.setattr(checkpoint.state_files, "save_state", lambda t, d: d.mkdir())
    logs: list[str] = []
    emitted: list[ev.Event] = []
    t = SimpleNamespace(emitted=emitted, 
        settings=settings, name="demo", out_dir=tmp_path, files=[], saved=set(), is_main=True,
        retention=None,
        progress=SimpleNamespace(step=0, epoch=0), validation_losses=[], family=_Family(),
        model=None, network=None, optimizer=None, facts=None,
        acc=SimpleNamespace(wait_for_everyone=lambda: None),
        dataset=SimpleNamespace(validation_batches=lambda: []),
        emit=lambda e: logs.append(e.message) if isinstance(e, ev.Log) else emitted.append(e),
        log=lambda message, level="info": logs.append(message))
    return t, logs


def _epoch(t, epoch: int, loss: float | None = None) -> None:
    """The end of epoch ``epoch`` (1 step per epoch) with its validation loss."""
    t.progress.step = t.progress.epoch = epoch
    if loss is not None:
        t.validation_losses.append((epoch, loss))
    checkpoint.save_epoch(t, epoch)


def _left(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def test_keep_best_and_last_n_epochs_delete_only_what_both_drop(tmp_path, monkeypatch):
    """keep_best 1 and save_last_n_epochs 2, losses 0.1, 0.5, 0.4, 0.3 at epochs 1..4. After 2:
    best {1}, last two {1, 2}: nothing goes (keep_best alone would drop 2). After 3: best {1},
    last {2, 3}: nothing (get_remove_epoch_no alone would drop 1, the best). After 4: best {1},
    last {3, 4}: only epoch 2 goes, once, with both reasons."""
    t, logs = _trainer(tmp_path, monkeypatch, "images.save_every_n_epochs=1",
                       "images.keep_best_checkpoints=1", "images.save_last_n_epochs=2")
    for epoch, loss in ((1, 0.1), (2, 0.5), (3, 0.4)):
        _epoch(t, epoch, loss)
    assert _left(tmp_path) == {"demo-000001.safetensors", "demo-000002.safetensors",
                               "demo-000003.safetensors"}
    assert not [line for line in logs if line.startswith("Deleted")]
    _epoch(t, 4, 0.3)
    assert _left(tmp_path) == {"demo-000001.safetensors", "demo-000003.safetensors",
                               "demo-000004.safetensors"}
    deleted = [line for line in logs if line.startswith("Deleted")]
    assert deleted == ["Deleted demo-000002.safetensors: not among the 1 best by validation loss "
                       "(0.5000; images.keep_best_checkpoints) and older than the last 2 epoch saves "
                       "(images.save_last_n_epochs)"]
    assert tmp_path / "demo-000002.safetensors" not in t.files
    # the page learns it from an event that names the file and both rules
    assert [e for e in t.emitted if isinstance(e, ev.CheckpointDeleted)] == [ev.CheckpointDeleted(
        path=str(tmp_path / "demo-000002.safetensors"), reason=deleted[0].split(": ", 1)[1])]


def test_each_rule_alone_keeps_its_own_behaviour(tmp_path, monkeypatch):
    """keep_best alone drops the worse saves at once; save_last_n_epochs alone is sd-scripts'
    get_remove_epoch_no (every 2 epochs, last 1: at epoch 4 the save of epoch 2 goes)."""
    best = tmp_path / "best"
    best.mkdir()
    t, logs = _trainer(best, monkeypatch, "images.save_every_n_epochs=1", "images.keep_best_checkpoints=1")
    _epoch(t, 1, 0.2)
    _epoch(t, 2, 0.1)
    assert _left(best) == {"demo-000002.safetensors"}
    last = tmp_path / "last"
    last.mkdir()
    t, logs = _trainer(last, monkeypatch, "images.save_every_n_epochs=2", "images.save_last_n_epochs=1")
    _epoch(t, 2)
    _epoch(t, 4)
    assert _left(last) == {"demo-000004.safetensors"}
    assert logs[-1] == ("Deleted demo-000002.safetensors: older than the last 1 epoch saves "
                        "(images.save_last_n_epochs)")


def test_states_follow_their_own_rule_and_keep_best(tmp_path, monkeypatch):
    """save_last_n_epochs_state 1 with keep_best 2 (losses 0.1, 0.3, 0.2): the state of epoch 1
    (best) stays, that of epoch 2 (neither best nor last) goes at epoch 3; the LoRA of epoch 2
    is dropped by keep_best, the only rule for the files, so it goes too."""
    t, logs = _trainer(tmp_path, monkeypatch, "images.save_every_n_epochs=1", "model.save_state=true",
                       "images.keep_best_checkpoints=2", "images.save_last_n_epochs_state=1")
    for epoch, loss in ((1, 0.1), (2, 0.3), (3, 0.2)):
        _epoch(t, epoch, loss)
    assert _left(tmp_path) == {"demo-000001.safetensors", "demo-000001-state",
                               "demo-000003.safetensors", "demo-000003-state"}
    deleted = sorted(line.split(":")[0] for line in logs if line.startswith("Deleted"))
    assert deleted == ["Deleted demo-000002-state", "Deleted demo-000002.safetensors"]


def test_step_saves_keep_the_last_n_steps_and_never_the_final(tmp_path, monkeypatch):
    """get_remove_step_no: every 2 steps, last 3 -> at step 8, (8 - 3 - 1) floored to 2 = 4: steps
    2 and 4 are gone. The final LoRA (NAME.safetensors) and a Save-now file are never candidates."""
    t, logs = _trainer(tmp_path, monkeypatch, "images.save_every_n_steps=2", "images.save_last_n_steps=3")
    t.progress.step = 3
    checkpoint.save(t, "demo-step000003", state=False)  # a Save-now: not a periodic save
    for step in (2, 4, 6, 8):
        t.progress.step = step
        checkpoint.save_step(t, step)
    checkpoint.save(t, "demo", state=False, final=True)
    assert _left(tmp_path) == {"demo-step000003.safetensors", "demo-step000006.safetensors",
                               "demo-step000008.safetensors", "demo.safetensors"}
    assert [line for line in logs if line.startswith("Deleted")] == [
        f"Deleted demo-step00000{n}.safetensors: older than the last 3 step saves (images.save_last_n_steps)"
        for n in (2, 4)]


def test_a_file_is_never_deleted_twice_nor_the_final_one():
    """The ledger: a dropped file leaves it; the final LoRA is refused even if registered by mistake."""
    images = io.apply_overrides(io.defaults(), ["images.save_every_n_epochs=1", "images.save_last_n_epochs=1",
                                                "images.keep_best_checkpoints=1"]).images
    r = checkpoint.Retention(images)
    r.add("epoch", 1, Path("a-000001.safetensors"), None, 0.5)
    r.add("epoch", 2, Path("a-000002.safetensors"), None, 0.1)
    assert [p.name for p, _ in r.to_delete()] == ["a-000001.safetensors"]
    assert r.to_delete() == []  # nothing left to drop: asked again, nothing twice
    r.add("epoch", 2, Path("a-000002.safetensors"), None, 0.1)  # the same save again: ignored
    assert len(r.saves) == 1


def test_delete_refuses_the_final_lora_and_its_state(tmp_path, monkeypatch):
    t, logs = _trainer(tmp_path, monkeypatch)
    for name in ("demo.safetensors", "demo-state"):
        target = tmp_path / name
        target.mkdir() if name.endswith("state") else target.write_bytes(b"x")
        checkpoint._delete(t, target, ["a test"])
        assert target.exists()
    assert logs == []


@pytest.mark.parametrize("kind", ["epoch", "step"])
def test_a_resumed_run_finds_its_earlier_periodic_saves(tmp_path, monkeypatch, kind):
    """Resuming: the saves on the cadence from before the resume are under the rules again (as
    sd-scripts' deletion by name); an off-cadence file (a Stop's save at step 3) is not."""
    every = f"images.save_every_n_{kind}s=2"
    last = f"images.save_last_n_{kind}s=1"
    t, logs = _trainer(tmp_path, monkeypatch, every, last, "model.load_previous_save_state=x")
    stem = "demo-step" if kind == "step" else "demo-"
    for n in (2, 3):
        (tmp_path / f"{stem}{n:06d}.safetensors").write_bytes(b"x")
    t.progress.step = t.progress.epoch = 6
    (checkpoint.save_step if kind == "step" else checkpoint.save_epoch)(t, 6)
    assert _left(tmp_path) == {f"{stem}000003.safetensors", f"{stem}000006.safetensors"}


def test_a_stop_right_after_a_step_save_still_saves_the_state(tmp_path, monkeypatch):
    """A Stop at a step that was just saved (without state) saves the state to resume from beside
    that LoRA instead of returning none."""
    t, logs = _trainer(tmp_path, monkeypatch, "images.save_every_n_steps=2")
    t.progress.step = 4
    checkpoint.save_step(t, 4)
    path, state = checkpoint.save(t, "demo-step000004", state=True)
    assert path.name == "demo-step000004.safetensors" and state == tmp_path / "demo-step000004-state"
    assert state.is_dir() and logs[-1] == f"Saved the state {state}"
    assert checkpoint.save(t, "demo-step000004", state=True) == (path, state)  # once only
    assert _left(tmp_path) == {"demo-step000004.safetensors", "demo-step000004-state"}
