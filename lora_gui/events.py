"""Typed events (nouns) that flow out of the engine and typed commands (verbs) that flow in.

Standard library only: the engine, the worker and the web process all import this module, and the
web process must never import torch. Every type is a frozen dataclass with a class-level ``kind``;
``to_json``/``from_json`` turn them into one JSON line and back. Images travel as file paths.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Protocol


class RunState(str, Enum):
    """Where a run stands: THE names of run states (the run folder's status.json, the page, the CLI).

    A ``str`` enum, so ``RunState.RUNNING == "running"`` and it serialises as the plain word.
    """

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """A trainer process is (or is about to be) working on the run."""
        return self in ACTIVE_STATES

    @property
    def final(self) -> bool:
        """The run has ended and its state will not change again."""
        return self in FINAL_STATES

    @classmethod
    def of(cls, value: str | RunState) -> RunState:
        """The state named by ``value``; a ValueError names the valid states otherwise."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown run state {value!r}: expected one of {names}") from None


ACTIVE_STATES = frozenset({RunState.STARTING, RunState.RUNNING, RunState.STOPPING})
FINAL_STATES = frozenset({RunState.FINISHED, RunState.STOPPED, RunState.FAILED})


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"


@dataclass(frozen=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    total_steps: int
    steps_per_epoch: int
    epochs: int
    num_train_images: int
    num_reg_images: int
    device: str
    output_dir: str


@dataclass(frozen=True)
class Log(Event):
    """A line for the user's log panel (also printed by the CLI)."""

    kind: ClassVar[str] = "log"
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    step: int
    total_steps: int
    epoch: int
    epochs: int
    elapsed_s: float
    steps_per_s: float
    eta_s: float
    phase: str = "training"


@dataclass(frozen=True)
class LossReported(Event):
    kind: ClassVar[str] = "loss"
    step: int
    epoch: int
    loss: float
    lr: float
    # Max-norm regularisation (scale_weight_norms), None when off: LoRA modules scaled down at
    # this step, and the mean and largest update norm afterwards (sd-scripts' "Keys Scaled").
    keys_scaled: int | None = None
    average_key_norm: float | None = None
    max_key_norm: float | None = None


@dataclass(frozen=True)
class ValidationLoss(Event):
    kind: ClassVar[str] = "validation_loss"
    step: int
    epoch: int
    loss: float


@dataclass(frozen=True)
class SampleReady(Event):
    kind: ClassVar[str] = "sample"
    step: int
    epoch: int
    path: str
    prompt: str
    index: int = 0
    strength: float | None = None  # set for the strength sweep's samples (the LoRA's multiplier)


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    epoch: int
    path: str
    state_dir: str | None = None
    final: bool = False
    validation_loss: float | None = None  # of this LoRA, when the run has held-out images


@dataclass(frozen=True)
class CheckpointDeleted(Event):
    """A periodic save (LoRA file or state folder) removed by the retention settings, and why."""

    kind: ClassVar[str] = "checkpoint_deleted"
    path: str
    reason: str


@dataclass(frozen=True)
class Finished(Event):
    """The run ended normally (``stopped`` is True when a Stop command ended it early)."""

    kind: ClassVar[str] = "finished"
    step: int
    output_path: str
    state_dir: str | None = None
    stopped: bool = False
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed(Event):
    """The run could not go on; ``message`` is a sentence the user can act on."""

    kind: ClassVar[str] = "failed"
    message: str
    step: int = 0
    detail: str = ""


# THE out-of-memory sentence of a Failed event, and THE rule that recognises a GPU out-of-memory
# error in an exception's "Type: message" text or a log (CUDA, ROCm/HIP, MPS, XPU; torch raises
# torch.OutOfMemoryError). Used by the engine's explain() and the worker's failure reports alike.
GPU_OOM = ("The GPU ran out of memory: lower the batch size or resolution, enable gradient "
           "checkpointing, or use the AdamW8bit optimizer.")
_GPU_OOM_RE = re.compile(r"out of memory|OutOfMemoryError", re.I)


def is_gpu_out_of_memory(text: str) -> bool:
    """Whether ``text`` (``f"{type(exc).__name__}: {exc}"`` or log lines) reports GPU out-of-memory."""
    return bool(_GPU_OOM_RE.search(text))


@dataclass(frozen=True)
class Command:
    kind: ClassVar[str] = "command"


@dataclass(frozen=True)
class Stop(Command):
    """Save a LoRA and a state at the current step, then end the run."""

    kind: ClassVar[str] = "stop"


@dataclass(frozen=True)
class SaveNow(Command):
    kind: ClassVar[str] = "save_now"


@dataclass(frozen=True)
class SampleNow(Command):
    kind: ClassVar[str] = "sample_now"


@dataclass(frozen=True)
class ForceStop(Command):
    """Terminate the trainer if it does not answer a Stop within the grace period."""

    kind: ClassVar[str] = "force_stop"
    grace_s: float = 10.0


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (Started, Log, Progress, LossReported, ValidationLoss, SampleReady,
                CheckpointSaved, CheckpointDeleted, Finished, Failed)
}
COMMAND_TYPES: dict[str, type[Command]] = {
    cls.kind: cls for cls in (Stop, SaveNow, SampleNow, ForceStop)
}


def to_dict(item: Event | Command) -> dict[str, Any]:
    data = dataclasses.asdict(item)
    for key, value in data.items():
        if isinstance(value, tuple):
            data[key] = list(value)
    return {"kind": item.kind, **data}


def to_json(item: Event | Command) -> str:
    return json.dumps(to_dict(item), ensure_ascii=False, allow_nan=True)


def checked_fields(cls: type, data: Any, *, finite: bool = False) -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` from a decoded JSON object, every value checked
    against its annotation (files in a run folder can be damaged or hand-edited: a wrong type must
    stop here, not in the page). Unknown keys are ignored (a newer writer); a ValueError names the
    first bad field. ``finite`` refuses NaN and infinities in float fields (times, not losses)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, not {type(data).__name__}")
    hints, kwargs = _hints(cls), {}
    for f in _fields(cls):
        if f.name in data:
            kwargs[f.name] = _checked(f.name, data[f.name], hints[f.name], finite)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{f.name} is missing")
    return kwargs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations: once per class


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def _checked(name: str, value: Any, hint: Any, finite: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _checked(name, value, hint, finite)
    if origin in (tuple, list) and isinstance(value, list | tuple):
        item = args[0]
        values = [_checked(name, v, item, finite) for v in value]
        return tuple(values) if origin is tuple else values
    if isinstance(hint, type) and issubclass(hint, Enum) and isinstance(value, str):
        return hint(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if finite and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    shown = getattr(hint, "__name__", str(hint))
    raise ValueError(f"{name} must be {shown}, not {type(value).__name__} {value!r:.40}")


def _build(table: dict[str, type], line: str | bytes):
    try:
        data = json.loads(line)
    except RecursionError:
        raise ValueError("the line nests too deeply to be an event") from None
    if not isinstance(data, dict) or data.get("kind") not in table:
        raise ValueError("not an event or command line")
    cls = table[data["kind"]]
    return cls(**checked_fields(cls, data))


def event_from_json(line: str) -> Event:
    """The event of one line; a ValueError for a line that is not a well-typed event."""
    return _build(EVENT_TYPES, line)


def command_from_json(line: str) -> Command:
    return _build(COMMAND_TYPES, line)


PROGRESS_LINES = 20  # a printed log shows training progress this many times per run


def progress_due(event: Progress) -> bool:
    """THE thinning rule for printed progress: training steps every 1/PROGRESS_LINES of the run
    and the last one; other phases (latent caching...) only when they end."""
    if event.step == event.total_steps:
        return True
    return event.phase == "training" and event.step % max(1, event.total_steps // PROGRESS_LINES) == 0


def describe(event: Event) -> str | None:
    """The line that a printed log (the trainer's train.log, the queue, the terminal) shows for an
    event, or None when the event is not printed (thinned progress, losses, samples)."""
    if isinstance(event, Log):
        return f"[{event.level}] {event.message}"
    if isinstance(event, Progress):
        if not progress_due(event):
            return None
        if event.phase != "training":
            return f"{event.phase}: {event.step}/{event.total_steps} done"
        return f"step {event.step}/{event.total_steps} ({event.steps_per_s:.2f} steps/s)"
    if isinstance(event, ValidationLoss):
        return f"validation loss at step {event.step}: {event.loss:.4f}"
    if isinstance(event, Finished):
        word = "stopped" if event.stopped else "finished"
        return f"{word} at step {event.step}: {event.output_path}"
    if isinstance(event, Failed):
        return f"failed at step {event.step}: {event.message}"
    return None


class EventSink(Protocol):
    """Where the engine sends its events (a list, a JSONL writer, the CLI's printer...)."""

    def __call__(self, event: Event) -> None: ...


class CommandSource(Protocol):
    """What the training loop polls at step boundaries: returns the commands that arrived since."""

    def poll(self) -> list[Command]: ...


@dataclass
class CommandQueue:
    """An in-process command source: tests and the CLI push commands, the loop polls them."""

    pending: list[Command] = field(default_factory=list)

    def put(self, command: Command) -> None:
        self.pending.append(command)

    def poll(self) -> list[Command]:
        items, self.pending = self.pending, []
        return items
