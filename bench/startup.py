"""3. Start-up: seconds from a ``lora-gui train`` invocation to the first optimizer step, broken
down by the engine's own events, and what the imports cost; and (``gui_start_to_first_loss``,
measured by :mod:`bench.gui`) from clicking Start in the GUI to the first loss point in the page.

CLI: ``python -m bench._cli_probe train --preset demo-tiny-cpu --set ...`` is ``lora-gui train``
plus a timestamped line per event; the clock starts just before the process is launched. One
untimed run first (the "first (cached) run": byte-code and file caches warm), then medians of
``BENCH_STARTUP_REPEATS`` (3) runs. Phases, each up to the event that ends it:

* interpreter + imports + set-up: to the Log "Loading the base model" (Python, the CLI and
  settings, torch, the engine modules, accelerate's set-up);
* model load (+ dataset scan): to the Log "Caching the latents" (this includes importing the
  diffusers/transformers model classes);
* latent caching: to the last "caching latents" Progress;
* LoRA, text cache, optimizer, run files: to the Started event;
* first step: to the first training Progress (sent right after the first optimizer step).

Run alone: ``python -m bench.startup``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common

REPEATS = int(os.environ.get("BENCH_STARTUP_REPEATS", "3"))
PHASES = ("interpreter + imports + set-up", "model load + dataset scan", "latent caching",
          "LoRA + text cache + optimizer + run files", "first optimizer step")


def _cli_run(work: Path, index: int) -> dict[str, float]:
    paths = common.demo(work)
    events = work / "startup" / f"events-{index}.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)
    sets = [f"model.base_model={paths.model_dir}", f"model.img_folder={paths.dataset_dir}",
            f"model.output_folder={work / 'startup' / f'out-{index}'}", "images.max_steps=2",
            "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0"]
    args = [sys.executable, "-m", "bench._cli_probe", "train", "--preset", "demo-tiny-cpu"]
    for item in sets:
        args += ["--set", item]
    env = common.child_env(BENCH_EVENTS=str(events))
    t0 = time.time()
    proc = subprocess.run(args, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"lora-gui train failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    lines = [json.loads(line) for line in events.read_text().splitlines()]

    def first(pred) -> float | None:
        return next((e["t"] for e in lines if pred(e)), None)

    def last(pred) -> float | None:
        times = [e["t"] for e in lines if pred(e)]
        return times[-1] if times else None

    loading = first(lambda e: e["kind"] == "log" and (e["message"] or "").startswith("Loading the base"))
    caching = first(lambda e: e["kind"] == "log" and (e["message"] or "").startswith("Caching the latents"))
    cached = last(lambda e: e["kind"] == "progress" and e["phase"] == "caching latents")
    started = first(lambda e: e["kind"] == "started")
    step1 = first(lambda e: e["kind"] == "progress" and e["phase"] == "training")
    marks = [t0, loading, caching, cached or caching, started, step1]
    out = {}
    for name, a, b in zip(PHASES, marks, marks[1:]):
        out[name] = (b - a) if a is not None and b is not None else float("nan")
    out["total"] = step1 - t0 if step1 else float("nan")
    return out


_IMPORTS = """
import time, json
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import lora_gui.engine.train, accelerate; t.append(time.perf_counter())
from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel; t.append(time.perf_counter())
import peft; t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
"""


def import_costs() -> dict[str, float]:
    """Seconds to import, in a fresh interpreter, in the order the engine does."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _IMPORTS], cwd=common.ROOT, env=common.child_env(),
                          capture_output=True, text=True, timeout=300)
    total = time.perf_counter() - t0
    parts = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ("torch", "engine modules + accelerate", "diffusers + transformers model classes", "peft")
    return {"python -c (total, with interpreter start)": total, **dict(zip(names, parts))}


def gui_start_to_first_loss(work: Path) -> dict:
    """Seconds from clicking Start in the GUI to the first loss point in the page, on the demo
    after a first run that builds it (see :mod:`bench.gui`); {"error": sentence} when the GUI
    cannot be driven here."""
    from bench import gui

    try:
        result = gui.measure(work)
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return {"error": f"{type(exc).__name__}: {exc}"}
    rows = gui.startup_rows(result)
    total = rows["**Start -> first loss point (cached runs)**"]
    notes = [f"GUI: the demo preset in the real GUI (app.py) and worker, clicked in chromium by "
             f"Playwright; medians of {len(result['runs'])} runs after the first. Target: first loss "
             f"point within 5 s of Start: {'met' if total <= 5 else 'NOT met'} ({total:.1f} s)."]
    return {"table": rows, "notes": notes, "raw": result}


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    common.demo(work)
    _cli_run(work, 0)  # the first (cached) run: byte code, file caches
    runs = [_cli_run(work, i + 1) for i in range(REPEATS)]
    imports = import_costs()
    rows = [(name, common.median(r[name] for r in runs)) for name in (*PHASES, "total")]
    rows[-1] = ("**total: invocation to the first optimizer step**", rows[-1][1])
    table = common.markdown_table(("lora-gui train (demo preset)", "seconds (median)"), rows)
    table += "\n\n" + common.markdown_table(("imports in a fresh interpreter", "seconds"),
                                            list(imports.items()))
    notes = [f"Median of {REPEATS} runs after one untimed run; the demo preset at 64 px (22 images, "
             "flip_aug: 42 latents), one torch thread."]
    data = {"cli": runs, "imports": imports}
    gui = gui_start_to_first_loss(work)
    if "error" not in gui:
        data["gui"] = gui["raw"]
        table += "\n\n" + common.markdown_table(("GUI (demo preset)", "seconds"),
                                                list(gui["table"].items()))
        notes += gui["notes"]
    else:
        notes.append(f"GUI: not measured ({gui['error']}). TODO(lead): make bench/gui.py work "
                     "with the GUI as it lands.")
    return common.Section("3. Start-up", table, notes, data, time.perf_counter() - t0)


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
