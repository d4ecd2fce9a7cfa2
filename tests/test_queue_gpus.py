"""One GPU per queued run (``launch.gpu_per_run``, issue 15): the queue starts a file with it on a
free GPU of its own (CUDA_VISIBLE_DEVICES), beside the others, and never gives one GPU to two runs.

The scheduling rule (``launch.gpu_for`` / ``plan_starts``) is checked directly; the queue itself
with a fake list of GPUs and real trainer processes of the simulated engine (no torch, seconds).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from test_worker_protocol import SIMULATED, SUPPORT, kill_and_reap, sim_settings, wait_for

from lora_gui.events import RunState
from lora_gui.settings import SettingsError, io
from lora_gui.settings.schema import LaunchSettings
from lora_gui.ui.runs_panel import queue_rows  # the Presets and runs tab's queue table
from lora_gui.worker.client import RunActiveError, WorkerClient
from lora_gui.worker.launch import Busy, plan_starts
from lora_gui.worker.protocol import RunPaths, read_process, read_status
from lora_gui.worker.queue import FolderQueue
from lora_gui.worker.queue_files import queue_items

PER_GPU = LaunchSettings(gpu_per_run=True)


@pytest.fixture
def client(tmp_path, monkeypatch):
    """A client whose trainers run the simulated engine (tests/support), reaped at the end."""
    monkeypatch.setenv("LORA_GUI_WORKER_ENGINE", SIMULATED)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [SUPPORT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LORA_GUI_SIMULATE_STEP_S", "0.05")
    made = WorkerClient(tmp_path / "runs")
    try:
        yield made
    finally:
        kill_and_reap(made)
WHOLE = LaunchSettings()


def per_gpu(ids: str) -> LaunchSettings:
    return LaunchSettings(gpu_per_run=True, gpu_ids=ids)


@pytest.mark.parametrize("queued,gpus,busy,planned", [
    # two GPUs, three runs with gpu_per_run: two start at once on different GPUs, the third waits
    ([PER_GPU] * 3, [0, 1], Busy(), [0, 1]),
    ([PER_GPU] * 3, [0, 1], Busy(True, False, {0}), [1]),  # GPU 0 is held by a running one
    ([PER_GPU] * 2, [0, 1], Busy(True, False, {0, 1}), []),
    ([PER_GPU], [0, 1], Busy(True, True, set()), []),  # a run started with Start has every GPU
    ([WHOLE, PER_GPU], [0, 1], Busy(), [None]),  # alone: the one behind it waits
    ([WHOLE], [0, 1], Busy(True, False, {1}), []),  # every GPU, so it waits for the others to end
    ([PER_GPU, WHOLE, PER_GPU], [0, 1], Busy(), [0]),  # none overtakes the one that waits
    ([per_gpu("1"), per_gpu("1"), PER_GPU], [0, 1, 2], Busy(), [1]),  # gpu_ids is its pool
    ([per_gpu("2,1"), per_gpu("1,2")], [0, 1, 2], Busy(), [1, 2]),  # in the machine's order
    ([PER_GPU] * 3, [], Busy(), [None]),  # no GPU: one at a time
    ([PER_GPU] * 3, [], Busy(True, True, set()), []),
    ([per_gpu("5")], [0, 1], Busy(), [None]),  # no such GPU: it starts and fails with gpu_ids' sentence
])
def test_the_queue_gives_each_run_a_free_gpu_of_its_own(queued, gpus, busy, planned):
    assert plan_starts(queued, gpus, busy) == planned


def test_gpu_per_run_with_several_processes_is_refused_with_a_sentence():
    with pytest.raises(SettingsError, match="launch.gpu_per_run: gives a queued run one GPU, and "
                       "this run has 2 processes: turn off gpu_per_run or multi_gpu"):
        io.apply_overrides(io.defaults(), ["launch.gpu_per_run=true", "launch.multi_gpu=true",
                                           "launch.num_processes=2"])
    field = LaunchSettings.model_fields["gpu_per_run"]
    assert "CUDA_VISIBLE_DEVICES" in field.description and "one at a time" in field.description


def _visible_devices(run_dir) -> str | None:
    import psutil

    pid = read_process(RunPaths(run_dir)).pid
    return psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES")


def _queue_files(folder, tmp_path, names, *extra):
    folder.mkdir(exist_ok=True)
    for name in names:
        io.save_settings(sim_settings(tmp_path, f"model.output_name={name}", *extra),
                         folder / f"{name}.json")


def test_two_gpus_three_queued_runs_two_at_once_the_third_waits(client, tmp_path):
    folder = client.queue_folder  # the GUI's queue
    _queue_files(folder, tmp_path, ["a", "b", "c"], "launch.gpu_per_run=true", "images.max_steps=4000")
    queue = FolderQueue(folder, client, gpus=[0, 1])
    lines = queue.tick().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["a.json", "b.json"]
    assert lines[0].endswith(" on GPU 0") and lines[1].endswith(" on GPU 1")
    a, b = queue.current_runs
    assert (_visible_devices(a.run_dir), _visible_devices(b.run_dir)) == ("0", "1")
    assert [(i.name, i.running, i.gpu) for i in queue_items(folder)] == [
        ("a.json", True, 0), ("b.json", True, 1), ("c.json", False, None)]
    rows, _ = queue_rows(SimpleNamespace(runs=SimpleNamespace(client=client)))
    assert [row[3] for row in rows] == ["training on GPU 0", "training on GPU 1", "waiting"]
    assert queue.tick() is None  # both GPUs held: c waits
    busy = client.busy()
    assert busy.taken == {0, 1} and not busy.exclusive
    with pytest.raises(RunActiveError):  # Start (every GPU) is refused while they run
        client.start(sim_settings(tmp_path, "model.output_name=page"))
    with pytest.raises(RunActiveError, match="GPU 1 is not free"):
        client.start(sim_settings(tmp_path, "model.output_name=other"), gpu=1)

    a.stop()  # GPU 0 becomes free: c takes it, b keeps GPU 1
    ended = a.wait(20)
    assert ended.state == RunState.STOPPED
    lines = queue.tick().splitlines()
    assert lines[0].startswith("a.json: stopped") and lines[1].startswith("c.json: started run ")
    assert lines[1].endswith(" on GPU 0")
    b_again, c = queue.current_runs
    assert b_again.run_id == b.run_id and _visible_devices(c.run_dir) == "0"
    assert read_process(RunPaths(c.run_dir)).spawned >= ended.ended  # never one GPU for two runs
    assert b.info().active and client.busy().taken == {0, 1}
    for run in (b, c):
        run.stop()
        assert run.wait(20).state == RunState.STOPPED


def test_without_a_gpu_the_queued_runs_train_one_at_a_time(client, tmp_path):
    folder = tmp_path / "q"
    _queue_files(folder, tmp_path, ["a", "b"], "launch.gpu_per_run=true", "images.max_steps=4")
    queue = FolderQueue(folder, client, gpus=[])
    first = queue.tick().splitlines()
    assert first[0].startswith("a.json: started run ") and "GPU" not in first[0]
    assert first[1] == ("launch.gpu_per_run: this machine has no GPU, so the queued runs train "
                        "one at a time.")
    [run] = queue.current_runs
    assert _visible_devices(run.run_dir) is None and read_process(RunPaths(run.run_dir)).gpu is None
    assert client.busy().exclusive
    wait_for(lambda: queue.tick() is None and queue.idle(), 30, "the queue to empty")
    a, b = sorted(client.list_runs(), key=lambda i: i.created)
    assert read_status(RunPaths(b.run_dir)).created >= a.ended  # one after the other
    assert queue.finished == ["a.json", "b.json"]


def test_a_restarted_queue_keeps_the_gpus_of_its_running_runs(client, tmp_path):
    folder = tmp_path / "q"
    _queue_files(folder, tmp_path, ["a", "b", "c"], "launch.gpu_per_run=true", "images.max_steps=4000")
    first = FolderQueue(folder, client, gpus=[0, 1])
    first.tick()
    again = FolderQueue(folder, WorkerClient(client.runs_root), gpus=[0, 1])  # a restarted GUI
    try:
        assert again.tick() is None  # a and b still hold GPUs 0 and 1: c waits
        assert [(i.name, i.running) for i in queue_items(folder)][2] == ("c.json", False)
    finally:
        for run in first.current_runs:
            run.force_stop(10)
        kill_and_reap(client)
