"""Shared test setup: one torch thread (two collapse tenfold when another process is busy), quiet
bitsandbytes, the demo model built once per session, and reaping of child processes."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # the settings tests do not need torch
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The tiny demo model and dataset (built once per test session)."""
    from lora_gui.engine.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), seed=0)
