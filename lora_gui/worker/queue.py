"""Queues of settings files, run one after another through the worker client (the runner).

One mechanism serves both queues:

- a folder the user fills (``runs.multi_run_folder``; ``lora-gui queue FOLDER``, ``queue_main``);
- the GUI's queue in ``runs_root/queue/`` (``WorkerClient.enqueue`` and friends; ``QueueRunner``).

The ``*.json`` files directly in the folder are the pending items, run in sorted order, one at a
time; files with ``launch.gpu_per_run`` run side by side, each on a free GPU of its own. A finished
file moves to ``complete/``; a failed or invalid one to ``failed/`` with ``<name>.reason.txt``; the
queue goes on. The file being trained stays in the folder and ``.queue-current.json`` names it and
its run, so a restarted queue re-attaches to a trainer that is still running (or takes the result
of one that ended meanwhile) and runs a file again whose trainer vanished with the queue.
The folder's files (add, list, reorder, remove, load) live in queue_files.py, which the client
uses too. No torch here: the GUI imports it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lora_gui.atomic import write_json
from lora_gui.events import RunState, describe
from lora_gui.settings import SettingsError, TrainingSettings
from lora_gui.settings.io import save_settings_copy
from lora_gui.worker.client import Run, RunActiveError, RunInfo, WorkerClient
from lora_gui.worker.launch import WAIT, find_gpus, gpu_for
from lora_gui.worker.protocol import final_event, new_run_id
from lora_gui.worker.queue_files import (
    COMPLETE_DIR,
    CURRENT_FILE,
    FAILED_DIR,
    current_entries,
    file_away,
    load_queue_file,
    pending_files,
)


class FolderQueue:
    """Runs the settings files of one folder in order; ``tick()`` does the next thing. One run at a
    time, except files with ``launch.gpu_per_run``: each starts on a free GPU of its own beside the
    others (``launch.gpu_for``). ``gpus`` (GPU numbers) is for tests; by default NVML's."""

    def __init__(self, folder: str | os.PathLike, client: WorkerClient,
                 gpus: Sequence[int] | None = None):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.paused = False
        self.finished: list[str] = []
        self.failed: list[str] = []
        self._first_tick = True
        self._gpus = list(gpus) if gpus is not None else None
        self._no_gpu_said = False

    @property
    def gpus(self) -> list[int]:
        if self._gpus is None:  # asked once: NVML's answer does not change while the queue runs
            self._gpus = [g.index for g in find_gpus()]
        return self._gpus

    @property
    def current_runs(self) -> list[Run]:
        runs = []
        for entry in current_entries(self.folder):
            try:
                runs.append(self.client.attach(entry["run_id"]))
            except (FileNotFoundError, ValueError):
                continue
        return runs

    def idle(self) -> bool:
        """Nothing running from this queue and nothing left to run."""
        return not current_entries(self.folder) and not pending_files(self.folder)

    def clear_current(self, run_id: str | None = None) -> None:
        """Forget the run ``run_id`` (its file stays queued unless filed away), or every run."""
        kept = [e for e in current_entries(self.folder) if run_id is not None and e["run_id"] != run_id]
        if kept:
            write_json(self.folder / CURRENT_FILE, {"runs": kept}, indent=1)
        else:
            (self.folder / CURRENT_FILE).unlink(missing_ok=True)

    def tick(self) -> str | None:
        """Take the results of the current runs that ended, then start the next files that may
        start now. Returns lines saying what happened, or None."""
        first, self._first_tick = self._first_tick, False
        lines = [self._check_current(entry, resumed=first)
                 for entry in current_entries(self.folder)]
        if not self.paused:
            lines += self._start_ready()
        return "\n".join(line for line in lines if line) or None

    def _start_ready(self) -> list[str]:
        """Start the pending files, in order, while the next one may start (``launch.gpu_for``)."""
        lines: list[str] = []
        running = {e["file"] for e in current_entries(self.folder)}
        busy = None
        for file in [f for f in pending_files(self.folder) if f.name not in running]:
            try:
                settings = load_queue_file(file)
            except SettingsError as exc:
                self.failed.append(file.name)
                file_away(file, self.folder / FAILED_DIR, f"Invalid settings: {exc}")
                lines.append(f"{file.name}: invalid settings: {exc}")
                continue
            busy = busy or self.client.busy()
            gpu = gpu_for(settings.launch, self.gpus, busy)
            if gpu == WAIT:
                break
            lines.append(self._start(file, settings, gpu))
            busy.hold(gpu)  # None: every GPU, so nothing else starts now
            self._say_no_gpu(settings, lines)
        return lines

    def _say_no_gpu(self, settings: TrainingSettings, lines: list[str]) -> None:
        if settings.launch.gpu_per_run and not self.gpus and not self._no_gpu_said:
            self._no_gpu_said = True
            lines.append("launch.gpu_per_run: this machine has no GPU, so the queued runs train "
                         "one at a time.")

    def _check_current(self, current: dict, resumed: bool) -> str | None:
        file = self.folder / current["file"]
        try:
            run = self.client.attach(current["run_id"])
        except (FileNotFoundError, ValueError):  # the queue died before the trainer was spawned
            self.clear_current(current["run_id"])  # its file is run (again)
            return None
        info = run.info()
        if info.active:
            return None
        self.clear_current(current["run_id"])
        vanished = info.state == RunState.FAILED and final_event(run.paths.events) is None
        if resumed and vanished:
            return f"{file.name}: its trainer ended with the queue ({info.message}); running it again."
        if not file.exists():
            return f"{file.name}: {info.state.value} (the file was removed from the queue meanwhile)."
        return self._file_done(file, info)

    def _file_done(self, file: Path, info: RunInfo) -> str:
        if info.state == RunState.FINISHED:
            self.finished.append(file.name)
            file_away(file, self.folder / COMPLETE_DIR)
            return f"{file.name}: finished, {info.output_path}"
        if info.state == RunState.STOPPED:
            reason = (f"Stopped at step {info.step} of {info.total_steps} before the end; the LoRA "
                      f"of that step is {info.output_path}. Put this file back into the queue "
                      "folder to train it again.")
        else:
            reason = info.message or "The run failed."
        reason += f"\n\nRun folder: {info.run_dir}"
        if info.detail:
            reason += f"\n\n{info.detail}"
        self.failed.append(file.name)
        file_away(file, self.folder / FAILED_DIR, reason)
        return f"{file.name}: {info.state.value}: {info.message}"

    def _start(self, file: Path, settings: TrainingSettings, gpu: int | None) -> str:
        if settings.runs.save_json_only:
            target = save_settings_copy(settings)
            self.finished.append(file.name)
            file_away(file, self.folder / COMPLETE_DIR)
            return f"{file.name}: saved the settings to {target} (save_json_only: not trained)"
        run_id = new_run_id(settings.model.output_name)
        # Named before the spawn: a queue that dies right after it finds the run again.
        entry = {"file": file.name, "run_id": run_id, "runs_root": str(self.client.runs_root),
                 "gpu": gpu}
        write_json(self.folder / CURRENT_FILE,
                   {"runs": [*current_entries(self.folder), entry]}, indent=1)
        try:
            self.client.start(settings, run_id=run_id, source=str(file), gpu=gpu)
        except RunActiveError:
            self.clear_current(run_id)
            return f"{file.name}: waiting, another run is active"
        return f"{file.name}: started run {run_id}" + (f" on GPU {gpu}" if gpu is not None else "")


def run_queue_folder(folder: str | os.PathLike, runs_root: str | os.PathLike, *,
                     python: str = sys.executable, poll_s: float = 0.5,
                     log: Callable[[str], None] = print) -> FolderQueue:
    """Run every settings file of ``folder`` (see the module docstring) until none is left.
    Returns the queue (``.finished`` and ``.failed`` list the file names of this call)."""
    queue = FolderQueue(folder, WorkerClient(runs_root, python=python))
    streamed: dict[str, int] = {}  # run id -> events read
    while True:
        message = queue.tick()
        for line in (message or "").splitlines():
            log(f"queue: {line}")
        runs = queue.current_runs
        for run in runs:
            events, streamed[run.run_id] = run.poll(streamed.get(run.run_id, 0))
            for event in events:  # runs side by side (gpu_per_run): each line names its run
                _log_event(event, log, f"[{run.run_id}] " if len(runs) > 1 else "")
        if not runs and queue.idle():
            return queue
        time.sleep(poll_s)


def _log_event(event, log: Callable[[str], None], prefix: str = "") -> None:
    line = describe(event)
    if line is not None:
        log(f"  {prefix}{line}")


def _stop_current(queue: FolderQueue, grace_s: float) -> None:
    for run in queue.current_runs:
        if run.info().active:
            print(f"queue: stopping {run.run_id} (it saves a LoRA at the current step)...",
                  flush=True)
            run.force_stop(grace_s)
    queue.clear_current()  # the files stay in the folder: the next start runs them again


def queue_main(argv: list[str] | None = None) -> int:
    """``lora-gui queue FOLDER [--runs-root DIR]``. Ctrl-C/SIGTERM stops the current run (its file
    stays queued); exit status 0 when every file finished, 1 when some failed."""
    parser = argparse.ArgumentParser(
        prog="lora-gui queue", description="Train every settings JSON file of a folder, one after "
        "another in sorted order (finished files move to complete/, failed ones to failed/); files "
        "with launch.gpu_per_run train side by side, each on a free GPU of its own.")
    parser.add_argument("folder")
    parser.add_argument("--runs-root", default=os.environ.get("LORA_GUI_RUNS", "runs"),
                        help="where the run folders go (default: $LORA_GUI_RUNS or ./runs)")
    parser.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2

    def interrupted(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    queue = FolderQueue(args.folder, WorkerClient(args.runs_root))
    try:
        queue = run_queue_folder(args.folder, args.runs_root, poll_s=args.poll,
                                 log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        _stop_current(queue, grace_s=30)
        return 130
    print(f"queue: {len(queue.finished)} finished, {len(queue.failed)} failed", flush=True)
    return 1 if queue.failed else 0


# --- the GUI's queue ---------------------------------------------------------------------------

class QueueRunner:
    """The GUI's queue (``runs_root/queue/`` by default): call ``tick()`` from a timer, or
    ``start()`` a background thread that ticks every ``interval_s``."""

    def __init__(self, client: WorkerClient, folder: str | os.PathLike | None = None,
                 gpus: Sequence[int] | None = None):
        self.queue = FolderQueue(folder or client.queue_folder, client, gpus)
        self.last_message: str | None = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    @property
    def paused(self) -> bool:
        return self.queue.paused

    def pause(self) -> None:
        """Start nothing new (the current run goes on)."""
        self.queue.paused = True

    def resume(self) -> None:
        self.queue.paused = False

    def tick(self) -> str | None:
        message = self.queue.tick()
        if message:
            self.last_message = message
        return message

    def start(self, interval_s: float = 1.0) -> None:
        if self._thread is not None:
            return
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="queue",
                                        daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._halt.wait(interval_s):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the GUI's queue must not die silently
                self.last_message = f"The queue hit an error and goes on: {exc}"

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


if __name__ == "__main__":
    sys.exit(queue_main())
