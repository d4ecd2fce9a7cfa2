"""The run folder: the contract between the trainer process and whoever watches it.

A run lives in ``runs/<run id>/`` and needs no live connection between the web process and the
trainer, so a restarted GUI finds every run again and a trainer outlives the GUI::

    settings.json   the validated settings (full document), written once by the client
    tool.json       instead of settings.json for a LoRA tool job (settings/tools.py), written once
    result.json     a tool job's result (kept energy per module, file sizes, an inspect card)
    events.jsonl    one event per line (``lora_gui.events.to_json``), append-only, flushed per
                    line; written by the trainer only
    inbox.jsonl     commands, appended by clients; the trainer keeps a byte offset
    status.json     state, pid, heartbeat, times, message, output; replaced atomically. Written by
                    the client before the trainer starts, by the trainer while it lives, and by a
                    client only to end a run whose trainer is gone (so writers never overlap)
    process.json    the launched process (pid, argv), written once by the client after spawning
    train.log       the trainer's stdout and stderr
    trainer.lock    flock()ed by the trainer while it lives: one trainer per run folder

Standard library only (plus the events module): the web process imports this.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_gui.atomic import write_json
from lora_gui.events import (
    Command,
    Event,
    Failed,
    Finished,
    RunState,
    checked_fields,
    command_from_json,
    event_from_json,
    to_json,
)

MAX_RECORD_BYTES = 1024**2  # status.json / process.json: a few hundred bytes when written by us
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_STALE_S = 15.0


@dataclass(frozen=True)
class RunPaths:
    """Where each file of one run folder lives."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def tool(self) -> Path:
        return self.root / "tool.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def process(self) -> Path:
        return self.root / "process.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def lock(self) -> Path:
        return self.root / "trainer.lock"


def new_run_id(name: str = "") -> str:
    """A sortable, file-name-safe id: time, a slug of the output name, a random suffix."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (stamp, slug, secrets.token_hex(3)) if p)


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}", run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r} must be a plain name of letters, digits, '-', '_', '.'")
    return run_id


# --- status ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    run_id: str
    state: RunState
    created: float
    pid: int | None = None
    pid_created: float | None = None  # process start time, to tell a reused pid from ours
    started: float | None = None
    heartbeat: float | None = None
    ended: float | None = None
    message: str | None = None
    detail: str = ""
    output_path: str | None = None
    output_name: str = ""
    step: int = 0
    total_steps: int = 0
    exit_code: int | None = None
    source: str = ""  # what started the run (a queue file), for the user's information

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: Any) -> Status:
        """A ValueError that names the field for anything but a well-typed status object."""
        return cls(**checked_fields(cls, data, finite=True))

    def with_(self, **changes: Any) -> Status:
        return replace(self, **changes)


def write_status(paths: RunPaths, status: Status) -> None:
    write_json(paths.status, status.to_dict(), indent=1)


class DamagedFile(ValueError):
    """A run-folder file that exists but is not what its writer writes; the message says why."""


def _read_object(path: Path, cls: type) -> Any:
    """The dataclass ``cls`` stored in the JSON file ``path``; OSError when it cannot be read,
    DamagedFile when it is not a well-typed ``cls`` (never half-written: writes are atomic)."""
    raw = path.read_bytes()
    if len(raw) > MAX_RECORD_BYTES:
        raise DamagedFile(f"{path.name} is {len(raw)} bytes, far more than a {path.stem} record")
    try:
        return cls(**checked_fields(cls, json.loads(raw), finite=True))
    except RecursionError:
        raise DamagedFile(f"{path.name} is damaged (nested too deeply)") from None
    except ValueError as exc:  # JSON and encoding errors are ValueErrors too
        raise DamagedFile(f"{path.name} is damaged ({exc})") from None


def load_status(paths: RunPaths) -> Status:
    return _read_object(paths.status, Status)


def read_status(paths: RunPaths) -> Status | None:
    """The status, or None when the file is missing, unreadable or damaged."""
    try:
        return load_status(paths)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    argv: list[str] = field(default_factory=list)
    spawned: float = 0.0
    launcher_pid: int = 0  # the process that spawned it (the web process, the queue)
    created: float | None = None  # the process's start time (tells a reused pid from ours)
    gpu: int | None = None  # the one GPU the run holds (launch.gpu_per_run), None: every GPU


def write_process(paths: RunPaths, record: ProcessRecord) -> None:
    write_json(paths.process, asdict(record), indent=1)


def read_process(paths: RunPaths) -> ProcessRecord | None:
    try:
        record = _read_object(paths.process, ProcessRecord)
    except (OSError, ValueError):
        return None
    return record if record.pid > 0 else None  # a pid <= 0 would signal a whole process group


# --- events ------------------------------------------------------------------------------------

class EventWriter:
    """Appends one event per line and flushes it, so a reader never waits for a buffer."""

    def __init__(self, path: Path):
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def write(self, event: Event) -> None:
        # One write call per line: a signal handler that writes between two calls still leaves
        # whole lines.
        self._fh.write(to_json(event) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class LineCursor:
    """Remembers the byte offset of a line count, so polling a long file reads only its tail.
    The pair is replaced as one tuple: threads polling the same run never see half an update."""

    def __init__(self) -> None:
        self.mark: tuple[int, int] = (0, 0)  # (lines, byte offset after them)


def read_lines(path: Path, since: int, cursor: LineCursor | None = None
               ) -> tuple[list[str], int, tuple[int, int] | None]:
    """Complete lines after the first ``since`` lines: (lines, new line count, new cursor mark).

    A last line without its newline is being written: it is left for the next call.
    """
    start_line, start_offset = 0, 0
    if cursor is not None and cursor.mark[0] <= since:
        start_line, start_offset = cursor.mark
    try:
        with open(path, "rb") as fh:
            fh.seek(start_offset)
            data = fh.read()
    except FileNotFoundError:
        return [], since, None
    out: list[str] = []
    line_no, pos = start_line, 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        if line_no >= since:
            out.append(data[pos:end].decode("utf-8", errors="replace"))
        line_no, pos = line_no + 1, end + 1
    if line_no < since:  # the file is shorter than the caller thinks (not the same file?)
        return [], since, None
    return out, line_no, (line_no, start_offset + pos)


def read_events(path: Path, since: int = 0, cursor: LineCursor | None = None
                ) -> tuple[list[Event], int]:
    """Events after ``since`` lines and the new line count. Unreadable lines are skipped (counted)."""
    lines, count, mark = read_lines(path, since, cursor)
    if cursor is not None and mark is not None:
        cursor.mark = mark
    events = []
    for line in lines:
        try:
            events.append(event_from_json(line))
        except (ValueError, KeyError, TypeError):
            continue
    return events, count


def finished_message(event: Finished) -> str:
    """The sentence a run's status carries when it ended with a LoRA."""
    if event.stopped and not event.output_path:
        return f"Stopped at step {event.step}; nothing was written."
    if event.stopped:
        return f"Stopped at step {event.step}; the LoRA of that step is {event.output_path}"
    return f"Finished: {event.output_path}"


def final_event(path: Path, tail_bytes: int = 65536) -> Finished | Failed | None:
    """The Finished or Failed event at the end of an events file, if the trainer wrote one."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - tail_bytes))
            data = fh.read()
    except FileNotFoundError:
        return None
    for raw in reversed(data.split(b"\n")):
        if b'"kind": "finished"' in raw or b'"kind": "failed"' in raw:
            try:
                event = event_from_json(raw.decode("utf-8"))
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(event, (Finished, Failed)):
                return event
    return None


# --- commands ----------------------------------------------------------------------------------

def append_command(paths: RunPaths, command: Command) -> None:
    """Append one command line. O_APPEND with a single write keeps concurrent senders' lines whole."""
    data = (to_json(command) + "\n").encode("utf-8")
    fd = os.open(paths.inbox, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class InboxReader:
    """Reads the commands appended since the last call (the trainer's side of the inbox)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[Command]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        commands = []
        for raw in data[:end].split(b"\n"):
            try:
                commands.append(command_from_json(raw.decode("utf-8")))
            except (ValueError, KeyError, TypeError):
                continue
        return commands


def tail_text(path: Path, max_bytes: int = 16384) -> str:
    """The end of a (log) file, or '' if there is none."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
