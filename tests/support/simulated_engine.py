"""A stand-in engine that follows ``run_training``'s contract without torch: for fast worker tests
and for developing the GUI. Select it in the trainer process with
``LORA_GUI_WORKER_ENGINE=simulated_engine:run_training`` with ``tests/support`` on ``PYTHONPATH``
(the worker tests set both).

``LORA_GUI_SIMULATE`` picks a behaviour: ``ok`` (default), ``raise`` (an exception escapes the
engine), ``ignore-stop`` (never obeys Stop), ``no-result`` (returns without a final event).
``LORA_GUI_SIMULATE_STEP_S`` is the time per step (default 0.05). Steps: ``images.max_steps`` or 20.
It writes a small placeholder file as the "LoRA" (the text ``simulated``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lora_gui import events as ev
from lora_gui.settings import TrainingSettings


def run_training(settings: TrainingSettings, events: ev.EventSink, commands: ev.CommandSource):
    mode = os.environ.get("LORA_GUI_SIMULATE", "ok")
    step_s = float(os.environ.get("LORA_GUI_SIMULATE_STEP_S", "0.05"))
    total = settings.images.max_steps or 20
    out_dir = Path(settings.model.output_folder)
    if not Path(settings.model.img_folder).is_dir():
        events(ev.Failed(message=f"model.img_folder: the folder {settings.model.img_folder} does "
                                 "not exist: check the path."))
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    events(ev.Log(message=f"Simulating {total} steps"))
    events(ev.Started(total_steps=total, steps_per_epoch=total, epochs=1, num_train_images=1,
                      num_reg_images=0, device="simulated", output_dir=str(out_dir)))
    t0 = time.time()
    for step in range(1, total + 1):
        time.sleep(step_s)
        if mode == "raise" and step == 2:
            raise RuntimeError("simulated failure inside the engine")
        elapsed = time.time() - t0
        events(ev.LossReported(step=step, epoch=1, loss=1.0 / step, lr=1e-4))
        events(ev.Progress(step=step, total_steps=total, epoch=1, epochs=1, elapsed_s=elapsed,
                           steps_per_s=step / elapsed, eta_s=(total - step) * step_s))
        for command in commands.poll():
            if isinstance(command, ev.Stop) and mode != "ignore-stop":
                return _finish(settings, events, step, stopped=True)
            if isinstance(command, ev.SampleNow):
                events(ev.SampleReady(step=step, epoch=1, path=str(out_dir / "sample.png"),
                                      prompt="simulated"))
    if mode == "no-result":
        return None
    return _finish(settings, events, total, stopped=False)


def _finish(settings: TrainingSettings, events: ev.EventSink, step: int, stopped: bool):
    name = settings.model.output_name + (f"-step{step:06d}" if stopped else "")
    path = Path(settings.model.output_folder) / f"{name}.{settings.model.save_as}"
    path.write_text("simulated\n", encoding="utf-8")
    events(ev.CheckpointSaved(step=step, epoch=1, path=str(path), final=not stopped))
    events(ev.Finished(step=step, output_path=str(path), stopped=stopped, files=(str(path),)))
    return None
