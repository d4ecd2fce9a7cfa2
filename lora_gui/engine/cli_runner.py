"""`lora-gui train`: run the engine in this process with a tqdm bar in the terminal."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from tqdm import tqdm

from lora_gui import events as ev
from lora_gui.settings import TrainingSettings


def ensure_demo(settings: TrainingSettings, demo_dir: str | Path) -> None:
    """Build the tiny demo model and dataset when the settings point at a demo that is missing."""
    demo_dir = Path(demo_dir)
    wanted = {Path(settings.model.base_model), Path(settings.model.img_folder)}
    demo_paths = {demo_dir / "model", demo_dir / "dataset", demo_dir / "model.safetensors"}
    if wanted & demo_paths and not all(p.exists() for p in wanted):
        from lora_gui.engine.demo import build_demo

        print(f"Building the demo model and dataset in {demo_dir} ...", file=sys.stderr)
        build_demo(demo_dir)


class TerminalSink:
    """Shows progress with tqdm; prints log lines, the result, or the failure sentence."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.outcome: ev.Event | None = None

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Started):
            self.bar = tqdm(total=event.total_steps, unit="step", dynamic_ncols=True)
        elif isinstance(event, ev.Progress) and self.bar is not None and event.phase == "training":
            self.bar.update(event.step - self.bar.n)
        elif isinstance(event, ev.LossReported) and self.bar is not None:
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        elif isinstance(event, ev.Log):
            (self.bar.write if self.bar else print)(f"[{event.level}] {event.message}")
        elif isinstance(event, ev.ValidationLoss) and self.bar is not None:
            self.bar.write(f"validation loss at step {event.step}: {event.loss:.4f}")
        elif isinstance(event, (ev.Finished, ev.Failed)):
            if self.bar is not None:
                self.bar.close()
            self.outcome = event


def save_json_only(settings: TrainingSettings) -> Path:
    """`save_json_only`: write the settings where a run would, and do not train."""
    from lora_gui.settings import io

    folder = settings.runs.save_json_folder.strip() or settings.model.output_folder
    return io.save_settings(settings, Path(folder).expanduser() / f"{settings.model.output_name}_settings.json")


def train_from_cli(settings: TrainingSettings, demo_dir: str | Path = "demo") -> int:
    if settings.runs.save_json_only:
        print(f"save_json_only is set: wrote {save_json_only(settings)} and did not train.")
        return 0
    if settings.runs.multi_run_folder.strip():
        from lora_gui.worker.queue import queue_main

        print(f"Running the queue in {settings.runs.multi_run_folder} (runs.multi_run_folder).")
        return queue_main([settings.runs.multi_run_folder])

    from lora_gui.engine.train import run_training

    ensure_demo(settings, demo_dir)
    commands = ev.CommandQueue()
    # Ctrl+C once: stop and save (LoRA + state); twice: abort.
    def on_interrupt(signum, frame):
        if any(isinstance(c, ev.Stop) for c in commands.pending):
            raise KeyboardInterrupt
        print("\nStopping after this step and saving (press Ctrl+C again to abort) ...", file=sys.stderr)
        commands.put(ev.Stop())

    previous = signal.signal(signal.SIGINT, on_interrupt)
    sink = TerminalSink()
    try:
        result = run_training(settings, sink, commands)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.status == "failed":
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    print(f"{'Stopped' if result.status == 'stopped' else 'Finished'} at step {result.step}.")
    print(f"LoRA: {result.output_path}")
    if result.state_dir:
        print(f"State: {result.state_dir}")
    for path in result.files:
        if path != result.output_path:
            print(f"  wrote {path}")
    return 0
