"""Acceptance tests of the background trainer with the REAL engine on the tiny demo (CPU).

Each test starts trainer processes through ``WorkerClient`` (or the queue's own process) and reaps
every one of them. The fast protocol tests with a simulated engine are in test_worker_protocol.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gui import events as ev
from lora_gui.events import RunState
from lora_gui.settings import io
from lora_gui.worker import failures
from lora_gui.worker.client import WorkerClient

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _real_engine(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("LORA_GUI_WORKER_ENGINE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def client(tmp_path):
    from test_worker_protocol import kill_and_reap

    c = WorkerClient(tmp_path / "runs")
    try:
        yield c
    finally:
        kill_and_reap(c)


def demo_settings(demo, out: Path, *extra: str):
    return io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0",
        "training.validation_every_n_steps=0", "images.max_steps=4", *extra])


def training_progress(run, at_least: int = 1, timeout: float = 60) -> int:
    """Wait for a training Progress event with step >= at_least; return that step."""
    deadline = time.monotonic() + timeout
    cursor, step = 0, 0
    while time.monotonic() < deadline:
        events, cursor = run.poll(cursor)
        for e in events:
            if isinstance(e, ev.Progress) and e.phase == "training":
                step = max(step, e.step)
        if step >= at_least:
            return step
        assert not run.info().final, run.info()
        time.sleep(0.05)
    raise AssertionError(f"no training step {at_least} within {timeout} s")


@pytest.mark.slow  # two trainings: ~20 s
def test_a_run_streams_events_in_order_and_equals_the_cli_result(client, demo, tmp_path):
    settings = demo_settings(demo, tmp_path / "gui", "images.max_steps=4",
                             "samples.sample_every_n_steps=4",
                             "samples.sample_prompts=demoshape, red circle --s 2")
    run = client.start(settings)
    info = run.wait(90)
    assert info.state == RunState.FINISHED, info
    lora = tmp_path / "gui" / "demo-lora.safetensors"
    assert info.output_path == str(lora) and info.step == info.total_steps == 4
    assert info.message == f"Finished: {lora}"
    events, _ = run.poll(0)
    assert events[-1] == ev.Finished(step=4, output_path=str(lora), files=events[-1].files)
    training = [(e.kind, e.step if not isinstance(e, ev.Started) else 0) for e in events
                if isinstance(e, (ev.Started, ev.LossReported, ev.SampleReady, ev.CheckpointSaved,
                                  ev.Finished))
                or (isinstance(e, ev.Progress) and e.phase == "training")]
    assert training[0] == ("started", 0) and training[-2:] == [("checkpoint", 4), ("finished", 4)]
    steps = [step for _, step in training]
    assert steps == sorted(steps)  # every event in step order
    assert [s for k, s in training if k == "loss"] == [1, 2, 3, 4]
    assert [s for k, s in training if k == "progress"][-1] == 4
    assert [s for k, s in training if k == "sample"] == [0, 4]  # before training, and at step 4
    assert training.index(("loss", 4)) < training.index(("sample", 4))

    # the same settings through `lora-gui train` give the same LoRA
    cli_file = tmp_path / "cli-settings.json"
    io.save_settings(io.apply_overrides(settings, [f"model.output_folder={tmp_path / 'cli'}"]),
                     cli_file)
    out = subprocess.run([sys.executable, "-m", "lora_gui.cli", "train", str(cli_file)], cwd=tmp_path,
                         env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ours, theirs = load_file(str(lora)), load_file(str(tmp_path / "cli" / "demo-lora.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_stop_ends_the_run_as_stopped_with_a_lora_and_state_of_that_step(client, demo, tmp_path):
    run = client.start(demo_settings(demo, tmp_path / "out", "images.max_steps=300",
                                     "model.save_state=true"))
    at = training_progress(run, 2)
    run.stop()
    info = run.wait(60)
    assert info.state == RunState.STOPPED, info
    # Progress is reported every 0.5 s (a few steps on this CPU); Stop is obeyed at the next step.
    assert at <= info.step <= at + 8
    assert any(isinstance(e, ev.Log) and e.message.startswith(f"Stopping at step {info.step}")
               for e in run.poll(0)[0])
    lora = tmp_path / "out" / f"demo-lora-step{info.step:06d}.safetensors"
    assert info.output_path == str(lora) and lora.is_file()
    finished = run.poll(0)[0][-1]
    assert finished.stopped and Path(finished.state_dir).is_dir()
    assert finished.state_dir == str(tmp_path / "out" / f"demo-lora-step{info.step:06d}-state")


def test_kill_9_is_reported_as_killed_within_5_seconds_and_to_a_new_client(client, demo, tmp_path):
    run = client.start(demo_settings(demo, tmp_path / "out", "images.max_steps=300"))
    training_progress(run, 1)
    os.kill(run.info().pid, signal.SIGKILL)
    t0 = time.monotonic()
    info = run.wait(5)
    assert time.monotonic() - t0 < 5
    assert info.state == RunState.FAILED and info.message == failures.KILLED
    assert info.exit_code == -signal.SIGKILL
    again = WorkerClient(client.runs_root)
    assert [(i.run_id, i.state, i.message) for i in again.list_runs()] == [
        (run.run_id, RunState.FAILED, failures.KILLED)]
    assert again.active_run() is None


def test_an_engine_exception_fails_the_run_with_a_sentence_naming_the_folder(client, demo, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo.dataset_dir, images)
    settings = demo_settings(demo, tmp_path / "out", f"model.img_folder={images}")  # valid now
    shutil.rmtree(images)
    info = client.start(settings).wait(60)
    assert info.state == RunState.FAILED
    assert str(images) in info.message and "does not exist" in info.message


def _queue_process(folder: Path, runs: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "lora_gui.worker.queue", str(folder), "--runs-root", str(runs),
             "--poll", "0.1"], stdout=fh, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)


@pytest.mark.slow  # two trainings and three queue process starts: 15-25 s
def test_queue_folder_goes_on_after_a_failure_and_resumes_after_a_kill(demo, tmp_path):
    from test_worker_protocol import kill_and_reap

    folder, runs = tmp_path / "queue", tmp_path / "runs"
    folder.mkdir()
    for name in ("1-first", "3-third"):
        io.save_settings(demo_settings(demo, tmp_path / "out", f"model.output_name={name}",
                                       "images.max_steps=3"), folder / f"{name}.json", sparse=True)
    (folder / "2-second.json").write_text('{"training": {"learning_rate": -1}}')
    procs = []
    try:
        procs.append(_queue_process(folder, runs, tmp_path / "queue.log"))
        deadline = time.monotonic() + 90
        while not (folder / "complete" / "1-first.json").exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "queue.log").read_text()
            time.sleep(0.05)
        procs[0].kill()
        procs[0].wait(10)
        # The exit status counts the failures of that queue process: 1 when the second one files
        # away the invalid 2-second.json, 0 when the killed first one had done it already.
        expected = 0 if (folder / "failed" / "2-second.json").exists() else 1
        procs.append(_queue_process(folder, runs, tmp_path / "queue.log"))
        assert procs[1].wait(120) == expected, (tmp_path / "queue.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        kill_and_reap(WorkerClient(runs))
    log = (tmp_path / "queue.log").read_text()
    assert sorted(p.name for p in (folder / "complete").iterdir()) == ["1-first.json", "3-third.json"]
    assert sorted(p.name for p in (folder / "failed").iterdir()) == ["2-second.json",
                                                                    "2-second.reason.txt"]
    reason = (folder / "failed" / "2-second.reason.txt").read_text()
    assert "training.learning_rate" in reason and "at least 0" in reason
    assert not list(folder.glob("*.json")) and not (folder / ".queue-current.json").exists()
    infos = WorkerClient(runs).list_runs()
    assert sorted(i.output_name for i in infos) == ["1-first", "3-third"], log  # each ran once
    assert all(i.state == RunState.FINISHED for i in infos)
    assert (tmp_path / "out" / "1-first.safetensors").is_file()
    assert (tmp_path / "out" / "3-third.safetensors").is_file()
