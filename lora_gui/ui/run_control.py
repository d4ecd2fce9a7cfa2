"""``RunController``: the page's side of the worker. It starts runs, attaches to them, folds their
events into ``RunView``s, sends them commands and builds the demo model on first use. No gradio here.

The web process never imports torch: the demo model is built by a child process and training runs in
the worker's own process.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from lora_gui.events import Command, ForceStop, RunState
from lora_gui.settings import TrainingSettings
from lora_gui.ui.demo_build import DemoBuildError, build_demo
from lora_gui.ui.runview import RunView
from lora_gui.worker.demo import demo_dir_for, demo_family
from lora_gui.worker.processes import terminate_group

END_WAIT_S = 10  # how long a shutdown waits for a demo build to end before killing it


class RunController:
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

    def command(self, run_id: str, command: Command) -> None:
        """Send ``command`` to the run. A ``ForceStop`` waits for its grace period before it signals
        the trainer, so it runs in a thread, not in the page's request."""
        run = self.run(run_id)
        if isinstance(command, ForceStop):
            threading.Thread(target=run.force_stop, args=(command.grace_s,),
                             name=f"force-stop-{run_id}", daemon=True).start()
        else:
            run.send(command)

    # --- the demo model ------------------------------------------------------------------------

    def ensure_demo(self, settings: TrainingSettings) -> str | None:
        """Build the demo model if the settings need it; returns a sentence when it was built."""
        target = demo_dir_for(settings)
        if target is None:
            return None
        with self._demo_lock:
            if Path(settings.model.base_model).exists():
                return None  # built meanwhile (by the prebuild at startup)
            build_demo(target, started=self._remember_demo, family=demo_family(settings))
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
            terminate_group(proc.pid, popen=proc, wait_s=END_WAIT_S)
        if self._demo_thread is not None:
            self._demo_thread.join(timeout=END_WAIT_S)

    # --- following a run -----------------------------------------------------------------------

    def attach_view(self, run_id: str) -> RunView:
        """A fresh view of a run with its whole history (page load, reload, restart)."""
        view = RunView(run_id=run_id, state=RunState.STARTING)
        self.poll(view)
        return view

    def poll(self, view: RunView) -> bool:
        """Fold new events into ``view``; True when something arrived. The run folder's reconciled
        status is the one source of truth for whether a run goes on: when the events say it does
        but the worker has ended (killed, crashed), the view fails with the worker's sentence."""
        if not view.run_id:
            return False
        run = self.run(view.run_id)
        events = self._read(run, view)
        if view.active:  # also after new events: a fresh view reads a killed run's whole history
            self._check_worker(run, view)
        return bool(events)

    def _read(self, run: Any, view: RunView) -> list:
        with self._poll_lock(view.run_id):  # a Run keeps one byte-offset cursor for all pages
            events, view.cursor = run.poll(view.cursor)
        view.apply(events)
        return events

    def _check_worker(self, run: Any, view: RunView) -> None:
        """No new events for an active view: ask the run folder whether the trainer has ended or is
        stopping (a Stop from another page or the command line)."""
        info = run.info()
        state = RunState.of(info.state)
        if state.final:
            self._read(run, view)  # the last lines may have landed meanwhile
            if view.active and state is RunState.FAILED:
                view.fail(info.message or "The trainer ended without a result.")
            elif view.active:  # ended by the worker itself, e.g. save_json_only: no events
                view.end(state, info.message or f"The run ended ({state.value}).")
        elif state is RunState.STOPPING and view.state is not RunState.STOPPING:
            view.set_note("saving the LoRA at the current step…", RunState.STOPPING)
        if not view.output_name:
            view.output_name = info.output_name or ""
