"""Shared pieces of the benchmarks: set-up, the machine's description, demo data, settings, event
timestamps, tables and the BENCHMARKS.md report.

Benchmarks measure; they never pass or fail. Unless ``BENCH_THREADS`` says otherwise every process
runs torch with ONE thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``): this machine has two
cores shared with other work, and two torch threads collapse when the other core is busy.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "BENCHMARKS.md"
THREADS = int(os.environ.get("BENCH_THREADS", "1"))

_ENV = {
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def child_env(**extra: str) -> dict[str, str]:
    """The environment for benchmark subprocesses (one thread, offline, unbuffered)."""
    env = dict(os.environ)
    env.update(_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def setup() -> None:
    """Call first in every benchmark process: environment, one torch thread, quiet libraries."""
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(THREADS)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - quieter output is a nicety
        pass


# --- the machine ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(THREADS),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load average (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    return info


# --- data and settings ----------------------------------------------------------------------------

def workdir() -> Path:
    """The scratch folder of this benchmark run (``BENCH_WORKDIR``, else a new temporary folder)."""
    given = os.environ.get("BENCH_WORKDIR")
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="lora-gui-bench-"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_WORKDIR"] = str(path)  # subprocesses share it
    return path


def demo(work: Path | None = None):
    """The tiny demo model and dataset, built once per work folder."""
    from lora_gui.engine.demo import DemoPaths, build_demo

    root = (work or workdir()) / "demo"
    if (root / "lora_gui_demo.json").is_file() and (root / "model").is_dir():
        return DemoPaths(root, root / "model", root / "model.safetensors", root / "dataset", root / "reg")
    return build_demo(root, seed=0)


def bench_settings(demo_paths, out: Path, *, resolution: int, batch_size: int, steps: int = 0,
                   extra: Sequence[str] = ()):
    """The demo preset at one fixed resolution (buckets off: every batch is res x res), nothing
    saved or sampled on the way, static captions and a frozen text encoder unless ``extra`` says
    otherwise."""
    from lora_gui.settings import io

    settings = io.load_preset("demo-tiny-cpu")
    return io.apply_overrides(settings, [
        f"model.base_model={demo_paths.model_dir}", f"model.img_folder={demo_paths.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0",
        "training.validation_every_n_steps=0", f'images.resolution="{resolution}"',
        "images.buckets=false", "images.flip_aug=false", "labels.shuffle_caption=false",
        "training.unet_only=true", f"training.batch_size={batch_size}",
        f"images.max_steps={steps or 100000}", *extra])


# --- timing ---------------------------------------------------------------------------------------

@dataclass
class Stamp:
    wall: float  # time.perf_counter()
    cpu: float  # time.process_time(): this process's CPU seconds, all threads
    event: object


class Recorder:
    """An event sink that timestamps every event (wall clock and process CPU time)."""

    def __init__(self) -> None:
        self.stamps: list[Stamp] = []

    def __call__(self, event) -> None:
        self.stamps.append(Stamp(time.perf_counter(), time.process_time(), event))

    def of(self, kind: str, phase: str | None = None) -> list[Stamp]:
        return [s for s in self.stamps if _is(s, kind, phase)]

    def first(self, kind: str, phase: str | None = None) -> Stamp | None:
        return next((s for s in self.stamps if _is(s, kind, phase)), None)

    def last(self, kind: str, phase: str | None = None) -> Stamp | None:
        """Searched from the end: a command source polled at every step finds it in a few
        comparisons (``of`` scans every event so far, which would charge the engine's time
        with a search that grows with the run)."""
        return next((s for s in reversed(self.stamps) if _is(s, kind, phase)), None)


def _is(stamp: Stamp, kind: str, phase: str | None) -> bool:
    return getattr(stamp.event, "kind", None) == kind and (phase is None or getattr(stamp.event, "phase", None) == phase)


class StopAfter:
    """A command source that asks the run to Stop once ``seconds`` have passed since the first
    training step and the engine has reported at least ``min_steps`` steps after its first report
    (polled by the engine at step boundaries). Keeps every benchmark cell short."""

    def __init__(self, recorder: Recorder, seconds: float, min_steps: int = 0) -> None:
        self.recorder, self.seconds, self.min_steps, self.sent = recorder, seconds, min_steps, False
        self.start: Stamp | None = None  # the first training Progress, found once

    def poll(self) -> list:
        from lora_gui import events as ev

        if self.sent:
            return []
        self.start = self.start or self.recorder.first("progress", "training")
        if self.start is None or time.perf_counter() - self.start.wall < self.seconds:
            return []
        if self.recorder.last("progress", "training").event.step - self.start.event.step >= self.min_steps:
            self.sent = True
            return [ev.Stop()]
        return []


@dataclass
class Rate:
    steps: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return self.steps / self.cpu_s if self.cpu_s > 0 else float("nan")


def steady_rate(recorder: Recorder, warmup_s: float = 0.4) -> Rate:
    """Steps per second of the training loop in steady state, from the engine's own Progress
    events: from the first one emitted at least ``warmup_s`` after the first step, to the last one
    (the engine reports at the first step, then at most every 0.5 s, and at the end at once)."""
    training = [s for s in recorder.of("progress", "training")]
    if len(training) < 2:
        raise RuntimeError("the run reported fewer than two training progress events")
    first = next((s for s in training[1:] if s.wall - training[0].wall >= warmup_s), training[1])
    last = training[-1]
    if last is first:
        first = training[0]
    return Rate(last.event.step - first.event.step, last.wall - first.wall, last.cpu - first.cpu)


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> float:
    """Start a new peak-RSS window and return the RSS now, in MB. On Linux writing 5 to
    ``/proc/self/clear_refs`` resets the high-water mark that ``peak_rss_mb`` reads, so a transient
    peak while importing torch and diffusers is not taken for the peak of what follows. Elsewhere
    nothing is reset and the peak so far is returned (the growth after it then reads as 0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return peak_rss_mb()


# --- tables and the report ------------------------------------------------------------------------

def fmt(value, digits: int = 2) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's result: a title, a markdown table and sentences under it."""

    title: str
    table: str = ""
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the raw numbers (kept in the JSON next to the report)
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"#### {self.title}", ""]
        if self.table:
            parts += [self.table, ""]
        parts += [f"- {note}" for note in self.notes]
        if self.seconds:
            parts.append(f"- (this benchmark took {self.seconds:.0f} s)")
        return "\n".join(parts).rstrip() + "\n"


def report_markdown(sections: Sequence[Section], info: dict[str, str]) -> str:
    head = f"### Run of {info['date']}: {info['cpu']}, {info['cores']} cores, torch {info['torch']}"
    machine_line = ", ".join(f"{k}: {v}" for k, v in info.items())
    return "\n".join([head, "", f"Machine: {machine_line}.", ""] + [s.markdown() for s in sections])


def append_report(sections: Sequence[Section], path: Path = REPORT) -> str:
    """Append one run (machine description + every section) to BENCHMARKS.md; returns the text."""
    text = report_markdown(sections, machine())
    existing = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    path.write_text(existing.rstrip() + "\n\n" + text, encoding="utf-8")
    raw = Path(__file__).with_name("last-run.json")  # the raw numbers (git-ignored)
    try:
        raw.write_text(json.dumps({s.title: s.data for s in sections}, indent=1, default=str))
    except OSError:
        pass
    return text


def print_section(section: Section) -> None:
    print(section.markdown(), flush=True)
