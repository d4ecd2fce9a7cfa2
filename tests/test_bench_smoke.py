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


@pytest.mark.slow
def test_gpu_flux_smoke_trains_fp8_and_nf4_bases_and_prints_the_estimate():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_flux.py"), "--smoke", "--storage", "fp8,nf4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 64 |")]
    assert [(r[3].strip(), r[4].strip()) for r in rows] == [("off", "fp8"), ("on", "fp8"), ("off", "nf4"), ("on", "nf4")]
    # it/s measured, the estimate computed (the tiny model's few MB print as 0.00 GiB), RSS measured
    assert all(float(r[5]) > 0 and r[8].strip() != "-" and float(r[9]) > 0 for r in rows)


@pytest.mark.slow
def test_flux_demo_smoke_prints_the_ratio_and_the_estimate_beside_the_rss(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BENCH_WORKDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench.flux_demo", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    speed = [line.split("|") for line in out.splitlines() if line.startswith("| no clipping |")]
    assert len(speed) == 1, out
    steps_s = [float(speed[0][i]) for i in (2, 3, 4)]  # engine, bare, diffusers-style
    assert all(v > 0 for v in steps_s), speed
    ratio = float(speed[0][5])
    assert abs(ratio - steps_s[0] / steps_s[1]) < 0.01, speed  # the median of one run: its engine / bare
    engine = next(line.split("|") for line in out.splitlines() if line.startswith("| engine (Trainer"))
    estimate, peak, first, second = (float(engine[i]) for i in (3, 4, 5, 6))
    assert 0 < estimate < 100 and peak > 100 and first > second, engine  # a tiny model's MB, the process's RSS
    assert "Estimated peak memory:" in out
