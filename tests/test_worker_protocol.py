"""The worker's run-folder protocol, process handling and queues, with the simulated engine
(``tests/support/simulated_engine.py``: no torch), so these tests take seconds. The acceptance tests with
the real engine are in test_worker.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_gui import events as ev
from lora_gui.events import RunState
from lora_gui.settings import io
from lora_gui.worker import failures
from lora_gui.worker.client import RunActiveError, WorkerClient
from lora_gui.worker.processes import pid_alive
from lora_gui.worker.protocol import (
    InboxReader,
    LineCursor,
    RunPaths,
    Status,
    append_command,
    check_run_id,
    read_events,
    write_status,
)
from lora_gui.worker.queue import QueueRunner
from lora_gui.worker.queue_files import queue_items

SIMULATED = "simulated_engine:run_training"
SUPPORT = str(Path(__file__).parent / "support")


def kill_and_reap(client: WorkerClient) -> None:
    """Every trainer the client started, and any other process named in its run folders."""
    for popen in client._popens.values():
        if popen.poll() is None:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        popen.wait(10)
    for status in client.runs_root.glob("*/status.json"):
        pid = json.loads(status.read_text()).get("pid")
        if pid and pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def sim(monkeypatch):
    monkeypatch.setenv("LORA_GUI_WORKER_ENGINE", SIMULATED)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [SUPPORT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("LORA_GUI_SIMULATE_STEP_S", "0.05")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return monkeypatch


@pytest.fixture
def client(tmp_path, sim):
    c = WorkerClient(tmp_path / "runs")
    try:
        yield c
    finally:
        kill_and_reap(c)


def sim_settings(tmp_path: Path, *extra: str):
    (tmp_path / "images").mkdir(exist_ok=True)
    return io.apply_overrides(io.defaults(), [
        f"model.img_folder={tmp_path / 'images'}", f"model.output_folder={tmp_path / 'out'}",
        "model.output_name=sim", "images.max_steps=10", *extra])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def first_progress(run, timeout: float = 20):
    def seen():
        events, _ = run.poll(0)
        return [e for e in events if isinstance(e, ev.Progress) and e.phase == "training"]
    return wait_for(seen, timeout, "a training progress event")


# --- the files ---------------------------------------------------------------------------------

def test_events_reader_keeps_a_partial_last_line_for_later(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [ev.to_json(ev.Log(message=f"line {i}")) for i in range(3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    cursor = LineCursor()
    events, n = read_events(path, 0, cursor)
    assert [e.message for e in events] == ["line 0", "line 1"] and n == 2
    with open(path, "a") as fh:
        fh.write(lines[2][10:] + "\n" + "not json\n")
    events, n = read_events(path, n, cursor)
    assert [e.message for e in events] == ["line 2"] and n == 4  # the broken line is counted
    assert read_events(path, 1)[0][0].message == "line 1"  # a fresh reader from any line
    assert read_events(path, 4, cursor) == ([], 4)
    assert read_events(tmp_path / "missing.jsonl", 0) == ([], 0)


def test_inbox_commands_are_read_once(tmp_path):
    paths = RunPaths(tmp_path)
    reader = InboxReader(paths.inbox)
    assert reader.read() == []
    append_command(paths, ev.SaveNow())
    append_command(paths, ev.Stop())
    assert reader.read() == [ev.SaveNow(), ev.Stop()]
    assert reader.read() == []
    with open(paths.inbox, "a") as fh:
        fh.write('{"kind": "sample_now"')  # half written
    assert reader.read() == []
    with open(paths.inbox, "a") as fh:
        fh.write("}\n")
    assert reader.read() == [ev.SampleNow()]


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a..b"])
def test_run_ids_are_plain_names(bad):
    with pytest.raises(ValueError):
        check_run_id(bad)


@pytest.mark.parametrize("cause, log, words", [
    (-9, "", failures.KILLED),
    (137, "", failures.KILLED),
    (None, "", failures.VANISHED),
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", failures.GPU_OOM),
    (RuntimeError("CUDA error: out of memory"), "", failures.GPU_OOM),
    (FileNotFoundError(2, "No such file or directory", "/data/imgs"), "", "/data/imgs"),
    (1, "FileNotFoundError: [Errno 2] No such file or directory: '/x/y.png'\n", "/x/y.png"),
    (ValueError("loss is nan at step 3"), "", "lower the learning rate"),
    (KeyError("unet"), "", "KeyError: 'unet'"),
    (-11, "", "SIGSEGV"),
    (1, "Traceback\n  File x\nZeroDivisionError: boom\n", "ZeroDivisionError: boom"),
])
def test_failures_become_sentences(cause, log, words):
    assert words in failures.explain_failure(cause, log)


# --- runs with the simulated engine --------------------------------------------------------------

def test_a_run_streams_events_obeys_commands_and_ends_finished(client, tmp_path):
    settings = sim_settings(tmp_path, "images.max_steps=20")
    run = client.start(settings)
    first_progress(run)
    run.send(ev.SampleNow())
    with pytest.raises(RunActiveError):
        client.start(settings)
    assert client.active_run().run_id == run.run_id
    info = run.wait(20)
    assert info.state == RunState.FINISHED and info.step == info.total_steps == 20
    assert info.output_path == str(tmp_path / "out" / "sim.safetensors") and info.exit_code is None
    assert info.message == f"Finished: {info.output_path}" and info.output_name == "sim"
    events, cursor = run.poll(0)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["log", "started"] and kinds[-2:] == ["checkpoint", "finished"]
    assert "sample" in kinds and cursor == len(kinds)
    assert run.poll(cursor) == ([], cursor)
    assert client._popens[run.run_id].wait(5) == 0
    assert io.validate_document(io.read_json(run.run_dir / "settings.json")) == settings
    assert client.active_run() is None
    # a second run is listed first (newest first); a new client sees the same
    run2 = client.start(sim_settings(tmp_path, "images.max_steps=2"))
    run2.wait(20)
    assert [i.run_id for i in WorkerClient(client.runs_root).list_runs()] == [run2.run_id, run.run_id]


def test_stop_ends_the_run_as_stopped_with_the_lora_of_that_step(client, tmp_path):
    run = client.start(sim_settings(tmp_path, "images.max_steps=400"))
    first_progress(run)
    run.stop()
    wait_for(lambda: run.info().state != RunState.RUNNING, 10, "stopping or stopped")
    info = run.wait(10)
    assert info.state == RunState.STOPPED and 0 < info.step < 400
    assert info.output_path.endswith(f"sim-step{info.step:06d}.safetensors")


def test_an_exception_escaping_the_engine_fails_the_run_with_its_traceback(client, sim, tmp_path):
    sim.setenv("LORA_GUI_SIMULATE", "raise")
    run = client.start(sim_settings(tmp_path))
    info = run.wait(20)
    assert info.state == RunState.FAILED and client._popens[run.run_id].wait(5) == 1
    assert info.message == "The trainer stopped with an error: RuntimeError: simulated failure " \
                           "inside the engine"
    assert "Traceback" in info.detail or "simulated_engine.py" in info.detail


def test_an_engine_that_returns_without_a_result_fails_the_run(client, sim, tmp_path):
    sim.setenv("LORA_GUI_SIMULATE", "no-result")
    info = client.start(sim_settings(tmp_path, "images.max_steps=2")).wait(20)
    assert info.state == RunState.FAILED and "without reporting a result" in info.message


def test_a_new_client_detects_a_killed_trainer_it_did_not_start(client, tmp_path):
    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    os.kill(run.info().pid, signal.SIGKILL)
    t0 = time.monotonic()
    other = WorkerClient(client.runs_root)  # not the parent: no exit code, a zombie or no process
    info = wait_for(lambda: (i := other.attach(run.run_id).info()).final and i, 5, "failed")
    assert time.monotonic() - t0 < 5
    assert info.state == RunState.FAILED and info.message == failures.VANISHED
    assert run.info() == info  # the parent now agrees


def test_a_hung_trainer_is_ended_and_never_stays_running(client, tmp_path):
    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    pid = run.info().pid
    os.kill(pid, signal.SIGSTOP)  # no more heartbeats
    watcher = WorkerClient(client.runs_root, stale_after_s=2)
    info = wait_for(lambda: (i := watcher.attach(run.run_id).info()).final and i, 15, "failed")
    assert "stopped responding" in info.message
    # a stopped process cannot act on SIGTERM (it stays pending): SIGKILL ends it
    assert client._popens[run.run_id].wait(5) == -signal.SIGKILL


def test_sigterm_ends_the_run_as_failed_with_a_sentence(client, tmp_path):
    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    os.kill(run.info().pid, signal.SIGTERM)
    info = run.wait(10)
    assert info.state == RunState.FAILED and info.message.startswith("The trainer was ended by SIGTERM")
    assert info.exit_code is None  # written by the trainer itself before it exited
    assert client._popens[run.run_id].wait(5) == 128 + signal.SIGTERM


def test_force_stop_terminates_a_trainer_that_ignores_stop(client, sim, tmp_path):
    sim.setenv("LORA_GUI_SIMULATE", "ignore-stop")
    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    t0 = time.monotonic()
    info = run.force_stop(grace_s=1)
    assert time.monotonic() - t0 < 8
    assert info.state == RunState.FAILED and "SIGTERM" in info.message
    assert client._popens[run.run_id].poll() is not None


def test_deleting_the_run_folder_ends_the_trainer(client, tmp_path):
    import shutil

    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    shutil.rmtree(run.run_dir)
    assert client._popens[run.run_id].wait(10) == 3


def test_reconcile_ends_a_run_whose_process_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    paths = RunPaths(tmp_path / "runs" / "old-run")
    paths.root.mkdir(parents=True)
    old = time.time() - 100
    write_status(paths, Status(run_id="old-run", state=RunState.STOPPING, created=old, pid=gone.pid,
                               heartbeat=old, step=7, total_steps=10))
    client = WorkerClient(tmp_path / "runs")
    client.reconcile()
    info = client.attach("old-run").info()
    assert info.state == RunState.FAILED and info.step == 7 and info.message == failures.VANISHED
    assert client.active_run() is None


def test_a_run_whose_trainer_ended_after_its_last_event_takes_the_result_from_the_events(tmp_path):
    paths = RunPaths(tmp_path / "runs" / "r1")
    paths.root.mkdir(parents=True)
    write_status(paths, Status(run_id="r1", state=RunState.RUNNING, created=time.time(),
                               pid=2**22 + 12345, heartbeat=time.time()))
    paths.events.write_text(ev.to_json(ev.Finished(step=3, output_path="/o/x.safetensors")) + "\n")
    info = WorkerClient(tmp_path / "runs").attach("r1").info()
    assert info.state == RunState.FINISHED and info.output_path == "/o/x.safetensors"


def test_save_json_only_writes_the_settings_and_trains_nothing(client, tmp_path):
    settings = sim_settings(tmp_path, "runs.save_json_only=true",
                            f"runs.save_json_folder={tmp_path / 'saved'}")
    info = client.start(settings).info()
    assert info.state == RunState.FINISHED and info.output_path == str(tmp_path / "saved" / "sim.json")
    saved = io.load_settings(info.output_path)
    assert not saved.runs.save_json_only and saved.images.max_steps == 10
    assert client._popens == {}


# --- the GUI's queue -----------------------------------------------------------------------------

def test_gui_queue_order_remove_and_runner(client, tmp_path):
    names = [client.enqueue(sim_settings(tmp_path, f"model.output_name=q{i}", "images.max_steps=2")).name
             for i in range(3)]
    assert names == ["0001-q0.json", "0002-q1.json", "0003-q2.json"]
    client.queue_move("0003-q2.json", -2)
    assert [(i.name, i.output_name) for i in client.queue_items()] == [
        ("0001-q2.json", "q2"), ("0002-q0.json", "q0"), ("0003-q1.json", "q1")]
    client.queue_move("0001-q2.json", 1)
    client.queue_move("0001-q0.json", 1)
    assert [i.name for i in client.queue_items()] == ["0001-q2.json", "0002-q0.json", "0003-q1.json"]
    client.queue_remove("0003-q1.json")
    bad = client.queue_folder / "0004-bad.json"
    bad.write_text('{"training": {"learning_rate": -1}}')
    runner = QueueRunner(client)
    assert "started" in runner.tick()
    assert queue_items(client.queue_folder)[0].running
    with pytest.raises(ValueError, match="being trained"):
        client.queue_remove("0001-q2.json")
    wait_for(lambda: runner.tick() is None and runner.queue.idle(), 30, "the queue to empty")
    folder = client.queue_folder
    assert sorted(p.name for p in (folder / "complete").iterdir()) == ["0001-q2.json", "0002-q0.json"]
    assert sorted(p.name for p in (folder / "failed").iterdir()) == ["0004-bad.json",
                                                                    "0004-bad.reason.txt"]
    assert "training.learning_rate" in (folder / "failed" / "0004-bad.reason.txt").read_text()
    assert [i.output_name for i in client.list_runs()] == ["q0", "q2"]
    assert all(i.state == RunState.FINISHED for i in client.list_runs())


def test_the_client_imports_no_torch_diffusers_or_gradio():
    code = ("import sys, lora_gui.worker.client, lora_gui.worker.queue\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio', 'accelerate')"
            " if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# --- the queue process (lora-gui queue FOLDER) -------------------------------------------------

def _queue_proc(folder: Path, runs: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_gui.worker.queue", str(folder),
                             "--runs-root", str(runs), "--poll", "0.05"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _running_run(runs: Path, name: str) -> WorkerClient:
    def running():
        return [i for i in WorkerClient(runs).list_runs()
                if i.output_name == name and i.state == RunState.RUNNING and i.step > 0]
    return wait_for(running, 20, f"a running run of {name}")[0]


@pytest.mark.parametrize("trainer_dies_too", [False, True])
def test_a_killed_queue_resumes_and_runs_an_interrupted_file_once_or_again(sim, tmp_path,
                                                                           trainer_dies_too):
    folder, runs = tmp_path / "q", tmp_path / "runs"
    folder.mkdir()
    io.save_settings(sim_settings(tmp_path, "model.output_name=a", "images.max_steps=30"),
                     folder / "a.json")
    io.save_settings(sim_settings(tmp_path, "model.output_name=b", "images.max_steps=2"),
                     folder / "b.json")
    procs = [_queue_proc(folder, runs)]
    try:
        info = _running_run(runs, "a")
        procs[0].kill()
        procs[0].wait(10)
        if trainer_dies_too:
            os.killpg(info.pid, signal.SIGKILL)
        procs.append(_queue_proc(folder, runs))
        assert procs[1].wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        kill_and_reap(WorkerClient(runs))
    assert sorted(p.name for p in (folder / "complete").iterdir()) == ["a.json", "b.json"]
    states = sorted((i.output_name, i.state.value) for i in WorkerClient(runs).list_runs())
    if trainer_dies_too:  # its trainer vanished with the queue: the file is run again
        assert states == [("a", "failed"), ("a", "finished"), ("b", "finished")]
    else:  # its trainer went on: the restarted queue waits for it instead of training twice
        assert states == [("a", "finished"), ("b", "finished")]


def test_sigterm_to_the_queue_stops_the_current_run_and_keeps_its_file(sim, tmp_path):
    folder, runs = tmp_path / "q", tmp_path / "runs"
    folder.mkdir()
    io.save_settings(sim_settings(tmp_path, "model.output_name=a", "images.max_steps=400"),
                     folder / "a.json")
    proc = _queue_proc(folder, runs)
    try:
        _running_run(runs, "a")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        kill_and_reap(WorkerClient(runs))
    [info] = WorkerClient(runs).list_runs()
    assert info.state == RunState.STOPPED
    assert (folder / "a.json").exists() and not (folder / ".queue-current.json").exists()


def test_a_run_folder_gets_one_trainer_and_no_second_life(client, tmp_path):
    run = client.start(sim_settings(tmp_path, "images.max_steps=4000"))
    first_progress(run)
    second = subprocess.run([sys.executable, "-m", "lora_gui.worker", str(run.run_dir)],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2 and "already running" in second.stderr
    run.stop()
    assert run.wait(10).state == RunState.STOPPED
    again = subprocess.run([sys.executable, "-m", "lora_gui.worker", str(run.run_dir)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "already ended (stopped)" in again.stderr
    assert run.info().state == RunState.STOPPED


def test_run_state_is_the_events_enum_with_final_and_active():
    from lora_gui.worker import protocol
    assert protocol.RunState is ev.RunState
    assert {s for s in RunState if s.final} == {RunState.FINISHED, RunState.STOPPED, RunState.FAILED}
    assert {s for s in RunState if s.active} == {RunState.STARTING, RunState.RUNNING,
                                                 RunState.STOPPING}
    assert not RunState.QUEUED.final and not RunState.QUEUED.active
    assert RunState.of("stopped") is RunState.STOPPED and RunState("running") == "running"
    with pytest.raises(ValueError, match="unknown run state 'forced'.*queued, starting"):
        RunState.of("forced")


# --- one rule each: printed events, the demo folder, ending a process group --------------------------

def _progress(step: int, total: int, phase: str = "training") -> ev.Progress:
    return ev.Progress(step=step, total_steps=total, epoch=1, epochs=1, elapsed_s=1.0,
                       steps_per_s=2.5, eta_s=0.0, phase=phase)


def test_printed_progress_is_thinned_by_one_rule():
    # 100 steps: every 100 // 20 = 5th step and the last; 7 steps: every step (7 // 20 -> 1)
    assert [s for s in range(1, 101) if ev.describe(_progress(s, 100))] == list(range(5, 101, 5))
    assert [s for s in range(1, 8) if ev.progress_due(_progress(s, 7))] == list(range(1, 8))
    assert [s for s in range(1, 11) if ev.describe(_progress(s, 10, "caching latents"))] == [10]
    assert ev.describe(_progress(40, 100)) == "step 40/100 (2.50 steps/s)"
    assert ev.describe(_progress(3, 3, "caching latents")) == "caching latents: 3/3 done"
    assert ev.describe(ev.Log(message="hello", level="warning")) == "[warning] hello"
    assert ev.describe(ev.Failed(message="No images.", step=4)) == "failed at step 4: No images."
    assert ev.describe(ev.Finished(step=9, output_path="/o/a.safetensors", stopped=True)) \
        == "stopped at step 9: /o/a.safetensors"
    assert ev.describe(ev.LossReported(step=1, epoch=1, loss=0.1, lr=1e-4)) is None


def test_queue_and_trainer_print_the_same_lines(capsys):
    from lora_gui.worker import child, queue

    events = [_progress(s, 40) for s in range(1, 41)] + [ev.Log(message="saved")]
    lines: list[str] = []
    for event in events:
        queue._log_event(event, lines.append)
        child._print(event)
    printed = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in lines] == printed and len(printed) == 21


def test_demo_folder_rule(tmp_path):
    from lora_gui.worker.demo import demo_dir_for

    def settings(base, images):
        return io.validate_document({"model": {"base_model": str(base), "img_folder": str(images)}})

    demo = tmp_path / "demo"
    assert demo_dir_for(settings(demo / "model", demo / "dataset")) == demo
    assert demo_dir_for(settings(demo / "model.safetensors", demo / "dataset")) == demo
    assert demo_dir_for(settings(demo / "model", tmp_path / "other")) is None  # not a demo layout
    assert demo_dir_for(settings(tmp_path / "sd15.safetensors", demo / "dataset")) is None
    (demo / "model").mkdir(parents=True)
    assert demo_dir_for(settings(demo / "model", demo / "dataset")) is None  # built already
    assert demo_dir_for(io.defaults()) is None


def test_terminate_group_ends_a_process_that_ignores_sigterm(tmp_path):
    from lora_gui.worker.processes import terminate_group

    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        assert terminate_group(proc.pid, popen=proc, wait_s=0.5)
        assert proc.wait(5) == -signal.SIGKILL and time.monotonic() - t0 < 5
        polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                  start_new_session=True)
        assert terminate_group(polite.pid, popen=polite, wait_s=5)
        assert polite.wait(5) == -signal.SIGTERM
    finally:
        for p in (proc, locals().get("polite")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        proc.stdout.close()
