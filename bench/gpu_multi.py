"""Samples/s on 1 GPU against all the GPUs of this machine (``accelerate launch --multi_gpu``), the
same global batch per step, through the worker as the page starts it.

    python bench/gpu_multi.py                     # 1 vs every GPU found (NVML), demo model, 256 px
    python bench/gpu_multi.py --resolution 512 --global-batch 16

The demo model is tiny, so this measures the launcher, the per-step all-reduce and the data path
more than the U-Net; for a real model point ``--base-model`` at a Stable Diffusion checkpoint.
Not part of ``python -m bench`` (the CPU suite); on a machine without GPUs it says so and stops.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.multi_process import run_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from lora_gui.worker.launch import find_gpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--base-model", default="")
    args = parser.parse_args(argv)
    gpus = find_gpus()
    if len(gpus) < 2:
        print(f"bench/gpu_multi.py needs 2 or more NVIDIA GPUs; found {len(gpus)}.")
        return 0
    common.setup()
    print("; ".join(g.describe() for g in gpus))
    counts = sorted({1, len(gpus)})
    if args.global_batch % len(gpus):
        print(f"--global-batch must be a multiple of {len(gpus)} (the GPUs).")
        return 2
    extra = ("training.mixed_precision=bf16",) + (
        (f"model.base_model={args.base_model}",) if args.base_model else ())
    print(run_table(counts, global_batch=args.global_batch, resolution=args.resolution,
                    steps=args.steps, extra=extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
