"""The direction of imports (docs/architecture.md): settings, events <- dataset <- engine <- worker
<- ui <- cli, checked on the source; the web process never imports torch; the engine never imports
gradio (checked on what a fresh interpreter imports)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


@pytest.mark.parametrize("modules,forbidden", [
    (["lora_gui.settings", "lora_gui.settings.io", "lora_gui.settings.foreign", "lora_gui.events",
      "lora_gui.cli"], HEAVY + ("gradio",)),
    (["lora_gui.worker.client", "lora_gui.worker.protocol", "lora_gui.worker.queue",
      "lora_gui.worker.queue_files", "lora_gui.worker.processes", "lora_gui.worker.demo"],
     HEAVY + ("gradio",)),
    (["lora_gui.dataset.scan", "lora_gui.dataset.buckets", "lora_gui.dataset.images",
      "lora_gui.dataset.captions", "lora_gui.dataset.summary"], HEAVY + ("gradio",)),
    (["lora_gui.ui", "lora_gui.ui.app", "lora_gui.ui.launch"], HEAVY),
    (["lora_gui.engine.train", "lora_gui.cli_terminal", "lora_gui.worker.child"], ("gradio",)),
])
def test_import_boundaries(modules, forbidden):
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [m for m in {forbidden!r} if m in sys.modules]\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_gradio_is_imported_only_in_ui_and_no_shell_strings():
    pattern = re.compile(r"^\s*(import gradio|from gradio)", re.M)
    for path in (ROOT / "lora_gui").rglob("*.py"):
        text = path.read_text()
        if "ui" not in path.relative_to(ROOT / "lora_gui").parts[:1]:
            assert not pattern.search(text), path
        assert "shell=True" not in text, path
        assert not re.search(r"(?<![.\w])(eval|exec)\(", text), path


# --- the layers, on the source (tests/support/layers.py, docs/architecture.md) ---------------------

def _layers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("layers", ROOT / "tests" / "support" / "layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_respects_the_layers_and_no_module_cycles():
    layers = _layers()
    graph = layers.import_graph(ROOT / "lora_gui")
    # the checker sees the package as it is: the engine's trainer, the client, the page's launcher
    assert "lora_gui.engine.train" in graph and "lora_gui.worker.client" in graph
    assert "lora_gui.worker.queue_files" in graph["lora_gui.worker.client"]
    assert layers.check(ROOT / "lora_gui") == []


def _copy_with(tmp_path: Path, module: str, extra: str) -> Path:
    """A copy of the package's source with ``extra`` appended to one module."""
    copy = tmp_path / "lora_gui"
    shutil.copytree(ROOT / "lora_gui", copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                                           "assets", "configs"))
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + "\n\n" + extra + "\n", encoding="utf-8")
    return copy


@pytest.mark.parametrize("module,extra,expected", [
    # a function-level import of the worker in the engine (what engine/cli_runner.py used to do)
    ("engine/train.py", "def _late():\n    from lora_gui.worker.queue import queue_main\n",
     "lora_gui.engine.train imports lora_gui.worker.queue (engine must not import worker)"),
    # the page importing the engine, although the engine is a lower layer
    ("ui/app.py", "import lora_gui.engine.demo\n",
     "lora_gui.ui.app imports lora_gui.engine.demo (ui must not import engine)"),
    # settings reaching up into the dataset, with a relative import
    ("settings/io.py", "from ..dataset import scan\n",
     "lora_gui.settings.io imports lora_gui.dataset.scan (settings must not import dataset)"),
    # a type-only import counts for the layers too
    ("dataset/scan.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from lora_gui.engine.data import DataOptions\n",
     "lora_gui.dataset.scan imports lora_gui.engine.data (dataset must not import engine)"),
    # the queue-folder functions importing the client back: a cycle inside one layer
    ("worker/queue_files.py", "def _c():\n    from lora_gui.worker.client import WorkerClient\n",
     "import cycle: lora_gui.worker.client <-> lora_gui.worker.queue_files"),
])
def test_the_layer_check_fails_on_a_wrong_import(tmp_path, module, extra, expected):
    layers = _layers()
    before = layers.check(ROOT / "lora_gui")  # [] when the test above passes
    copy = _copy_with(tmp_path, module, extra)
    new = [p for p in layers.check(copy) if p not in before]
    assert len(new) == 1 and expected in new[0], new
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "layers.py"), str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and expected in proc.stdout
    assert f"FAIL: {len(before) + 1} " in proc.stdout


# --- `make test` never skips the browser tests silently ---------------------------------------------

@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_stops_with_a_sentence_when_chromium_is_missing_and_cannot_be_installed(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")  # not root: apt-get is out of reach
    (fake / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["make", "-s", "chromium", "CHROMIUM=no-such-chromium-xyz"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "make test needs Debian's chromium" in proc.stderr
    assert "sudo apt-get install chromium" in proc.stderr and "make test-fast" in proc.stderr
    # `make test` runs the check before pytest (a dry run lists the recipe lines, runs nothing)
    dry = subprocess.run(["make", "-n", "test", "CHROMIUM=no-such-chromium-xyz"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert dry.stdout.index("no-such-chromium-xyz") < dry.stdout.index("-m pytest")


def test_a_type_only_import_back_is_no_cycle_but_a_run_time_one_is(tmp_path):
    layers = _layers()
    before = layers.check(ROOT / "lora_gui")
    back = "from lora_gui.worker.client import WorkerClient"
    typed = _copy_with(tmp_path / "typed", "worker/queue_files.py",
                       f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    {back}\n")
    assert [p for p in layers.check(typed) if p not in before] == []
    assert "lora_gui.worker.client" in layers.import_graph(typed)["lora_gui.worker.queue_files"]
    run_time = _copy_with(tmp_path / "run", "worker/queue_files.py", back)
    assert [p for p in layers.check(run_time) if p not in before] == [
        "import cycle: lora_gui.worker.client <-> lora_gui.worker.queue_files: move the shared code "
        "into a module both can import"]
