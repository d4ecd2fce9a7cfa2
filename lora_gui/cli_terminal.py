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
from lora_gui.worker.demo import demo_dir_for


def ensure_demo(settings: TrainingSettings) -> None:
    """Build the tiny demo model and dataset when the settings point at a demo that is missing."""
    demo_dir = demo_dir_for(settings)
    if demo_dir is not None:
        from lora_gui.engine.demo import build_demo

        print(f"Building the demo model and dataset in {demo_dir} ...", file=sys.stderr)
        build_demo(demo_dir)


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
