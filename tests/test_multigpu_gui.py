"""A 2-process run from the page (issue 15): the page's Start over HTTP against a real server (the
events the browser calls, ``tests/support/gui_http.py``), the real engine on the tiny demo with 2
gloo processes; the page shows its loss. Then the GUI server is killed with -9 during the run.

The trainer does not watch the web process (the run folder is the contract, worker/child.py): a
killed GUI leaves the run going, not orphaned: the restarted GUI attaches to it and shows its loss,
its Stop reaches both ranks at the same step, and then no process of the run remains (launcher,
ranks) and none is a zombie.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
from gui_http import GuiServer, Page  # noqa: E402
from test_multigpu import _ranks_step, _run_processes  # noqa: E402

pytestmark = pytest.mark.slow


def _start_dependency(page: Page) -> dict:
    """Start's click runs the summary of the settings first, then (``.then``) the start itself:
    the browser triggers the second when the first completes, and so does this test."""
    first = page.dependency("run-start", "click")
    return next(d for d in page.config["dependencies"] if d.get("trigger_after") == first["id"])


def _tick_dependency(page: Page) -> dict:
    """The run panel's timer: the page polls it while a run is active."""
    status = page.component_id("run-status")
    return next(d for d in page.config["dependencies"]
                if any(t[1] == "tick" for t in d["targets"]) and status in d["outputs"])


def _call(page: Page, dep: dict, values: dict, trigger: str | None, timeout: float = 120) -> dict:
    overrides = {page.component_id(k): v for k, v in values.items()}
    data = [overrides.get(i, page.by_id[i]["props"].get("value")) for i in dep["inputs"]]
    trigger_id = page.component_id(trigger) if trigger else None
    return dict(zip(dep["outputs"], page._join(dep["id"], data, trigger_id, timeout), strict=False))


def _losses(page: Page, outputs: dict) -> list:
    plot = outputs.get(page.component_id("run-plot"))
    value = plot.get("value") if isinstance(plot, dict) else None
    return [row for row in (value or {}).get("data", []) if row[2] == "loss"] if value else []


def _poll_losses(page: Page, at_least: int, timeout: float) -> list:
    """Tick the page's timer (as the browser does) until its plot shows ``at_least`` losses."""
    tick, seen = _tick_dependency(page), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = _losses(page, _call(page, tick, {}, None)) or seen
        if len(seen) >= at_least:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"the page showed {len(seen)} loss points in {timeout:.0f} s")


def _reap(runs: Path, root: Path) -> None:
    for record in runs.glob("*/process.json"):
        try:
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for proc in _run_processes(root):
        proc.kill()


def test_the_page_starts_two_processes_shows_the_loss_and_a_killed_gui_leaves_none(demo, tmp_path):
    cwd = tmp_path / "gui"
    cwd.mkdir()
    runs = cwd / "runs"
    values = {"field-model-base_model": str(demo.model_dir),
              "field-model-img_folder": str(demo.dataset_dir),
              "field-model-output_folder": str(tmp_path / "out"),
              "field-launch-multi_gpu": True, "field-launch-num_processes": 2,
              "field-training-batch_size": 1, "field-images-max_steps": 3000,
              "field-samples-sample_every_n_epochs": 0, "field-images-save_every_n_epochs": 0,
              "field-training-validation_split": 0, "field-training-validation_every_n_steps": 0}
    env = {"OMP_NUM_THREADS": "1"}
    try:
        with GuiServer(cwd, "--no-queue", "--preset", "demo-tiny-cpu", env=env) as server:
            page = server.page()
            _call(page, _start_dependency(page), values, "run-start")
            [run_dir] = [p.parent for p in runs.glob("*/settings.json")]
            record = json.loads((run_dir / "process.json").read_text())
            assert record["argv"][1:3] == ["-m", "accelerate.commands.launch"]
            assert record["argv"][record["argv"].index("--num_processes") + 1] == "2"
            losses = _poll_losses(page, at_least=2, timeout=300)
            assert [row[0] for row in losses[:2]] == [1, 2]  # steps 1, 2 ... on the page's chart
            assert all(isinstance(row[1], float) and row[1] > 0 for row in losses)
            ranks = {p.name: int(p.read_text().split()[0]) for p in (run_dir / "ranks").glob("*.pid")}
            assert sorted(ranks) == ["0.pid", "1.pid"]
            pids = [record["pid"], *ranks.values()]  # the launcher and its two ranks
            server.proc.send_signal(signal.SIGKILL)  # the GUI dies during the 2-process run
            server.proc.wait(10)
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "running"  # it goes on: the next GUI attaches to it
        with GuiServer(cwd, "--no-queue", "--preset", "demo-tiny-cpu", env=env) as again:
            page = again.page()
            shown = _losses(page, page.load())
            assert len(shown) >= len(losses)  # the restarted page draws the run's whole history
            page.call("run-stop")  # Stop (saves) on the restarted page
            deadline = time.monotonic() + 120
            while json.loads(page.api("run_status", run_dir.name))["state"] in ("running", "stopping") \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            final = json.loads(page.api("run_status", run_dir.name))
            assert final["state"] == "stopped", final
        step = final["step"]
        assert _ranks_step(type("Run", (), {"run_dir": run_dir})) == {1: ("stopped", step)}
        assert [p.name for p in (tmp_path / "out").glob("*.safetensors")] == [
            f"demo-lora-step{step:06d}.safetensors"]
        deadline = time.monotonic() + 15  # rank 0 writes the end just before the processes exit
        while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in pids if psutil.pid_exists(pid)] == []  # not even a zombie: reaped
        assert _run_processes(runs) == []
    finally:
        _reap(runs, tmp_path)
