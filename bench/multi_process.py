"""Samples/s of one run on 1 process against N processes (``accelerate launch``), the same global
batch, through the worker as the page starts it.

    python bench/multi_process.py                 # the tiny demo, 1 vs 2 gloo processes on the CPU
    python bench/multi_process.py --processes 1,2,4 --resolution 128

On the CPU, with ``ACCELERATE_USE_CPU=1``, the processes share the machine's cores: expect no
speed-up on a small machine (the processes compete for the same cores and add a gradient
all-reduce per step); the number says what it costs. ``bench/gpu_multi.py`` is the GPU version.
The rate is rank 0's steps/s over the training loop (its last Progress event) x the global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def measure(processes: int, *, global_batch: int, resolution: int, steps: int, work: Path,
            extra: tuple[str, ...] = ()) -> dict:
    """One run; returns processes, samples/s, wall seconds, the final state."""
    from lora_gui import events as ev
    from lora_gui.worker.client import WorkerClient

    demo = common.demo(work)
    launch = ("launch.multi_gpu=true", f"launch.num_processes={processes}") if processes > 1 else ()
    settings = common.bench_settings(
        demo, work / f"out-{processes}", resolution=resolution, batch_size=global_batch // processes,
        steps=steps, extra=(*launch, "images.cache_latents=true", *extra))
    client = WorkerClient(work / f"runs-{processes}-{time.time_ns()}")
    t0 = time.perf_counter()
    run = client.start(settings)
    info = run.wait(1800)
    wall = time.perf_counter() - t0
    events, _ = run.poll(0)
    progress = [e for e in events if isinstance(e, ev.Progress) and e.phase == "training"]
    rate = progress[-1].steps_per_s * global_batch if progress else 0.0
    return {"processes": processes, "samples_per_s": rate, "wall_s": wall, "state": info.state.value,
            "message": info.message}


def run_table(process_counts: list[int], *, global_batch: int, resolution: int, steps: int,
              extra: tuple[str, ...] = ()) -> str:
    work = common.workdir()
    rows, base = [], None
    for n in process_counts:
        r = measure(n, global_batch=global_batch, resolution=resolution, steps=steps, work=work,
                    extra=extra)
        base = base or r["samples_per_s"]
        ratio = r["samples_per_s"] / base if base else 0.0
        rows.append((n, global_batch // n, common.fmt(r["samples_per_s"]), common.fmt(ratio),
                     common.fmt(r["wall_s"], 1), r["state"]))
        print(f"{n} process(es): {r['samples_per_s']:.2f} samples/s ({ratio:.2f}x), {r['state']}",
              flush=True)
    return common.markdown_table(("processes", "batch per process", "samples/s", "vs 1 process",
                                  "wall s (incl. start)", "state"), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    common.setup()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    counts = [int(n) for n in args.processes.split(",")]
    print(run_table(counts, global_batch=args.global_batch, resolution=args.resolution,
                    steps=args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
