"""Filling the settings form from loaded settings (a preset, a file, an import): the updates that put
the values into the fields, clear the validation summary and reset the tabs' error counts."""

from __future__ import annotations

import gradio as gr

from lora_gui.settings import TrainingSettings
from lora_gui.ui.context import Ctx
from lora_gui.ui.fields import settings_to_values


def form_outputs(ctx: Ctx) -> list:
    """The components ``fill_form`` updates: every setting, the summary, the tab labels, the note
    under the title (which says where the form's settings came from)."""
    return [*ctx.registry.outputs, ctx.components["summary"], *ctx.registry.tabs.values(), ctx.components["note"]]


def fill_form(ctx: Ctx, settings: TrainingSettings, message: str, extra: dict | None = None) -> dict:
    """Updates that show ``settings`` in the form, plus ``extra``; toasts ``message``."""
    out = ctx.registry.updates(settings_to_values(settings))
    out[ctx.components["summary"]] = gr.update(value="", visible=False)
    out.update(ctx.registry.tab_updates({group: 0 for group in ctx.registry.tabs}))
    out[ctx.components["note"]] = f"<small>{message}</small>"
    out.update(extra or {})
    gr.Info(message)
    return out
