"""Building the tiny demo model and dataset for the page (``lora_gui.worker.demo.demo_dir_for`` says
when the settings need one). No gradio here, and no torch: the model is
built by a child process (``python -m lora_gui.cli demo``), since the web process never imports torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

DEMO_BUILD_TIMEOUT_S = 600


class DemoBuildError(RuntimeError):
    """Building the demo failed; the message is a sentence for the page."""


def build_demo(out_dir: Path, started: Callable[[subprocess.Popen], None] | None = None,
               family: str = "sd") -> str:
    """Build the demo model and dataset in a child process; returns its output. It is built in a
    hidden sibling folder and renamed into place when complete, so an interrupted build never leaves
    a half-written model behind. ``started(popen)`` is told the process so that a shutdown can end
    it. Raises ``DemoBuildError`` with a sentence."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)  # ours, left by an interrupted build
    argv = [sys.executable, "-m", "lora_gui.cli", "demo", "--out", str(staging), "--family", family]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    if started is not None:
        started(proc)
    try:
        out, _ = proc.communicate(timeout=DEMO_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise DemoBuildError(f"Building the demo model in {out_dir} took more than "
                             f"{DEMO_BUILD_TIMEOUT_S} s and was stopped.") from None
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise DemoBuildError(f"Building the demo model in {out_dir} failed: {tail}")
    _move_into_place(staging, out_dir)
    return out


def _move_into_place(staging: Path, out_dir: Path) -> None:
    try:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DemoBuildError(f"The demo was built but could not be moved to {out_dir} ({exc}): "
                             "remove or rename that folder and press Start again.") from None
