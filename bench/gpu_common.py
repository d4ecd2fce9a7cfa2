"""What the GPU benchmarks (``gpu_sd15.py``, ``gpu_sdxl.py``, ``gpu_flux.py``) share: the device, the
optimizer choice, the training step's tail, the timed loop (warm-up, then timed steps between
``torch.cuda.synchronize()`` calls, peak VRAM and peak RSS), the grid of batch sizes and gradient
checkpointing (a configuration that runs out of memory gets NaN), the common options and the
report (the tables are ``common.markdown_table``'s). Each benchmark keeps its own model, forward and loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common

# what a timed configuration measures (``timed_loop``); NaN where it ran out of memory
METRICS = ("it_s", "images_s", "peak_vram_gib", "peak_rss_mb")


def device_for(cpu: bool = False):
    """CUDA unless ``cpu`` or there is none (then one torch thread unless BENCH_THREADS says
    otherwise); TF32 matmuls on CUDA, as the engine allows them."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    return torch.device("cuda" if cuda else "cpu")


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"


def optimizer_for(params, device):
    """AdamW8bit where bitsandbytes has CUDA kernels (the usual GPU setting), else AdamW; and its name."""
    import torch

    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4), "AdamW8bit"
        except Exception:  # noqa: BLE001 - no CUDA kernels: plain AdamW
            pass
    return torch.optim.AdamW(params, lr=1e-4), "AdamW"


def optimizer_step(loss, params, optimizer, max_norm: float = 1.0):
    """The tail of every benchmark's step, as the engine does it: backward, gradient clipping at
    ``max_norm``, optimizer step, gradients freed. Returns the detached loss."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def timed_loop(step, device, *, batch: int, warmup: int, steps: int) -> dict:
    """``step()`` (one training step returning its detached loss) ``warmup`` times, then ``steps``
    times timed between synchronisations: it/s, images/s, peak VRAM (GiB; NaN on a CPU) and this
    process's peak RSS (MB). A loss that is not finite at the end raises."""
    import resource

    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loss = None
    for _ in range(warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if loss is not None and not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {float(loss)}")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"it_s": steps / seconds, "images_s": steps * batch / seconds,
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "peak_rss_mb": peak_rss / (2**20 if sys.platform == "darwin" else 1024)}


def grid(batches: str, measure, **cell) -> list[dict]:
    """``measure(batch, checkpointing)`` for each of the comma-separated ``batches`` with gradient
    checkpointing off and on; a configuration that runs out of GPU memory gets its description
    (``cell``) and NaN measurements, and the next one runs."""
    import torch

    results = []
    for batch in (int(b) for b in batches.split(",")):
        for checkpointing in (False, True):
            try:
                results.append(measure(batch, checkpointing))
            except torch.cuda.OutOfMemoryError:
                nan = dict.fromkeys((*METRICS, "estimate_gib"), float("nan"))
                results.append({**cell, "batch": batch, "checkpointing": checkpointing, **nan})
                torch.cuda.empty_cache()
    return results


def parser(description: str, *, smoke: str, resolution: int, batches: str, steps: int, warmup: int,
           rank: int) -> argparse.ArgumentParser:
    """The options every GPU benchmark has; ``parse`` fills in the defaults (smoke: 64 px, 2 timed
    steps after 1 warm-up)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help=smoke)
    p.add_argument("--resolution", type=int, default=None, help=f"pixels (default {resolution}; smoke 64)")
    p.add_argument("--batches", default=batches, help=f"comma-separated batch sizes (default {batches})")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps per cell (default {steps}; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {warmup}; smoke 1)")
    p.add_argument("--rank", type=int, default=rank)
    p.add_argument("--report", action="store_true", help="append the table to BENCHMARKS.md")
    p.set_defaults(full_size=(resolution, steps, warmup))
    return p


def parse(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(argv)
    resolution, steps, warmup = args.full_size
    args.resolution = args.resolution or (64 if args.smoke else resolution)
    args.steps = args.steps or (2 if args.smoke else steps)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else warmup)
    return args


def publish(title: str, text: str, notes: list[str], results: list[dict], report: bool) -> None:
    """Print the table; with ``--report`` also append it to BENCHMARKS.md."""
    print(text, flush=True)
    if report:
        common.append_report([common.Section(title, text, notes, {"results": results})])
