"""Reporting a run's losses: LossReported and Progress events and the TensorBoard scalars."""

from __future__ import annotations

import math
import time

import torch

from lora_gui import events as ev
from lora_gui.engine.errors import Diverged

REPORT_INTERVAL_S = 0.5


def flush(t, force: bool = False) -> None:
    """Report the trainer's buffered step losses. Reading a loss waits for the device, so it happens
    at most every half second (and at once for the first step), not after every step."""
    now = time.time()
    if not t._pending or not (force or now - t._last_report >= REPORT_INTERVAL_S or not t.losses):
        return
    values = torch.stack([loss for _, _, loss, _ in t._pending]).float().cpu().tolist()
    pending, t._pending = t._pending, []
    t._last_report = now
    for (step, epoch, _, lr), value in zip(pending, values):
        if not math.isfinite(value):
            raise Diverged(
                f"The loss became {value} at step {step}: the learning rate is probably too high "
                "(or fp16 overflowed). Lower training.learning_rate or use bf16; the last saved "
                "checkpoint is kept.")
        t.losses.append(value)
        norms = t._norm_figures.pop(step, {})
        t.emit(ev.LossReported(step=step, epoch=epoch, loss=value, lr=lr, **norms))
        if t._writer is not None:  # with sd-scripts' max_norm/* scalars
            t._writer.add_scalars({"loss/train": value, "lr": lr,
                                   **{f"max_norm/{name}": figure for name, figure in norms.items()}}, step)
    p, plan = t.progress, t.plan
    elapsed = now - t._t_loop
    rate = (p.step - t._step_at_loop) / elapsed if elapsed > 0 else 0.0
    t.emit(ev.Progress(step=p.step, total_steps=plan.total_steps, epoch=p.epoch + 1, epochs=plan.epochs,
                       elapsed_s=now - t.t_start, steps_per_s=rate,
                       eta_s=(plan.total_steps - p.step) / rate if rate > 0 else 0.0))
