"""The web process's handle on training runs: start, attach, poll, stop, list, reconcile.

Imports no torch, diffusers or gradio (a test checks it in a subprocess): the web process must start
fast and never touch CUDA. Everything goes through the run folder (see protocol.py), so a new
``WorkerClient`` on the same ``runs_root`` (a restarted GUI) sees exactly what the old one saw, and a
run is never left "running" after its trainer is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_gui.events import Command, Event, RunState, Stop
from lora_gui.settings import TrainingSettings
from lora_gui.settings.io import save_settings, save_settings_copy
from lora_gui.worker import queue_files
from lora_gui.worker.failures import explain_failure, last_lines
from lora_gui.worker.launch import (
    Busy,
    find_gpus,
    gpu_ids_problem,
    trainer_argv,
    trainer_env,
)
from lora_gui.worker.processes import pid_alive, process_created, terminate_group
from lora_gui.worker.protocol import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_STALE_S,
    DamagedFile,
    LineCursor,
    ProcessRecord,
    RunPaths,
    Status,
    append_command,
    check_run_id,
    final_event,
    finished_message,
    load_status,
    new_run_id,
    read_events,
    read_process,
    read_status,
    tail_text,
    write_process,
    write_status,
)
from lora_gui.worker.warm import WarmTrainer

QUEUE_DIR = "queue"  # runs_root/queue/: the GUI's queue of settings files (queue_files.py)
WARM_LOG = "warm-trainer.log"  # runs_root/: what a warm trainer prints before it gets a run
TOOLS_DIR = "tools"  # runs_root/tools/: the LoRA tools' run folders (one tool at a time, beside training)


class RunActiveError(RuntimeError):
    """A run is still starting, running or stopping: one trainer at a time."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    run_dir: Path
    state: RunState
    pid: int | None
    created: float
    ended: float | None
    message: str | None  # a sentence for the user (why it failed, where the LoRA is), or None
    output_path: str | None
    output_name: str
    step: int
    total_steps: int
    detail: str = ""  # the last traceback or log lines, for a "details" panel
    exit_code: int | None = None
    source: str = ""  # the queue file the run came from, if any
    damaged: bool = False  # status.json is unreadable or not what a writer writes: listed, not used

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def final(self) -> bool:
        return self.state.final

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    @classmethod
    def from_status(cls, paths: RunPaths, s: Status) -> RunInfo:
        return cls(run_id=s.run_id, run_dir=paths.root, state=s.state, pid=s.pid, created=s.created,
                   ended=s.ended, message=s.message, output_path=s.output_path,
                   output_name=s.output_name, step=s.step, total_steps=s.total_steps,
                   detail=s.detail, exit_code=s.exit_code, source=s.source)


def launch_argv(run_dir: Path, python: str = sys.executable,
                prefix: Sequence[str] = ()) -> list[str]:
    """The trainer's command line, an argv list (never a shell string). A multi-GPU mode prefixes
    it unchanged, e.g. ``["accelerate", "launch", "--num_processes", "2", "--no_python"]``."""
    return [*prefix, python, "-m", "lora_gui.worker", str(run_dir)]


# --- runs --------------------------------------------------------------------------------------

class Run:
    """One run folder. Cheap to create; every method reads the folder afresh."""

    def __init__(self, client: WorkerClient, paths: RunPaths):
        self._client = client
        self.paths = paths
        self.run_id = paths.run_id
        self.run_dir = paths.root
        # Shared per run id by the client, so a GUI that attaches on every tick reads only new lines.
        self._cursor = client._cursors.setdefault(paths.run_id, LineCursor())

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    def poll(self, since: int = 0) -> tuple[list[Event], int]:
        """The events after the first ``since`` lines of events.jsonl, and the new cursor."""
        return read_events(self.paths.events, since, self._cursor)

    def send(self, command: Command) -> None:
        append_command(self.paths, command)

    def stop(self) -> None:
        """Ask the trainer to save a LoRA (and state) at the current step and end."""
        self.send(Stop())

    def force_stop(self, grace_s: float = 10) -> RunInfo:
        """Stop; if the trainer has not ended after ``grace_s``, SIGTERM it, then SIGKILL it."""
        self.stop()
        info = self.wait(grace_s)
        if info.final:
            return info
        status = read_status(self.paths)
        pid = self._client._group_of(self.paths, status)
        popen = self._client._popens.get(self.run_id)
        created = status.pid_created if status and status.pid == pid else None
        if pid is not None:
            terminate_group(pid, created, popen, wait_s=5.0)
        info = self.info()
        if info.final:
            return info
        return self._client._end(self.paths, RunState.FAILED, exit_code=None, message=(
            f"The trainer did not answer Stop within {grace_s:g} s and was ended by force; LoRAs "
            "saved before that are kept in the output folder."))

    def info(self) -> RunInfo:
        """The status, reconciled with reality (is the process alive? is its heartbeat fresh?)."""
        return self._client._reconcile(self.paths)

    def wait(self, timeout: float) -> RunInfo:
        """Until the run is finished, stopped or failed, or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if info.final or time.monotonic() >= deadline:
                return info
            time.sleep(0.1)


class WorkerClient:
    """Starts trainer processes and watches run folders under ``runs_root``."""

    def __init__(self, runs_root: str | os.PathLike, python: str = sys.executable,
                 launch_prefix: Sequence[str] = (), stale_after_s: float = HEARTBEAT_STALE_S,
                 warm: bool = False):
        self.runs_root = Path(runs_root).resolve()
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.launch_prefix = tuple(launch_prefix)
        self.stale_after_s = stale_after_s  # a live trainer silent this long is hung
        # Trainers this client spawned: their exit codes say how they ended (-9 = SIGKILL).
        self._popens: dict[str, subprocess.Popen] = {}
        self._cursors: dict[str, LineCursor] = {}
        self._start_lock = threading.Lock()  # check "no active run" and spawn as one step
        # warm: keep one trainer that has imported the engine waiting for Start (warm.py); not
        # under a launch prefix (accelerate launch starts its own ranks).
        self._closed = False
        self._warm = WarmTrainer(python, self.runs_root / WARM_LOG) \
            if warm and not self.launch_prefix else None
        self.ensure_warm()

    # -- starting ---------------------------------------------------------------------------

    def start(self, settings: TrainingSettings, *, run_id: str | None = None,
              source: str = "", gpu: int | None = None) -> Run:
        """Write the run folder and spawn the trainer; returns at once.

        With ``runs.save_json_only`` only the settings JSON is written (the run ends at once as
        finished, its message naming the file). Raises RunActiveError while another run is active;
        with ``gpu`` (the queue's ``gpu_per_run``) the trainer sees that GPU alone
        (CUDA_VISIBLE_DEVICES) and may run beside other such runs, never on a GPU one holds.
        """
        run_id = check_run_id(run_id or new_run_id(settings.model.output_name))
        if settings.runs.save_json_only:
            return self._save_json_only(settings, run_id, source)
        with self._start_lock:
            return self._spawn(settings, run_id, source, gpu)

    def start_tool(self, job, *, run_id: str | None = None) -> Run:
        """Write a tool run folder (``tool.json``, a job of settings/tools.py) and spawn the worker
        on it; returns at once. Its inputs must exist (SettingsError naming the field otherwise)."""
        from lora_gui.atomic import write_json
        from lora_gui.settings.tools import job_document

        job.check_inputs()
        run_id = check_run_id(run_id or new_run_id(job.kind))
        with self._start_lock:
            self._refuse_if_active()
            paths = RunPaths(self.runs_root / run_id)
            paths.root.mkdir(parents=True, exist_ok=False)
            write_json(paths.tool, job_document(job), indent=1)
            paths.events.touch()
            paths.inbox.touch()
            write_status(paths, Status(run_id=run_id, state=RunState.STARTING, created=time.time(),
                                       output_name=job.kind))
            return self._launch(paths)

    def tools_client(self) -> WorkerClient:
        """The client of the tools' run folders (``runs_root/tools``): a tool may run beside training."""
        return WorkerClient(self.runs_root / TOOLS_DIR, self.python, stale_after_s=self.stale_after_s)

    def _refuse_if_active(self) -> None:
        active = self.active_run()
        if active is not None:
            info = active.info()
            raise RunActiveError(f"The run {info.run_id} is still {info.state.value}: stop it or "
                                 "wait for it to end before starting another.")

    def busy(self) -> Busy:
        """What the active runs hold: the GPUs of ``gpu_per_run`` runs (process.json); any other
        active run (or one whose trainer is not recorded yet) holds every GPU."""
        busy = Busy()
        for info in self.list_runs():
            if info.active:
                record = read_process(RunPaths(info.run_dir))
                busy.hold(record.gpu if record is not None else None)
        return busy

    def _spawn(self, settings: TrainingSettings, run_id: str, source: str,
               gpu: int | None = None) -> Run:
        if gpu is None:
            self._refuse_if_active()
        else:
            busy = self.busy()
            if busy.exclusive or gpu in busy.taken:
                raise RunActiveError(f"GPU {gpu} is not free: another run holds it (or every GPU).")
        return self._launch(self._new_run_folder(settings, run_id, source), settings, gpu)

    def _launch(self, paths: RunPaths, settings: TrainingSettings | None = None,
                gpu: int | None = None) -> Run:
        run_id = paths.run_id
        argv = trainer_argv(paths.root, settings, self.python, self.launch_prefix)
        launched = argv[:3] == [self.python, "-m", "accelerate.commands.launch"]
        gpus = find_gpus() if settings is not None and (launched or settings.launch.gpu_ids) else []
        problem = gpu_ids_problem(settings.launch.gpu_ids, gpus) if settings is not None else None
        if problem:
            self._end(paths, RunState.FAILED, exit_code=None, message=problem)
            return Run(self, paths)
        # A warm trainer is a plain `python -m lora_gui.worker` that sees every GPU: an accelerate
        # launch, or a run on one GPU of its own, starts cold.
        warm = self._warm is not None and not launched and gpu is None
        popen = self._warm.take(paths.root) if warm else None
        if popen is not None:
            argv = self._warm.argv
        else:
            env = trainer_env(settings, gpus) if launched else {}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            popen = self._spawn_cold(paths, argv, env)
            if popen is None:
                return Run(self, paths)
        self._popens[run_id] = popen
        # Reap the trainer the moment it exits: a finished run's status is final, so nothing else
        # would poll it and it would stay a zombie under this process. Popen keeps the exit code.
        # With a warm pool, a new warm trainer starts once this one has exited.
        threading.Thread(target=self._reap_and_rewarm, args=(popen,), name=f"reap-{run_id}",
                         daemon=True).start()
        write_process(paths, ProcessRecord(pid=popen.pid, argv=argv, spawned=time.time(),
                                           launcher_pid=os.getpid(),
                                           created=process_created(popen.pid), gpu=gpu))
        return Run(self, paths)

    def _reap_and_rewarm(self, popen: subprocess.Popen) -> None:
        popen.wait()
        if self._warm is not None and not self._closed:
            self.ensure_warm()

    def _spawn_cold(self, paths: RunPaths, argv: list[str],
                    extra_env: dict[str, str] | None = None) -> subprocess.Popen | None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        try:
            with open(paths.log, "ab") as log:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)
        except OSError as exc:
            self._end(paths, RunState.FAILED, exit_code=None,
                      message=f"Could not start the trainer ({argv[0]}): {exc}")
            return None
        return popen

    def ensure_warm(self) -> bool:
        """With ``warm``: start a warm trainer unless one is waiting or a trainer this client
        spawned is still running (it would compete with the run). Cheap: call it on every poll."""
        if self._warm is None or self._closed or any(p.poll() is None for p in self._popens.values()):
            return False
        return self._warm.ensure()

    def _new_run_folder(self, settings: TrainingSettings, run_id: str, source: str,
                        state: RunState = RunState.STARTING) -> RunPaths:
        paths = RunPaths(self.runs_root / run_id)
        paths.root.mkdir(parents=True, exist_ok=False)
        save_settings(settings, paths.settings)
        paths.events.touch()
        paths.inbox.touch()
        write_status(paths, Status(run_id=run_id, state=state, created=time.time(),
                                   output_name=settings.model.output_name, source=source))
        return paths

    def _save_json_only(self, settings: TrainingSettings, run_id: str, source: str) -> Run:
        paths = self._new_run_folder(settings, run_id, source)
        target = save_settings_copy(settings)
        self._end(paths, RunState.FINISHED, exit_code=None, output_path=str(target),
                  message=f"Saved the settings to {target} (save_json_only is on: nothing was "
                          "trained).")
        return Run(self, paths)

    # -- finding runs -----------------------------------------------------------------------

    def attach(self, run_id: str) -> Run:
        paths = RunPaths(self.runs_root / check_run_id(run_id))
        if not paths.settings.exists() and not paths.status.exists():
            raise FileNotFoundError(f"There is no run {run_id} in {self.runs_root}.")
        return Run(self, paths)

    def _run_dirs(self) -> list[RunPaths]:
        if not self.runs_root.is_dir():
            return []
        return [RunPaths(d) for d in self.runs_root.iterdir()
                if d.is_dir() and d.name != QUEUE_DIR and (d / "status.json").exists()]

    def list_runs(self) -> list[RunInfo]:
        """Every run folder, reconciled with reality, newest first."""
        infos = [self._reconcile(p) for p in self._run_dirs()]
        return sorted(infos, key=lambda i: (i.created, i.run_id), reverse=True)

    def active_run(self) -> Run | None:
        """The run that is starting, running or stopping, if any."""
        for info in self.list_runs():
            if info.active:
                return Run(self, RunPaths(info.run_dir))
        return None

    def reconcile(self) -> None:
        """End every run whose trainer is gone (dead pid, stale heartbeat) as failed, with a
        sentence. Call it on startup; ``list_runs`` and ``Run.info`` do the same per run."""
        self.list_runs()

    # -- reconciling ------------------------------------------------------------------------

    def _group_of(self, paths: RunPaths, status: Status | None) -> int | None:
        """The process to signal: the launched one (under ``accelerate launch`` the launcher, which
        leads the group of all ranks), else the trainer."""
        record = read_process(paths)
        if record is not None and pid_alive(record.pid, record.created):
            return record.pid
        return self._pid_of(paths, status)

    def _pid_of(self, paths: RunPaths, status: Status | None) -> int | None:
        if status is not None and status.pid:
            return status.pid
        record = read_process(paths)
        return record.pid if record else None

    def _reconcile(self, paths: RunPaths) -> RunInfo:
        try:
            status = load_status(paths)
        except (OSError, ValueError) as exc:  # damaged, or being created: leave the folder alone
            why = str(exc) if isinstance(exc, DamagedFile) else "status.json cannot be read"
            return RunInfo(paths.run_id, paths.root, RunState.FAILED, None, _mtime(paths.root),
                           None, f"This run folder is damaged: {why}. It is listed but not used; "
                           "delete the folder or restore the file.", None, "", 0, 0, damaged=True)
        if not status.state.active:
            return RunInfo.from_status(paths, status)
        popen = self._popens.get(paths.run_id)
        pid = self._pid_of(paths, status)
        exit_code = None
        if popen is not None:
            exit_code = popen.poll()
            # Under accelerate launch the popen is the launcher; rank 0 (status.pid) writes the end.
            alive = exit_code is None or (pid is not None and pid != popen.pid and pid_alive(
                pid, status.pid_created))
        elif pid is not None:
            alive = pid_alive(pid, status.pid_created if status.pid == pid else None)
        else:
            alive = None  # not spawned yet (or the spawner died before recording the pid)
        if alive is None or alive:
            beat = status.heartbeat or _spawned(paths) or status.created
            if time.time() - beat <= self.stale_after_s:
                return RunInfo.from_status(paths, status)
            if alive is None:
                return self._end(paths, RunState.FAILED, exit_code=None, message=(
                    "The trainer never started: see train.log in the run folder."))
            return self._end_hung(paths, status, pid, popen)
        return self._end_dead(paths, exit_code)

    def _end_dead(self, paths: RunPaths, exit_code: int | None) -> RunInfo:
        status = read_status(paths)  # the trainer may have ended the run just before exiting
        if status is not None and status.state.final:
            return RunInfo.from_status(paths, status)
        event = final_event(paths.events)
        if event is not None and event.kind == "finished":
            state = RunState.STOPPED if event.stopped else RunState.FINISHED
            return self._end(paths, state, exit_code=exit_code, output_path=event.output_path,
                             step=event.step, message=finished_message(event))
        if event is not None:
            return self._end(paths, RunState.FAILED, exit_code=exit_code, message=event.message,
                             detail=event.detail)
        log = tail_text(paths.log)
        return self._end(paths, RunState.FAILED, exit_code=exit_code,
                         message=explain_failure(exit_code, log), detail=last_lines(log, 12))

    def _end_hung(self, paths: RunPaths, status: Status, pid: int | None,
                  popen: subprocess.Popen | None) -> RunInfo:
        """Alive with a stale heartbeat: give it a last chance (a machine that was asleep beats
        again within a second or two), then end it: a run must never stay "running" forever."""
        deadline = time.monotonic() + 2.5 * HEARTBEAT_INTERVAL_S
        while time.monotonic() < deadline:
            time.sleep(0.25)
            fresh = read_status(paths)
            if fresh is None or not fresh.state.active:
                return self._reconcile(paths)
            if fresh.heartbeat and time.time() - fresh.heartbeat <= self.stale_after_s:
                return RunInfo.from_status(paths, fresh)
        silent = time.time() - (status.heartbeat or status.created)
        pid = self._group_of(paths, status) if pid is not None else None
        if pid is not None:
            created = status.pid_created if status.pid == pid else None
            terminate_group(pid, created, popen, wait_s=3.0)
        return self._end(paths, RunState.FAILED, exit_code=popen.poll() if popen else None,
                         message=f"The trainer stopped responding (no heartbeat for {silent:.0f} s) "
                                 "and was ended: see train.log in the run folder.",
                         detail=last_lines(tail_text(paths.log), 12))

    def _end(self, paths: RunPaths, state: RunState, *, exit_code: int | None, message: str,
             **changes) -> RunInfo:
        """Write a final state for a run whose trainer is gone (only then: no two writers)."""
        status = read_status(paths) or Status(run_id=paths.run_id, state=state,
                                              created=_mtime(paths.root))
        if status.state.final:
            return RunInfo.from_status(paths, status)
        status = status.with_(state=state, ended=time.time(), message=message,
                              exit_code=exit_code, **changes)
        write_status(paths, status)
        return RunInfo.from_status(paths, status)

    # -- the GUI's queue (runs_root/queue/, see queue_files.py) -------------------------------------

    @property
    def queue_folder(self) -> Path:
        return self.runs_root / QUEUE_DIR

    def enqueue(self, settings: TrainingSettings) -> Path:
        return queue_files.enqueue(self.queue_folder, settings)

    def queue_items(self) -> list[queue_files.QueueItem]:
        return queue_files.queue_items(self.queue_folder)

    def queue_remove(self, name: str) -> None:
        queue_files.queue_remove(self.queue_folder, name)

    def queue_move(self, name: str, delta: int) -> None:
        queue_files.queue_move(self.queue_folder, name, delta)

    def close(self) -> None:
        """Forget the trainers this client spawned (they keep running; the run folder is the
        contract). Reaps those that have exited."""
        self._closed = True
        for popen in self._popens.values():
            popen.poll()
        self._popens.clear()
        if self._warm is not None:
            self._warm.close()


def _spawned(paths: RunPaths) -> float | None:
    record = read_process(paths)
    return record.spawned if record else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
