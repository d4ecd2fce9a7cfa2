"""The benchmarks keep working: bench/gpu_sd15.py --smoke (the GPU benchmark, shrunk to run on a
CPU) prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_sd15_smoke_prints_its_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_sd15.py"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| resolution | batch | grad. checkpointing | text encoder | it/s | images/s |" in out
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 4, out  # batch 1 and 4, checkpointing off and on
    for row in rows:
        it_s = float(row.split("|")[5])
        assert it_s > 0, row
    assert re.search(r"\| 64 \| 4 \| on \|", out)


@pytest.mark.slow
def test_gpu_sdxl_smoke_prints_its_table_with_the_estimate():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_sdxl.py"), "--smoke"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| resolution | batch | grad. checkpointing | U-Net storage | it/s | images/s | peak VRAM (GiB) " \
           "| estimate (GiB) | peak RSS (MB) |" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 4, out  # batch 1 and 2, checkpointing off and on
    for row in rows:
        assert float(row[5]) > 0 and float(row[8]) > 0, row  # it/s and the estimate
    assert re.search(r"\| 64 \| 2 \| on \| fp32 \|", out)
