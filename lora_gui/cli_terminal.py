"""`lora-gui train` in the terminal: the engine in this process, a tqdm bar, Ctrl+C to stop.

Front-end code beside cli.py (it may import the engine and the worker; the engine imports neither).
"""

from __future__ import annotations

import signal
import sys

from tqdm import tqdm

from lora_gui import events as ev
from lora_gui.settings import TrainingSettings
from lora_gui.settings.io import save_settings_copy
from lora_gui.worker.demo import demo_dir_for, demo_family


def ensure_demo(settings: TrainingSettings) -> None:
    """Build the tiny demo model and dataset when the settings point at a demo that is missing."""
    demo_dir = demo_dir_for(settings)
    if demo_dir is not None:
        from lora_gui.engine.demo import build_demo

        print(f"Building the demo model and dataset in {demo_dir} ...", file=sys.stderr)
        build_demo(demo_dir, family=demo_family(settings))


class TerminalSink:
    """Shows training progress as a tqdm bar (with loss and learning rate), and every other event
    as the line ``events.describe`` gives it; keeps the outcome (Finished or Failed)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.outcome: ev.Event | None = None

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Started):
            self.bar = tqdm(total=event.total_steps, unit="step", dynamic_ncols=True)
        elif isinstance(event, ev.Progress) and self.bar is not None and event.phase == "training":
            self.bar.update(event.step - self.bar.n)  # the bar is the training progress
        elif isinstance(event, ev.LossReported) and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif isinstance(event, (ev.Finished, ev.Failed)):
            if self.bar is not None:
                self.bar.close()
            self.outcome = event  # train_from_cli prints the result
        elif (line := ev.describe(event)) is not None:
            (self.bar.write if self.bar else print)(line)


def _run_queue_folder(settings: TrainingSettings) -> int:
    from lora_gui.worker.queue import queue_main

    print(f"Running the queue in {settings.runs.multi_run_folder} (runs.multi_run_folder).")
    return queue_main([settings.runs.multi_run_folder])


def train_from_cli(settings: TrainingSettings) -> int:
    if settings.runs.save_json_only:
        print(f"save_json_only is set: wrote {save_settings_copy(settings)} and did not train.")
        return 0
    if settings.runs.multi_run_folder.strip():
        return _run_queue_folder(settings)

    from lora_gui.engine.train import run_training

    ensure_demo(settings)
    commands = ev.CommandQueue()

    def on_interrupt(signum, frame):  # Ctrl+C once: stop and save (LoRA + state); twice: abort
        if any(isinstance(c, ev.Stop) for c in commands.pending):
            raise KeyboardInterrupt
        print("\nStopping after this step and saving (press Ctrl+C again to abort) ...", file=sys.stderr)
        commands.put(ev.Stop())

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = run_training(settings, TerminalSink(), commands)
    finally:
        signal.signal(signal.SIGINT, previous)
    return _report(result)


def _report(result) -> int:
    state = ev.RunState.of(result.status)
    if state is ev.RunState.FAILED:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    print(f"{'Stopped' if state is ev.RunState.STOPPED else 'Finished'} at step {result.step}.")
    print(f"LoRA: {result.output_path}")
    if result.state_dir:
        print(f"State: {result.state_dir}")
    for path in result.files:
        if path != result.output_path:
            print(f"  wrote {path}")
    return 0


# --- lora-gui tools ... ------------------------------------------------------------------------

def tool_from_cli(job, runs_dir: str, timeout_s: float = 24 * 3600) -> int:
    """Run a tool job in the background worker (a run folder under ``runs_dir/tools``), follow its
    progress with a bar, Ctrl+C asks it to stop; then print what it did."""
    import json
    import time

    from lora_gui.worker.client import WorkerClient

    client = WorkerClient(runs_dir).tools_client()
    try:
        run = client.start_tool(job)
    except RuntimeError as exc:  # RunActiveError: another tool is still running in runs_dir/tools
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop_sent = []

    def on_interrupt(signum, frame):
        if stop_sent:
            raise KeyboardInterrupt
        print("\nStopping the tool (press Ctrl+C again to leave it running) ...", file=sys.stderr)
        run.stop()
        stop_sent.append(True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    bar, since, deadline = None, 0, time.monotonic() + timeout_s
    try:
        while True:
            events, since = run.poll(since)
            for event in events:
                if isinstance(event, ev.Progress):
                    bar = bar or tqdm(total=event.total_steps, unit="module", desc=job.kind, dynamic_ncols=True)
                    bar.total = event.total_steps
                    bar.update(event.step - bar.n)
            info = run.info()
            if info.final or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
        client.close()
    if not info.final:
        print(f"error: the tool is still running after {timeout_s:g} s: see {run.run_dir}", file=sys.stderr)
        return 1
    if info.state is ev.RunState.FAILED:
        print(f"error: {info.message}", file=sys.stderr)
        return 1
    result = json.loads(run.paths.result.read_text(encoding="utf-8")) if run.paths.result.is_file() else {}
    print(tool_summary(result) if result else info.message)
    return 0


def tool_summary(result: dict) -> str:
    """What a tool did, in a few lines (the inspect card in full)."""
    kind = result.get("tool")
    if kind == "inspect":
        chart = [(b["block"], b["norm"]) for b in result.get("blocks", [])]
        top = max((n for _, n in chart), default=0) or 1.0
        bars = "\n".join(f"{label:>6} {'#' * round(40 * n / top):<40} {n:.4g}" for label, n in chart)
        return result.get("card_text", "") + "\nBlock weights (||scale * up @ down||):\n" + bars
    lines = [f"Wrote {result.get('output')} ({result.get('output_size', 0) / 1e6:.2f} MB)"]
    if kind == "resize":
        lines.append(f"Kept energy (Frobenius): mean {result['mean_fro_retained']:.1%}, "
                     f"lowest {result['min_fro_retained']:.1%}; the input was {result['input_size'] / 1e6:.2f} MB")
        lines += [f"  {m['name']}: rank {m['old_rank']} -> {m['new_rank']}, alpha {m['new_alpha']:g}, "
                  f"kept {m['fro_retained']:.1%}" for m in result.get("modules", [])]
    elif kind == "extract":
        lines.append(f"{result['modules']} modules, mean kept energy {result['mean_fro_retained']:.1%}")
    return "\n".join(lines)
