"""Warm trainers (worker/warm.py): a trainer process that has imported the engine waits for Start,
trains exactly one run, is replaced by a new one after the run, and never outlives its launcher.
Simulated engine (no torch), so these take seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import test_worker_protocol as proto
from test_worker_protocol import kill_and_reap, sim_settings

from lora_gui.events import RunState
from lora_gui.worker.client import WorkerClient
from lora_gui.worker.processes import pid_alive
from lora_gui.worker.protocol import read_process

sim = proto.sim  # the simulated-engine fixture


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture
def warm_client(tmp_path, sim):
    c = WorkerClient(tmp_path / "runs", warm=True)
    try:
        yield c
    finally:
        warm = c._warm._proc
        c.close()
        kill_and_reap(c)
        assert warm is None or warm.poll() is not None  # close() ended and reaped the idle one


def test_start_hands_the_run_to_the_warm_trainer_and_a_new_one_follows(warm_client, tmp_path):
    c = warm_client
    first = c._warm._proc
    assert first is not None and first.poll() is None
    _wait(lambda: c._warm._is_ready(first), 60, "the warm trainer never said it is ready")
    run = c.start(sim_settings(tmp_path, "images.max_steps=3"))
    assert read_process(run.paths).pid == first.pid  # the warm process trains it: no new spawn
    assert c._warm._proc is None  # handed over: it can never get a second run
    info = run.wait(30)
    assert info.state is RunState.FINISHED, info
    assert first.wait(10) == 0  # it exits after its one run
    second = _wait(lambda: c._warm._proc, 10, "no new warm trainer after the run")
    assert second.pid != first.pid and second.poll() is None
    _wait(lambda: c._warm._is_ready(second), 60, "the second warm trainer never said it is ready")
    run2 = c.start(sim_settings(tmp_path, "images.max_steps=2", "model.output_name=sim2"))
    assert read_process(run2.paths).pid == second.pid
    assert run2.wait(30).state is RunState.FINISHED
    assert "Simulating 2 steps" in run2.paths.log.read_text()  # its output goes to its own train.log


def test_no_warm_trainer_while_a_run_trains(warm_client, tmp_path, sim):
    sim.setenv("LORA_GUI_SIMULATE_STEP_S", "0.2")
    c = warm_client
    run = c.start(sim_settings(tmp_path, "images.max_steps=10"))
    assert c.ensure_warm() is False and c._warm._proc is None
    run.stop()
    assert run.wait(30).final


def test_a_dead_warm_trainer_falls_back_to_a_cold_start(warm_client, tmp_path):
    c = warm_client
    warm = c._warm._proc
    warm.kill()
    warm.wait(10)
    run = c.start(sim_settings(tmp_path, "images.max_steps=2"))
    assert read_process(run.paths).pid != warm.pid
    assert run.wait(30).state is RunState.FINISHED


def test_a_warm_trainer_still_importing_is_not_used(warm_client, tmp_path, monkeypatch):
    """Until it has said it is ready it writes no heartbeat: Start ends it and spawns a cold one."""
    c = warm_client
    warm = c._warm._proc
    monkeypatch.setattr(c._warm, "_is_ready", lambda proc: False)
    run = c.start(sim_settings(tmp_path, "images.max_steps=2"))
    assert read_process(run.paths).pid != warm.pid
    assert warm.poll() is not None  # ended and reaped
    assert run.wait(30).state is RunState.FINISHED


LAUNCHER = textwrap.dedent("""
    import sys, time
    from lora_gui.worker.client import WorkerClient
    c = WorkerClient(sys.argv[1], warm=True)
    print(c._warm._proc.pid, flush=True)
    time.sleep(60)
""")


def test_a_warm_trainer_ends_when_its_launcher_is_killed(tmp_path, sim):
    """The GUI killed with -9 leaves no warm trainer behind: it sees end of file on its stdin."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "runs")],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        warm_pid = int(launcher.stdout.readline())
        assert pid_alive(warm_pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        _wait(lambda: not pid_alive(warm_pid), 10, "the warm trainer outlived its launcher")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        try:
            if pid_alive(warm_pid):
                os.killpg(warm_pid, signal.SIGKILL)
        except (NameError, ProcessLookupError, ValueError):
            pass
