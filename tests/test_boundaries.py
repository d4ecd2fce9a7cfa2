"""The direction of imports (ARCHITECTURE.md): ui -> worker(client) -> protocol <- child -> engine ->
settings. The web process never imports torch; the engine never imports gradio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


@pytest.mark.parametrize("modules,forbidden", [
    (["lora_gui.settings", "lora_gui.settings.io", "lora_gui.settings.foreign", "lora_gui.events",
      "lora_gui.cli"], HEAVY + ("gradio",)),
    (["lora_gui.worker.client", "lora_gui.worker.protocol", "lora_gui.worker.queue"], HEAVY + ("gradio",)),
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
