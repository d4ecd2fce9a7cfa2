"""The cockpit's pieces without a browser: sample grids, the checkpoint table, the chart title that
makes a new series show live, the runs comparison and the trainer's resources line."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

from PIL import Image

from lora_gui import events as ev
from lora_gui.ui.compare import curve_rows, settings_diff
from lora_gui.ui.grid import CELL, LABEL_H, sample_grid
from lora_gui.ui.runview import RunView
from lora_gui.worker import resources

COLOURS = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (5, 0): (0, 0, 255), (5, 1): (255, 255, 0),
           (10, 0): (0, 255, 255), (10, 1): (255, 0, 255)}


def _samples(tmp_path):
    events = []
    for (step, index), colour in COLOURS.items():
        path = tmp_path / f"s{step}_{index}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        events.append(ev.SampleReady(step=step, epoch=1, path=str(path), prompt=f"p{index}", index=index))
    for strength, colour in ((0.5, (10, 20, 30)), (1.0, (200, 100, 50))):
        path = tmp_path / f"w{strength}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        events.append(ev.SampleReady(step=10, epoch=1, path=str(path), prompt="p0", strength=strength))
    return events


def _centre(grid, column: int, row: int):
    return grid.getpixel((column * CELL + CELL // 2, LABEL_H + row * CELL + CELL // 2))


def test_sample_grid_puts_prompts_in_rows_and_steps_in_columns(tmp_path):
    events = _samples(tmp_path)
    grid = sample_grid(events)
    assert grid.size == (3 * CELL, LABEL_H + 2 * CELL)
    for (step, index), colour in COLOURS.items():
        assert _centre(grid, [0, 5, 10].index(step), index) == colour
    sweep = sample_grid(events, sweep=True)
    assert sweep.size == (2 * CELL, LABEL_H + CELL)
    assert _centre(sweep, 0, 0) == (10, 20, 30) and _centre(sweep, 1, 0) == (200, 100, 50)
    assert sample_grid([e for e in events if e.strength is None], sweep=True) is None
    os.remove(tmp_path / "s5_1.png")  # a deleted file leaves its cell grey, nothing breaks
    assert _centre(sample_grid(events), 1, 1) == (235, 235, 235)


def test_checkpoint_rows_mark_the_best_existing_one_and_deleted_ones(tmp_path):
    paths = [tmp_path / f"c{i}.safetensors" for i in range(4)]
    for p in paths[1:]:
        p.write_bytes(b"x")
    view = RunView(run_id="r", state=ev.RunState.RUNNING)
    losses = [0.10, 0.30, 0.20, 0.25]  # c0 had the lowest but was deleted
    view.apply([ev.CheckpointSaved(step=10 * (i + 1), epoch=i + 1, path=str(p), validation_loss=v,
                                   final=i == 3) for i, (p, v) in enumerate(zip(paths, losses))])
    assert view.checkpoint_rows()[0] == [10, "c0.safetensors", "0.1000", "deleted"]  # no reason known (by hand)
    # the engine's deletion event names the retention rules that removed it
    view.apply([ev.CheckpointDeleted(path=str(paths[0]), reason="older than the last 2 epoch saves "
                                     "(images.save_last_n_epochs)")])
    assert view.checkpoint_rows() == [
        [10, "c0.safetensors", "0.1000", "deleted (save_last_n_epochs)"],
        [20, "c1.safetensors", "0.3000", ""],
        [30, "c2.safetensors", "0.2000", "★ best"],
        [40, "c3.safetensors", "0.2500", "final"]]


def test_the_chart_has_the_validation_series_before_its_first_point():
    """A run that validates sends a value-less validation row with its first losses, so the
    chart's colour domain has the series when the points come."""
    view = RunView(run_id="r", state=ev.RunState.RUNNING, expects_validation=True)
    view.apply([ev.LossReported(step=3, epoch=1, loss=0.5, lr=1e-3)])
    rows = view.plot_rows()
    assert rows[:2] == [{"step": 3, "loss": 0.5, "series": "loss"},
                        {"step": 3, "loss": 0.5, "series": "smoothed"}]
    assert rows[2]["series"] == "validation" and rows[2]["step"] == 3 and math.isnan(rows[2]["loss"])
    view.apply([ev.ValidationLoss(step=4, epoch=1, loss=0.4)])
    assert view.plot_rows()[2:] == [{"step": 4, "loss": 0.4, "series": "validation"}]
    plain = RunView(run_id="p", state=ev.RunState.RUNNING)
    plain.apply([ev.LossReported(step=3, epoch=1, loss=0.5, lr=1e-3)])
    assert {r["series"] for r in plain.plot_rows()} == {"loss", "smoothed"}


def test_compare_overlays_curves_and_lists_only_differing_settings():
    a, b = RunView(run_id="a"), RunView(run_id="b")
    a.apply([ev.LossReported(step=1, epoch=1, loss=1.0, lr=1), ev.ValidationLoss(step=1, epoch=1, loss=2.0)])
    b.apply([ev.LossReported(step=1, epoch=1, loss=3.0, lr=1)])
    assert curve_rows({"a": a, "b": b}) == [
        {"step": 1, "loss": 1.0, "series": "#1 loss"}, {"step": 1, "loss": 2.0, "series": "#1 validation"},
        {"step": 1, "loss": 3.0, "series": "#2 loss"}]
    diff = settings_diff({"a": {"training.learning_rate": 0.001, "model.output_name": "x", "samples.p": "1|2"},
                          "b": {"training.learning_rate": 0.0005, "model.output_name": "x"}})
    assert diff.splitlines() == [
        "**2 settings differ:**", "", "| setting | #1 `a` | #2 `b` |", "|---|---|---|",
        "| samples.p | `1\\|2` | – |", "| training.learning_rate | `0.001` | `0.0005` |"]
    assert settings_diff({"a": {"k": 1}, "b": {"k": 1}}) == "These runs were trained with the same settings."


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=12 * 2**30, total=140 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 61

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=11 * 2**30),
                SimpleNamespace(pid=1, usedGpuMemory=2**30)]


def test_resources_line_names_ram_and_each_gpu(monkeypatch):
    monkeypatch.setattr(resources, "_nvml_state", {"ok": True, "mod": FakeNvml()})
    line = resources.resources_markdown(os.getpid())
    ram, gpu = line.split(" · ")
    assert ram.startswith("Trainer RAM: ") and float(ram.split()[2]) > 0
    assert gpu == "GPU 0 NVIDIA H200: 12.0 / 140.0 GiB, 87 %, 61 °C (trainer 11.0 GiB)"
    monkeypatch.setattr(resources, "_nvml_state", {"ok": False})
    assert resources.resources_markdown(os.getpid()).endswith(
        "GPU: none seen by NVML (CPU run, or no NVIDIA driver)")
    assert resources.resources_markdown(None) == ""


def _panel_ctx():
    comp = {k: k for k in ("status", "progress", "plot", "gallery", "log", "result", "download",
                           "timer", "start", "stop", "save_now", "sample_now", "force_stop",
                           "checkpoints", "grid", "sweep", "resources")}
    runs = SimpleNamespace(trainer_pid=lambda run_id: None, queue_pending=lambda: False)
    return SimpleNamespace(components=comp, runs=runs, servable=lambda path: None)


def test_the_panel_sends_only_what_changed_and_polls_faster_until_the_first_point():
    from lora_gui.ui.run_panel import ACTIVE_POLL_S, FIRST_POINT_POLL_S, draw

    ctx, view = _panel_ctx(), RunView(run_id="r", state=ev.RunState.RUNNING)
    out = draw(ctx, view, force=True)
    assert out["timer"].value == FIRST_POINT_POLL_S < ACTIVE_POLL_S and out["timer"].active
    assert "resources" not in draw(ctx, view) and draw(ctx, view) == {}  # nothing new: nothing sent
    view.apply([ev.LossReported(step=1, epoch=1, loss=0.5, lr=1e-3)])
    out = draw(ctx, view)
    assert set(out) == {"plot", "timer"} and out["timer"].value == ACTIVE_POLL_S  # back to 1 s
    view.plot_drawn_at += 60  # as if drawn just now, however slow this machine is
    view.apply([ev.LossReported(step=2, epoch=1, loss=0.4, lr=1e-3),
                ev.Progress(step=2, total_steps=9, epoch=1, epochs=1, elapsed_s=1.0, steps_per_s=2.0,
                            eta_s=3.5)])
    assert set(draw(ctx, view)) == {"progress"}  # the chart waits for PLOT_MIN_INTERVAL_S
    assert draw(ctx, view) == {}
