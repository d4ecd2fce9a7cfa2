"""The page's link to the worker: start, attach, poll, command. No gradio here.

The web process never imports torch: the demo model is built by a child process
(``python -m lora_gui.cli demo``) and training runs in the worker's own process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lora_gui.events import ForceStop, SampleNow, SaveNow, Stop
from lora_gui.settings import TrainingSettings
from lora_gui.ui.runview import RunView

FINAL_STATES = ("finished", "stopped", "failed")
DEMO_BUILD_TIMEOUT_S = 600


def state_name(state: Any) -> str:
    return str(getattr(state, "value", state) or "")


class DemoBuildError(RuntimeError):
    pass


def demo_dir_for(settings: TrainingSettings) -> Path | None:
    """The demo folder to build when the settings point at a demo layout that is missing
    (``X/model`` as base model and ``X/dataset`` as image folder), else None."""
    base = Path(settings.model.base_model)
    if not settings.model.base_model or base.exists() or base.name != "model":
        return None
    if Path(settings.model.img_folder).resolve() != (base.parent / "dataset").resolve():
        return None
    return base.parent


def build_demo(out_dir: Path, started: Any = None) -> str:
    """Build the demo model and dataset in a child process (it imports torch; this process must
    not); returns its output. It is built in a hidden sibling folder and renamed into place when
    complete, so an interrupted build never leaves a half-written model behind. ``started(popen)``
    is told the process so that a shutdown can end it. Raises ``DemoBuildError`` with a sentence."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)  # ours, left by an interrupted build
    argv = [sys.executable, "-m", "lora_gui.cli", "demo", "--out", str(staging)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    if started is not None:
        started(proc)
    try:
        out, _ = proc.communicate(timeout=DEMO_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise DemoBuildError(f"Building the demo model in {out_dir} took more than "
                             f"{DEMO_BUILD_TIMEOUT_S} s and was stopped.") from None
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise DemoBuildError(f"Building the demo model in {out_dir} failed: {tail}")
    try:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DemoBuildError(f"The demo was built but could not be moved to {out_dir} ({exc}): "
                             "remove or rename that folder and press Start again.") from None
    return out


class Bridge:
    """One per app (not per page): the worker client and the runs attached so far."""

    def __init__(self, client: Any):
        self.client = client
        self._runs: dict[str, Any] = {}
        self._poll_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._demo_lock = threading.Lock()
        self._last_active_check = 0.0
        self._last_active: str | None = None
        self._demo_proc: subprocess.Popen | None = None
        self._demo_thread: threading.Thread | None = None

    # --- runs ----------------------------------------------------------------------------------

    def run(self, run_id: str):
        with self._lock:
            if run_id not in self._runs:
                self._runs[run_id] = self.client.attach(run_id)
            return self._runs[run_id]

    def _poll_lock(self, run_id: str) -> threading.Lock:
        with self._lock:
            return self._poll_locks.setdefault(run_id, threading.Lock())

    def start(self, settings: TrainingSettings) -> str:
        run = self.client.start(settings)
        run_id = run.run_id
        with self._lock:
            self._runs[run_id] = run
        self._last_active, self._last_active_check = run_id, time.monotonic()
        return run_id

    def active_id(self, max_age_s: float = 0.0) -> str | None:
        """The active run's id; cached for ``max_age_s`` (the idle poll asks often)."""
        now = time.monotonic()
        if max_age_s and now - self._last_active_check < max_age_s:
            return self._last_active
        try:
            self.client.reconcile()
        except Exception:  # noqa: BLE001 - a broken run folder must not break the page
            pass
        run = self.client.active_run()
        self._last_active = run.run_id if run is not None else None
        self._last_active_check = now
        if run is not None:
            with self._lock:
                self._runs.setdefault(self._last_active, run)
        return self._last_active

    def latest_id(self) -> str | None:
        """The active run, else the most recently created one (a reload shows its result)."""
        active = self.active_id()
        if active:
            return active
        runs = sorted(self.client.list_runs(), key=lambda r: r.created or 0)
        return runs[-1].run_id if runs else None

    def queue_pending(self) -> bool:
        """Whether the GUI's queue holds settings waiting for their turn."""
        try:
            return bool(self.client.queue_items())
        except Exception:  # noqa: BLE001 - an unreadable queue folder is an empty queue here
            return False

    def ensure_demo(self, settings: TrainingSettings) -> str | None:
        """Build the demo model if the settings need it; returns a sentence when it was built."""
        target = demo_dir_for(settings)
        if target is None:
            return None
        with self._demo_lock:
            if Path(settings.model.base_model).exists():
                return None  # built meanwhile (by the prebuild at startup)
            build_demo(target, started=self._remember_demo)
        return f"Built the demo model and dataset in {target}."

    def _remember_demo(self, proc: subprocess.Popen) -> None:
        self._demo_proc = proc

    def prebuild_demo(self, settings: TrainingSettings) -> bool:
        """Start building the demo in the background when the settings point at a missing one, so
        that a newcomer's first Start does not wait for it. Start waits if it is not done yet."""
        if demo_dir_for(settings) is None:
            return False

        def build():
            try:
                self.ensure_demo(settings)
            except DemoBuildError:
                pass  # Start builds again and shows the sentence

        self._demo_thread = threading.Thread(target=build, name="demo-build", daemon=True)
        self._demo_thread.start()
        return True

    def close(self) -> None:
        """End a demo build still running (shutdown)."""
        proc = self._demo_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._demo_thread is not None:
            self._demo_thread.join(timeout=10)

    # --- polling -------------------------------------------------------------------------------

    def attach_view(self, run_id: str) -> RunView:
        """A fresh view of a run with its whole history (page load, reload, restart)."""
        view = RunView(run_id=run_id, state="starting")
        self.poll(view)
        return view

    def poll(self, view: RunView) -> bool:
        """Fold new events into ``view``; True when something arrived. When the events say the run
        is still going but the worker has ended (killed, crashed), the view fails with the
        worker's sentence."""
        if not view.run_id:
            return False
        run = self.run(view.run_id)
        with self._poll_lock(view.run_id):  # a Run keeps one byte-offset cursor for all pages
            events, view.cursor = run.poll(view.cursor)
        view.apply(events)
        if not events and view.active:
            info = run.info()
            state = state_name(info.state)
            if state in FINAL_STATES:
                with self._poll_lock(view.run_id):  # the last lines may have landed meanwhile
                    events, view.cursor = run.poll(view.cursor)
                view.apply(events)
                if view.active:
                    view.fail(info.message or f"The trainer ended ({state}) without a result.")
            elif state == "stopping" and view.state != "stopping":
                view.set_note("saving the LoRA at the current step…", "stopping")
            if not view.output_name:
                view.output_name = info.output_name or ""
        return bool(events)

    def command(self, run_id: str, what: str) -> None:
        run = self.run(run_id)
        if what == "stop":
            run.stop()
        elif what == "force_stop":
            # Waits for the grace period, then signals the trainer: not in the page's request.
            threading.Thread(target=run.force_stop, name=f"force-stop-{run_id}", daemon=True).start()
        else:
            run.send({"save_now": SaveNow(), "sample_now": SampleNow(), "stop": Stop(),
                      "force": ForceStop()}[what])
