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


def _install_signal_handlers(reporter: Reporter, ranks: Ranks | None = None) -> None:
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        dead = ranks.dead_peer() if ranks is not None else None
        reporter.fail(dead or f"The trainer was ended by {name} at step {reporter.status.step} before "
                      "it finished; LoRAs saved before that step are kept in the output folder.")
        reporter.close()
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


class Ranks:
    """The processes of an ``accelerate launch`` run on this machine, as one run: each writes its
    pid into the run folder's ``ranks/``; a watchdog thread in each ends the run as soon as a
    peer has died (rank 0 first writes the failure, naming the rank) or the launcher has gone (a
    rank never outlives it). A rank that ends normally removes its file first."""

    def __init__(self, paths: RunPaths, rank: int, world: int):
        self.folder, self.rank, self.world = paths.root / "ranks", rank, world
        self.folder.mkdir(exist_ok=True)
        self.own = self.folder / f"{rank}.pid"
        self.own.write_text(f"{os.getpid()} {_process_created() or 0}")
        self.parent = os.getppid()

    def dead_peer(self) -> str | None:
        from lora_gui.worker.processes import pid_alive

        for file in sorted(self.folder.glob("*.pid")):
            try:
                pid, created = file.read_text().split()
            except (OSError, ValueError):
                continue
            if file != self.own and not pid_alive(int(pid), float(created) or None):
                return (f"Process {file.stem} of {self.world} (rank {file.stem}, pid {pid}) died, which "
                        "ended the whole run; LoRAs saved before are kept in the output folder. See "
                        "train.log in the run folder for its last lines.")
        if os.getppid() != self.parent:
            return "The accelerate launcher of this run ended, which ended the whole run."
        return None

    def watch(self, reporter: Reporter) -> None:
        def loop() -> None:
            while True:
                time.sleep(0.25)
                dead = self.dead_peer()
                if dead:
                    self.leave()
                    reporter.fail(dead)
                    reporter.close()
                    os._exit(1)

        threading.Thread(target=loop, name="ranks", daemon=True).start()

    def leave(self) -> None:
        self.own.unlink(missing_ok=True)


def _naming_dead_ranks(emit: Callable[[Event], None], ranks: Ranks) -> Callable[[Event], None]:
    """The engine's sink; a failure caused by a peer's death (the collective operation broke)
    says which rank died rather than the communication error."""
    def sink(event: Event) -> None:
        if isinstance(event, Failed):
            deadline = time.monotonic() + 1.0  # the peer may be exiting still
            while (dead := ranks.dead_peer()) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if dead:
                event = Failed(message=dead, step=event.step, detail=event.detail)
        emit(event)

    return sink


def _end_from_result(reporter: Reporter, result) -> None:
    status = getattr(result, "status", None)
    if status in ("finished", "stopped"):
        reporter.emit(Finished(step=result.step, output_path=str(result.output_path or ""),
                               stopped=status == "stopped"))
    elif status == "failed":
        reporter.fail(result.message)


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
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # The first process of each machine keeps that machine's run folder (status, heartbeat); the
    # events come from the engine of rank 0 alone.
    main_rank = int(os.environ.get("LOCAL_RANK", str(rank))) == 0
    lock, refusal = _claim(paths) if main_rank else (None, None)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    reporter = Reporter(paths, writes=main_rank)
    reporter.begin()
    ranks = Ranks(paths, rank, world) if world > 1 else None
    _install_signal_handlers(reporter, ranks)
    if ranks is not None:
        ranks.watch(reporter)
    try:
        engine, job = _job(paths)
        reporter.set_state(RunState.RUNNING)
        sink = reporter.emit if ranks is None else _naming_dead_ranks(reporter.emit, ranks)
        result = engine(job, sink, InboxCommands(paths, reporter))
        if rank > 0:  # the engine reports through rank 0; this rank's end is its result
            print(f"rank {rank}: {getattr(result, 'status', '?')} at step {getattr(result, 'step', 0)}",
                  flush=True)
            if main_rank and not reporter.ended:  # another machine's run folder
                _end_from_result(reporter, result)
            return 0 if getattr(result, "status", "failed") in ("finished", "stopped") else 1
        if not reporter.ended:
            reporter.fail("The trainer returned without reporting a result: see train.log in the "
                          "run folder.")
    except BaseException as exc:  # noqa: BLE001 - every way out must end the run with a sentence
        sys.stderr.write(traceback_tail(exc, 40) + "\n")
        dead = ranks.dead_peer() if ranks is not None else None
        reporter.fail(dead or explain_failure(exc, tail_text(paths.log)), traceback_tail(exc))
    finally:
        if ranks is not None:
            ranks.leave()
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
    code = run(argv[0])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank has reported its end: leave at once. The interpreter's teardown of torch and the
        # process group takes seconds, during which the run looks ended but its processes live.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
