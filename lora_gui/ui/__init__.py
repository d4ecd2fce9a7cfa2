"""The browser GUI: the only package that imports gradio. It never imports torch.

``build_app`` (in ``lora_gui.ui.app``) builds the page from the settings schema; ``launch.main`` serves
it. Importing this package imports neither gradio nor the worker, so ``lora_gui.ui.fields`` and the
other pure modules stay cheap to test.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "build_app":
        from lora_gui.ui.app import build_app

        return build_app
    raise AttributeError(name)
