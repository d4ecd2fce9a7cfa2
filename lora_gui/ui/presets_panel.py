"""Presets: the picker above the tabs (loads a preset over the form, honouring the skip-list) and the
"save the form as a preset" row in the Presets and runs tab."""

from __future__ import annotations

import gradio as gr

from lora_gui.settings import SettingsError, io
from lora_gui.ui.context import Ctx, keep_current
from lora_gui.ui.fields import check_values
from lora_gui.ui.form_fill import fill_form, form_outputs

BAD_NAME_CHARS = '\\/:*?"<>|'


def build_preset_picker(ctx: Ctx) -> None:
    ctx.components["preset"] = gr.Dropdown(
        choices=sorted(ctx.config.presets()), value=ctx.config.preset, label="Preset",
        info="Choose one to load it over the form; the settings in the skip-list (Presets and runs "
             "tab) keep their values.", elem_id="preset")


def build_preset_saver(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Row(equal_height=True):
        comp["preset_name"] = gr.Textbox(label="Save the form as a preset named", scale=3,
                                         elem_id="preset-name", placeholder="my-style")
        comp["preset_save"] = gr.Button("Save preset", scale=1, elem_id="preset-save", size="sm")


def is_plain_preset_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not any(ch in name for ch in BAD_NAME_CHARS)


def wire_presets_panel(ctx: Ctx) -> None:
    comp, reg, config = ctx.components, ctx.registry, ctx.config

    def choose_preset(data: dict):
        values, name = reg.values(data), data[comp["preset"]]
        if not name:
            return gr.skip()
        try:
            settings = config.load_preset(name, keep_current(values))
        except SettingsError as exc:
            raise gr.Error(f"The preset {name} cannot be used: {exc}") from None
        return fill_form(ctx, settings, f"Preset '{name}' loaded.")

    # .select fires once per choice (gradio 6.31 fires .input twice for a dropdown: click and blur)
    comp["preset"].select(choose_preset, inputs=reg.inputs | {comp["preset"]},
                          outputs=form_outputs(ctx), api_visibility="private")

    def save_preset(data: dict):
        values, name = reg.values(data), (data[comp["preset_name"]] or "").strip()
        if not is_plain_preset_name(name):
            raise gr.Error("Give the preset a plain name (letters, digits, '-' or '_').")
        settings, issues = check_values(values)
        if settings is None:
            raise gr.Error("The preset was not saved: " + "; ".join(map(str, issues)))
        io.save_settings(settings, config.presets_dir / f"{name}.json", sparse=True)
        gr.Info(f"Saved preset '{name}' in {config.presets_dir}.")
        return gr.update(choices=sorted(config.presets()), value=name)

    comp["preset_save"].click(save_preset, inputs=reg.inputs | {comp["preset_name"]},
                              outputs=comp["preset"], api_visibility="private")
