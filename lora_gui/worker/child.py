"""The trainer process: ``python -m lora_gui.worker RUN_DIR``.

It runs the engine on the run folder's settings, appends the engine's events to events.jsonl,
feeds inbox.jsonl commands to the engine, keeps status.json's heartbeat fresh from a daemon thread
and always ends the run with a final state: finished, stopped or failed (with a sentence).

It does not watch the web process (the run folder is the contract: the GUI may restart), but it
ends itself when its run folder is deleted. ``--warm`` starts it before its run (see warm.py): it
imports the engine, then waits for one run folder from its launcher, and ends if the launcher goes. Under ``accelerate launch`` only rank 0 writes events
and status; the other ranks only read commands.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lora_gui.events import (
    Command,
    Event,
    Failed,
    Finished,
    ForceStop,
    Progress,
    RunState,
    Started,
    Stop,
    describe,
)
from lora_gui.worker.failures import explain_failure, traceback_tail
from lora_gui.worker.protocol import (
    HEARTBEAT_INTERVAL_S,
    EventWriter,
    InboxReader,
    RunPaths,
    Status,
    finished_message,
    read_status,
    tail_text,
    write_status,
)
from lora_gui.worker.warm import WARM_FLAG, WARM_READY, wait_for_run

ENGINE_ENV = "LORA_GUI_WORKER_ENGINE"  # "module:function"; a test hook (tests/support)
DEFAULT_ENGINE = "lora_gui.engine.train:run_training"
TOOLS_ENGINE = "lora_gui.engine.lora_tools.runner"  # runs a folder's tool.json (LoRA tools)
EXIT_ORPHANED = 3


def _process_created() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: pid-reuse check is skipped
        return None


class Reporter:
    """The trainer's side of the run folder: events, status and heartbeat, behind one lock."""

    def __init__(self, paths: RunPaths, *, writes: bool = True):
        self.paths = paths
        self.writes = writes
        self._lock = threading.RLock()  # RLock: the signal handler may run while emit holds it
        self._writer: EventWriter | None = None
        self._stop_heartbeat = threading.Event()
        previous = read_status(paths)
        now = time.time()
        self.status = (previous or Status(run_id=paths.run_id, state=RunState.STARTING,
                                          created=now)).with_(
            state=RunState.STARTING, pid=os.getpid(), pid_created=_process_created(), started=now,
            heartbeat=now, ended=None, message=None, detail="", exit_code=None)

    @property
    def ended(self) -> bool:
        return self.status.state.final

    def begin(self) -> None:
        if not self.writes:
            return
        self._writer = EventWriter(self.paths.events)
        self._write_status()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def _write_status(self) -> None:
        with self._lock:
            self.status = self.status.with_(heartbeat=time.time())
            write_status(self.paths, self.status)

    def _heartbeat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_INTERVAL_S):
            if not self.paths.root.is_dir():
                _end_orphaned(self.paths)
            try:
                with self._lock:
                    if not self.ended:
                        self._write_status()
            except OSError:
                continue  # the folder vanished between the check and the write: next beat ends

    def set_state(self, state: RunState) -> None:
        with self._lock:
            if not self.ended and self.status.state != state:
                self.status = self.status.with_(state=state)
                if self.writes:
                    self._write_status()

    def emit(self, event: Event) -> None:
        """The engine's event sink."""
        with self._lock:
            if self.ended and isinstance(event, (Finished, Failed)):
                print(f"[ignored after the end] {event}", flush=True)
                return
            if self._writer is not None:
                self._writer.write(event)
            self._track(event)
        _print(event)

    def _track(self, event: Event) -> None:
        s = self.status
        if isinstance(event, Started):
            self.status = s.with_(total_steps=event.total_steps)
        elif isinstance(event, Progress) and event.phase == "training":
            self.status = s.with_(step=event.step, total_steps=event.total_steps)
        elif isinstance(event, Finished):
            state = RunState.STOPPED if event.stopped else RunState.FINISHED
            self._end(state, step=event.step, output_path=event.output_path,
                      message=finished_message(event))
        elif isinstance(event, Failed):
            self._end(RunState.FAILED, step=event.step or s.step, message=event.message,
                      detail=event.detail)

    def _end(self, state: RunState, **changes) -> None:
        self.status = self.status.with_(state=state, ended=time.time(), **changes)
        if self.writes:
            write_status(self.paths, self.status)

    def fail(self, message: str, detail: str = "") -> None:
        """End the run as failed (unless it already ended), with an event and the status."""
        self.emit(Failed(message=message, step=self.status.step, detail=detail))

    def close(self) -> None:
        self._stop_heartbeat.set()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


def _print(event: Event) -> None:
    line = describe(event)
    if line is not None:
        print(line, flush=True)


class InboxCommands:
    """The engine's CommandSource: the commands appended to inbox.jsonl since the last poll."""

    def __init__(self, paths: RunPaths, reporter: Reporter):
        self._reader = InboxReader(paths.inbox)
        self._reporter = reporter

    def poll(self) -> list[Command]:
        commands = [c for c in self._reader.read() if not isinstance(c, ForceStop)]
        if any(isinstance(c, Stop) for c in commands):
            self._reporter.set_state(RunState.STOPPING)
        return commands


def _end_orphaned(paths: RunPaths) -> None:
    """The run folder was deleted: nobody can see this run any more, so stop using the machine."""
    print(f"The run folder {paths.root} was deleted: ending the trainer.", file=sys.stderr,
          flush=True)
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:
        pass
    os._exit(EXIT_ORPHANED)


def _install_signal_handlers(reporter: Reporter) -> None:
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        reporter.fail(f"The trainer was ended by {name} at step {reporter.status.step} before it "
                      "finished; LoRAs saved before that step are kept in the output folder.")
        reporter.close()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _claim(paths: RunPaths):
    """One trainer per run folder, and never a second life for a run that has ended. Returns
    (the open, locked file to keep while training, None) or (None, why not). The kernel releases
    the lock however the process ends."""
    import fcntl

    previous = read_status(paths)
    if previous is not None and previous.state.final:
        return None, (f"The run {paths.run_id} has already ended ({previous.state.value}): start "
                      "a new run.")
    fh = open(paths.lock, "a")  # noqa: SIM115 (held until the process exits)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None, f"Another trainer is already running the run {paths.run_id}."
    return fh, None


def load_engine() -> Callable:
    spec = os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "run_training")


def _job(paths: RunPaths) -> tuple[Callable, object]:
    """(the engine function, what it runs): a tool job when the folder has tool.json, else training."""
    from lora_gui.settings.io import read_json, validate_document

    if paths.tool.is_file():
        from lora_gui.settings.tools import parse_job

        job = parse_job(read_json(paths.tool))
        run_tool = importlib.import_module(TOOLS_ENGINE).run_tool
        return (lambda j, emit, commands: run_tool(j, emit, commands, paths.root)), job
    return load_engine(), validate_document(read_json(paths.settings))


def run(run_dir: str | os.PathLike) -> int:
    paths = RunPaths(Path(run_dir).resolve())
    if not paths.root.is_dir():
        print(f"There is no run folder {paths.root}.", file=sys.stderr)
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0
    lock, refusal = _claim(paths) if main_rank else (None, None)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    reporter = Reporter(paths, writes=main_rank)
    reporter.begin()
    _install_signal_handlers(reporter)
    try:
        engine, job = _job(paths)
        reporter.set_state(RunState.RUNNING)
        engine(job, reporter.emit, InboxCommands(paths, reporter))
        if not reporter.ended:
            reporter.fail("The trainer returned without reporting a result: see train.log in the "
                          "run folder.")
    except BaseException as exc:  # noqa: BLE001 - every way out must end the run with a sentence
        sys.stderr.write(traceback_tail(exc, 40) + "\n")
        reporter.fail(explain_failure(exc, tail_text(paths.log)), traceback_tail(exc))
    finally:
        reporter.close()
        if lock is not None:
            lock.close()
    return 1 if reporter.status.state == RunState.FAILED else 0


def warm() -> int:
    """``python -m lora_gui.worker --warm``: import the engine now, then wait for one run folder on
    stdin (see warm.py) and train it with stdout and stderr going to its train.log. Ends without
    training when the launcher goes away first."""
    parent = os.getppid()
    engine = load_engine()  # the seconds of torch/diffusers/transformers imports, before Start
    preload = getattr(sys.modules.get(getattr(engine, "__module__", "")), "preload", None)
    if callable(preload):  # what the engine imports lazily inside a run (the model classes)
        preload()
    from lora_gui.settings import io  # noqa: F401 - also read at Start

    print(f"{WARM_READY} (pid {os.getpid()})", flush=True)
    run_dir = wait_for_run(sys.stdin.fileno(), parent)
    if run_dir is None:
        return 0
    if not Path(run_dir).is_dir():
        print(f"There is no run folder {run_dir}.", file=sys.stderr)
        return 2
    log = os.open(RunPaths(Path(run_dir)).log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return run(run_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == [WARM_FLAG]:
        return warm()
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m lora_gui.worker RUN_DIR | --warm", file=sys.stderr)
        return 2
    return run(argv[0])
