"""What the run panel shows, folded from the worker's events. No gradio here: ``RunView`` keeps the
history (kept server-side in a ``gr.State``) and says what changed since the page was last drawn, so
the poll sends only that."""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.events import (
    CheckpointDeleted,
    CheckpointSaved,
    Event,
    Failed,
    Finished,
    Log,
    LossReported,
    Progress,
    RunState,
    SampleReady,
    Started,
    ValidationLoss,
)

SMOOTHING = 0.9  # TensorBoard-style exponential moving average, debiased
MAX_PLOT_POINTS = 300  # per series: each redraw re-runs the chart on every point
LOG_LINES = 300
PLOT_MIN_INTERVAL_S = 2.0  # redraw the chart at most this often while points arrive (page CPU)
STATE_WORDS = {RunState.QUEUED: "Queued", RunState.STARTING: "Starting", RunState.RUNNING: "Training",
               RunState.STOPPING: "Stopping", RunState.FINISHED: "Finished",
               RunState.STOPPED: "Stopped (saved)", RunState.FAILED: "Failed"}


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def thin(points: list[tuple[int, float]], limit: int = MAX_PLOT_POINTS) -> list[tuple[int, float]]:
    """At most ``limit`` points, evenly spaced, always keeping the last."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


@dataclass
class RunView:
    """One run as the page shows it. ``versions`` count changes per part; ``drawn`` remembers what
    this page has already been sent."""

    run_id: str | None = None
    cursor: Any = 0
    state: RunState | None = None  # None: no run to show (idle)
    note: str = ""  # a sentence from the panel (e.g. "Stopping: saving the LoRA…")
    started: Started | None = None
    progress: Progress | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    smoothed: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path, caption), oldest first
    sample_events: list[SampleReady] = field(default_factory=list)  # for the grids
    checkpoints: list[CheckpointSaved] = field(default_factory=list)
    deleted: dict[str, str] = field(default_factory=dict)  # path -> why the retention settings removed it
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    finished: Finished | None = None
    failed: Failed | None = None
    output_name: str = ""
    _ema: float = 0.0
    _ema_n: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)
    plot_drawn_at: float = 0.0
    poll_s: float = 0.0  # the page's poll interval as last sent (0: idle)
    expects_validation: bool = False  # the run holds images out (training.validation_split > 0)
    resources: str = ""  # the trainer's RAM and GPU line as last sent
    resources_at: float = 0.0

    def _bump(self, *parts: str) -> None:
        for part in parts:
            self.versions[part] = self.versions.get(part, 0) + 1

    @property
    def active(self) -> bool:
        return self.state is not None and self.state.active

    # --- folding events ------------------------------------------------------------------------

    def apply(self, events: list[Event]) -> None:
        for event in events:
            self._apply(event)

    def _apply(self, event: Event) -> None:  # noqa: C901 - one branch per event type
        if isinstance(event, Started):
            self.started = event
            if self.state in (None, RunState.STARTING):
                self.state = RunState.RUNNING
                self.note = ""
            self._log(f"Started on {event.device}: {event.total_steps} steps, {event.epochs} epochs, "
                      f"{event.num_train_images} images.")
            self._bump("status", "progress")
        elif isinstance(event, Progress):
            self.progress = event
            if self.state in (None, RunState.STARTING):
                self.state = RunState.RUNNING
                self.note = ""
                self._bump("status")
            self._bump("progress")
        elif isinstance(event, LossReported):
            if not math.isfinite(event.loss):
                self._log(f"step {event.step}: loss is {event.loss} (not plotted)")
                return
            self.losses.append((event.step, event.loss))
            self._ema = SMOOTHING * self._ema + (1 - SMOOTHING) * event.loss
            self._ema_n += 1
            self.smoothed.append((event.step, self._ema / (1 - SMOOTHING ** self._ema_n)))
            self._bump("plot")
        elif isinstance(event, ValidationLoss):
            if math.isfinite(event.loss):
                self.validation.append((event.step, event.loss))
                self._bump("plot")
        elif isinstance(event, SampleReady):
            at = f" at strength {event.strength:g}" if event.strength is not None else ""
            self.samples.append((event.path, f"step {event.step}{at}: {event.prompt}"))
            self.sample_events.append(event)
            self._clear_note("making samples")
            self._bump("gallery", "sweep" if event.strength is not None else "grid")
        elif isinstance(event, CheckpointSaved):
            self.checkpoints.append(event)
            self._bump("checkpoints")
            self._clear_note("saving the LoRA now")
            self._log(f"Saved {event.path}" + (f" (state {event.state_dir})" if event.state_dir else ""))
        elif isinstance(event, CheckpointDeleted):
            self.deleted[event.path] = event.reason
            self._bump("checkpoints")
        elif isinstance(event, Log):
            self._log(event.message if event.level == "info" else f"[{event.level}] {event.message}")
        elif isinstance(event, Finished):
            self.finished = event
            self.state = RunState.STOPPED if event.stopped else RunState.FINISHED
            self.note = ""
            self._log(f"Finished at step {event.step}: {event.output_path}")
            self._bump("status", "result", "progress", "plot")
        elif isinstance(event, Failed):
            self.failed = event
            self.state = RunState.FAILED
            self.note = ""
            self._log(f"Failed: {event.message}")
            self._bump("status", "result", "progress")

    def _clear_note(self, prefix: str) -> None:
        """A Save now / Sample now note ends when its file arrives."""
        if self.note.startswith(prefix):
            self.note = ""
            self._bump("status")

    def _log(self, line: str) -> None:
        self.log.append(line)
        self._bump("log")

    def fail(self, message: str) -> None:
        """The worker ended without a Finished/Failed event (crash, killed)."""
        if self.state is not None and self.state.final:
            return
        self._apply(Failed(message=message))

    def end(self, state: RunState, message: str) -> None:
        """The run folder says the run ended (``state``) with no Finished/Failed event: the worker
        ended it without training (save_json_only)."""
        self.state, self.note = state, message
        self._log(message)
        self._bump("status", "result", "progress")

    def set_note(self, note: str, state: RunState | None = None) -> None:
        self.note = note
        if state is not None:
            self.state = state
        self._bump("status")

    # --- rendering -----------------------------------------------------------------------------

    def changed(self, part: str) -> bool:
        return self.versions.get(part, 0) != self.drawn.get(part, -1)

    def mark_drawn(self, part: str) -> None:
        self.drawn[part] = self.versions.get(part, 0)

    def status_markdown(self) -> str:
        if self.state is None:
            return "**Idle.** Press Start to train with the settings on the left."
        name = f"`{self.run_id}`" if self.run_id else ""
        words = STATE_WORDS[self.state]
        text = f"**{words}** {name}"
        return f"{text} — {self.note}" if self.note else text

    def progress_markdown(self) -> str:
        p = self.progress
        if p is None:
            if self.started:
                return f"0 / {self.started.total_steps} steps"
            return "Waiting for the first step…" if self.active else ""
        if p.phase != "training":  # caching latents, loading...: a count of that work, not steps
            return f"{p.phase[:1].upper()}{p.phase[1:]}: {p.step} / {p.total_steps}"
        pct = 100 * p.step / p.total_steps if p.total_steps else 0
        eta = "" if not self.active else f" · ETA {format_duration(p.eta_s)}"
        return (f"Step **{p.step} / {p.total_steps}** ({pct:.0f} %) · epoch {p.epoch} / {p.epochs} · "
                f"{p.steps_per_s:.2f} it/s · elapsed {format_duration(p.elapsed_s)}{eta}")

    def progress_fraction(self) -> float:
        p = self.progress
        return (p.step / p.total_steps) if p and p.total_steps else 0.0

    def checkpoint_rows(self) -> list[list]:
        """[step, file, validation loss, note] per saved LoRA; the lowest validation loss among the
        files still on disk is marked best; deleted ones say why (the retention rule that removed
        them: keep_best_checkpoints, save_last_n_*)."""
        present = [c for c in self.checkpoints if os.path.exists(c.path)]
        scored = [c for c in present if c.validation_loss is not None]
        best = min(scored, key=lambda c: c.validation_loss) if scored else None
        rows = []
        for c in self.checkpoints:
            notes = ["★ best" if c is best else "", "final" if c.final else "",
                     "" if c in present else _deleted_note(self.deleted.get(c.path))]
            loss = f"{c.validation_loss:.4f}" if c.validation_loss is not None else "–"
            rows.append([c.step, Path(c.path).name, loss, ", ".join(n for n in notes if n)])
        return rows

    def plot_rows(self) -> list[dict[str, Any]]:
        rows = [{"step": s, "loss": v, "series": "loss"} for s, v in thin(self.losses)]
        rows += [{"step": s, "loss": v, "series": "smoothed"} for s, v in thin(self.smoothed)]
        rows += [{"step": s, "loss": v, "series": "validation"} for s, v in thin(self.validation)]
        if self.expects_validation and not self.validation and self.losses:
            # The chart fixes its colour domain to the series in its first data (gradio rebuilds
            # the chart only when a setting such as the title changes, not for new data): a
            # validation row without a value (NaN -> null, not drawn) puts the series in the
            # domain now, so its points show as they arrive instead of after a reload.
            rows.append({"step": self.losses[0][0], "loss": math.nan, "series": "validation"})
        return rows

    def plot_due(self, now: float | None = None) -> bool:
        """New points and the last redraw is old enough (or the run has ended)."""
        if not self.changed("plot") or not (self.losses or self.validation):
            return False
        now = time.monotonic() if now is None else now
        return not self.active or now - self.plot_drawn_at >= PLOT_MIN_INTERVAL_S

    def gallery(self) -> list[tuple[str, str]]:
        return [(p, c) for p, c in reversed(self.samples) if os.path.exists(p)]

    def log_text(self) -> str:
        return "\n".join(self.log)

    def result_markdown(self) -> str:
        if self.failed:
            detail = ""
            if self.failed.detail:
                detail = (f"\n\n<details><summary>Details</summary>\n\n```\n{self.failed.detail}\n```"
                          "\n</details>")
            return f"### The run failed\n\n{self.failed.message}{detail}"
        if self.finished:
            path = Path(self.finished.output_path)
            size = format_size(path.stat().st_size) if path.is_file() else "missing on disk"
            how = "stopped early and saved" if self.finished.stopped else "finished"
            extra = ""
            others = [f for f in self.finished.files if f != self.finished.output_path
                      and Path(f).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp")]
            if others:
                extra = "\n\nOther files:\n" + "\n".join(f"- `{f}`" for f in others[:20])
            return (f"### LoRA ready ({how} at step {self.finished.step})\n\n"
                    f"`{path}` — {size}{extra}")
        return ""

    def result_file(self) -> str | None:
        if self.finished and Path(self.finished.output_path).is_file():
            return self.finished.output_path
        return None


def _deleted_note(reason: str | None) -> str:
    """"deleted (keep_best_checkpoints)"-style: the settings named in the engine's reason; a file
    removed by hand (no reason) is just "deleted"."""
    rules = re.findall(r"images\.(\w+)", reason or "")
    return f"deleted ({', '.join(rules)})" if rules else "deleted"
