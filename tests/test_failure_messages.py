"""One out-of-memory sentence and one rule for recognising it, in the engine and in the worker."""

from __future__ import annotations

import pytest
import torch

from lora_gui import events as ev
from lora_gui.engine.train import explain
from lora_gui.worker.failures import explain_failure


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"),
])
def test_engine_and_worker_say_the_same_sentence(exc):
    assert explain(exc) == explain_failure(exc) == ev.GPU_OOM
    assert explain_failure(1, f"Traceback ...\n{type(exc).__name__}: {exc}") == ev.GPU_OOM


def test_other_errors_are_not_out_of_memory():
    exc = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    assert not ev.is_gpu_out_of_memory(f"{type(exc).__name__}: {exc}")
    assert explain(exc) != ev.GPU_OOM and explain_failure(exc) != ev.GPU_OOM
