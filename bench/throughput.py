"""2. Throughput: steps/s, images/s and the trainer's peak RSS on the tiny demo model for
resolutions 64/128/256 x batch 1/4, text encoder frozen (its outputs cached) or trained, gradient
checkpointing off or on.

Every cell is its own process that runs ``run_training`` until a Stop command a few seconds into
training, times the steady state from the engine's Progress events and reports its
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Cells run one after another. To keep a cell short,
a fresh ``python -m bench.throughput --json`` process imports the engine once (torch, diffusers,
transformers, peft, accelerate: several seconds) and forks one child per cell on Linux; a forked
child's RSS counts the imported modules as a trainer process's does. Elsewhere (or with
``BENCH_NO_FORK=1``) each cell is a new interpreter (``--cell RES BATCH TE GC``).

Run alone: ``python -m bench.throughput``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common

RESOLUTIONS = (64, 128, 256)
BATCHES = (1, 4)
WINDOW_S = float(os.environ.get("BENCH_CELL_S", "2.5"))


def cell(work: Path, resolution: int, batch: int, train_te: bool, checkpointing: bool,
         seconds: float) -> dict:
    from lora_gui.dataset.scan import scan_dataset
    from lora_gui.engine.train import run_training

    paths = common.demo(work)
    extra = [f"training.unet_only={'false' if train_te else 'true'}",
             f"training.gradient_checkpointing={'true' if checkpointing else 'false'}"]
    out = work / "throughput" / f"{resolution}-{batch}-{int(train_te)}-{int(checkpointing)}-{os.getpid()}"
    settings = common.bench_settings(paths, out, resolution=resolution, batch_size=batch, extra=extra)
    recorder = common.Recorder()
    result = run_training(settings, recorder, common.StopAfter(recorder, seconds, min_steps=3))
    if result.status == "failed":
        raise RuntimeError(result.message)
    rate = common.steady_rate(recorder)
    started = recorder.of("started")[0].event
    samples = scan_dataset(settings.model.img_folder, repeats=settings.images.repeats).num_epoch_samples
    images_per_step = samples / started.steps_per_epoch  # the last batch of an epoch may be short
    return {"resolution": resolution, "batch": batch, "train_te": train_te,
            "checkpointing": checkpointing, "steps": rate.steps, "steps_per_s": rate.per_s,
            "images_per_s": rate.per_s * images_per_step, "peak_rss_mb": common.peak_rss_mb()}


CELLS = list(itertools.product(RESOLUTIONS, BATCHES, (False, True), (False, True)))
USE_FORK = sys.platform == "linux" and not os.environ.get("BENCH_NO_FORK")


def _failed(config: tuple, message: str) -> dict:
    res, batch, te, gc = config
    return {"resolution": res, "batch": batch, "train_te": te, "checkpointing": gc, "error": message}


def _cell_in_child(work: Path, config: tuple, conn) -> None:
    try:
        conn.send(cell(work, *config, WINDOW_S))
    except BaseException as exc:  # noqa: BLE001 - reported in the table
        conn.send(_failed(config, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _forked_cell(work: Path, config: tuple) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_cell_in_child, args=(work, config, send))
    child.start()
    send.close()
    try:
        result = receive.recv() if receive.poll(300) else _failed(config, "timed out")
    except EOFError:
        result = _failed(config, f"the cell process died (exit code {child.exitcode})")
    child.join(30)
    return result


def _spawned_cell(work: Path, config: tuple) -> dict:
    res, batch, te, gc = config
    args = [sys.executable, "-m", "bench.throughput", "--cell", str(res), str(batch), str(int(te)),
            str(int(gc)), "--seconds", str(WINDOW_S)]
    proc = subprocess.run(args, cwd=common.ROOT, env=common.child_env(BENCH_WORKDIR=str(work)),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return _failed(config, " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]))
    return json.loads(lines[-1])


def all_cells(work: Path) -> list[dict]:
    """Every cell, in this process's children (call in a fresh process: forked children inherit
    its memory)."""
    if USE_FORK:
        import lora_gui.engine.train  # noqa: F401 - what every trainer imports, once
        from lora_gui.engine import model_load, network  # noqa: F401

        return [_forked_cell(work, config) for config in CELLS]
    return [_spawned_cell(work, config) for config in CELLS]


def measure(work: Path) -> list[dict]:
    """All cells, from a fresh ``python -m bench.throughput --json`` process."""
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--json"], cwd=common.ROOT,
                          env=common.child_env(BENCH_WORKDIR=str(work)), capture_output=True,
                          text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode or not lines:
        message = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return [_failed(config, message) for config in CELLS]
    return json.loads(lines[-1])


HEADERS = ("resolution", "batch", "text encoder", "grad. checkpointing", "steps/s", "images/s",
           "peak RSS (MB)")


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    common.demo(work)
    t0 = time.perf_counter()
    results = measure(work)
    rows = []
    for r in results:
        what = ("trained" if r["train_te"] else "frozen, cached", "on" if r["checkpointing"] else "off")
        if "error" in r:
            rows.append((r["resolution"], r["batch"], *what, "failed", r["error"][:80], "-"))
        else:
            rows.append((r["resolution"], r["batch"], *what, r["steps_per_s"], r["images_per_s"],
                         f"{r['peak_rss_mb']:.0f}"))
    notes = [
        f"Each cell is one process running run_training on the tiny demo model (U-Net LoRA rank 4, "
        f"plus the text-encoder LoRA when the text encoder is trained; latents cached, buckets off, "
        f"one torch thread) until a Stop about {WINDOW_S:.1f} s into training; steps/s is the steady "
        "state from the engine's Progress events; images/s counts the short last batch of an epoch.",
        "Peak RSS is the cell process's ru_maxrss (imports, model, caches and training together).",
    ]
    return common.Section("2. Throughput", common.markdown_table(HEADERS, rows), notes,
                          {"results": results}, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", nargs=4, type=int, metavar=("RES", "BATCH", "TE", "GC"))
    parser.add_argument("--seconds", type=float, default=WINDOW_S)
    parser.add_argument("--json", action="store_true", help="run every cell, print them as JSON")
    args = parser.parse_args(argv)
    common.setup()
    work = common.workdir()
    common.demo(work)
    if args.cell:
        res, batch, te, gc = args.cell
        print(json.dumps(cell(work, res, batch, bool(te), bool(gc), args.seconds)), flush=True)
    elif args.json:
        print(json.dumps(all_cells(work)), flush=True)
    else:
        common.print_section(run(work))


if __name__ == "__main__":
    main()
