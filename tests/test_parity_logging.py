"""Logging as sd-scripts' init_trackers sets it up: log_with (TensorBoard, W&B offline unless logged
in, or all), log_tracker_name, log_tracker_config (TOML tables per tracker), log_config (the
settings without machine paths, as get_sanitized_config_or_none)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from lora_gui import events as ev
from lora_gui.engine.trackers import sanitized_config, wandb_mode
from lora_gui.engine.train import run_training
from lora_gui.settings import TrainingSettings, io


def _settings(demo, out: Path, *extra: str):
    return io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "training.validation_split=0", "training.validation_every_n_steps=0", "images.max_steps=3",
        *extra])


class _FakeRun:
    def __init__(self, kwargs):
        self.kwargs, self.logged, self.metrics, self.finished = kwargs, [], [], False

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, values):
        self.logged.append(dict(values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[_FakeRun] = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: runs.append(_FakeRun(kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", module)
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return runs


def test_sanitized_config_leaves_out_the_paths():
    config = sanitized_config(TrainingSettings())
    assert config["training.learning_rate"] == 1e-4 and config["model.log_with"] == "tensorboard"
    for path_setting in ("model.base_model", "model.img_folder", "model.vae", "advanced.mask_folder",
                         "model.log_tracker_config", "runs.load_json_path"):
        assert path_setting not in config
    assert isinstance(config["runs.json_load_skip_list"], str)


def test_wandb_is_offline_unless_this_machine_is_logged_in(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_log_with_all_feeds_both_trackers_with_name_options_and_config(demo, tmp_path, fake_wandb,
                                                                       monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HOME", str(tmp_path))
    toml = tmp_path / "trackers.toml"
    toml.write_text('[wandb]\ntags = ["parity"]\nnotes = "n"\n[tensorboard]\nflush_secs = 5\n')
    s = _settings(demo, tmp_path, "model.log_with=all", "model.log_tracker_name=myproject",
                  f"model.log_tracker_config={toml}", "model.log_config=true")
    events: list[ev.Event] = []
    result = run_training(s, events.append)
    assert result.status == "finished", result.message
    run = fake_wandb[0]
    kwargs = run.kwargs
    assert (kwargs["project"], kwargs["name"], kwargs["mode"]) == ("myproject", "demo-lora", "offline")
    assert kwargs["dir"] == str(tmp_path / "logs") and kwargs["tags"] == ["parity"]
    assert kwargs["config"]["training.learning_rate"] == s.training.learning_rate
    assert "model.base_model" not in kwargs["config"]
    assert [v["global_step"] for v in run.logged if "loss/train" in v] == [1, 2, 3]
    assert run.finished and ("*", "global_step") in run.metrics
    assert any("wandb sync" in e.message for e in events if isinstance(e, ev.Log))
    acc = EventAccumulator(str(tmp_path / "logs" / "myproject"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_log_with_wandb_only_writes_no_tensorboard_and_bad_toml_is_a_sentence(demo, tmp_path,
                                                                            fake_wandb):
    result = run_training(_settings(demo, tmp_path, "model.log_with=wandb"), lambda e: None)
    assert result.status == "finished", result.message
    assert not (tmp_path / "logs" / "demo-lora").exists() and fake_wandb[0].kwargs["config"] is None
    bad = tmp_path / "bad.toml"
    bad.write_text("[slack]\nchannel = 1\n")
    events: list[ev.Event] = []
    result = run_training(_settings(demo, tmp_path / "b", f"model.log_tracker_config={bad}"),
                          events.append)
    assert result.status == "failed" and "model.log_tracker_config" in result.message
    assert "'slack'" in result.message


@pytest.mark.slow
def test_real_wandb_logs_offline_without_a_login(demo, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    result = run_training(_settings(demo, tmp_path, "model.log_with=wandb"), lambda e: None)
    assert result.status == "finished", result.message
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
