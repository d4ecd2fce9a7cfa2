"""Settings files: save the form as JSON on the server (and offer it as a download), load one from a
server path or an upload. Files of other trainers (kohya_ss, the older script format) are recognised
and imported with a report of what was mapped and what was ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lora_gui.settings import SettingsError, foreign, io
from lora_gui.ui.context import Ctx, keep_current
from lora_gui.ui.fields import check_values, issues_markdown
from lora_gui.ui.files import BrowseError, display_path, settings_file
from lora_gui.ui.form_fill import fill_form, form_outputs
from lora_gui.ui.presets_panel import build_preset_saver


def build_files_panel(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Accordion("Settings files", open=True, elem_id="settings-files"):
        gr.Markdown("Save the form as JSON, load one (lora-gui, kohya_ss or the older script format), "
                    "or upload one. Settings in the skip-list above are never overwritten by a load.")
        with gr.Row(equal_height=True):
            comp["save_path"] = gr.Textbox(
                label="Save to (server path)", scale=4, elem_id="save-path",
                placeholder=f"empty = {display_path(ctx.config.settings_dir)}/<output name>.json")
            comp["save"] = gr.Button("Save settings", scale=1, elem_id="save-settings", size="sm")
            comp["save_download"] = gr.DownloadButton("Download settings", visible=False, scale=1,
                                                      elem_id="save-download")
        with gr.Row(equal_height=True):
            comp["load"] = gr.Button("Load from 'Load json path'", elem_id="load-settings", size="sm")
            comp["load_upload"] = gr.UploadButton("Upload settings JSON…", file_types=[".json"],
                                                  elem_id="load-upload", size="sm")
        build_preset_saver(ctx)
        comp["files_report"] = gr.Markdown("", elem_id="files-report")


def _import_report(report: Any, where: str) -> str:
    lines = [f"**Imported {where}** (a kohya_ss or older-script file): mapped {len(report.mapped)} "
             f"keys, ignored {len(report.ignored)} ({len(report.later)} come with another open "
             f"issue, {len(report.not_applicable)} do not apply here, {len(report.rejected)} could "
             "not be read)."]
    if report.mapped:
        lines.append("\nMapped:\n" + "\n".join(
            f"- `{k}` → `{v}`" + (" (empty: default kept)" if k in report.defaulted else "")
            for k, v in sorted(report.mapped.items())))
    if report.ignored:
        lines.append("\nIgnored:\n" + "\n".join(f"- `{k}`: {v}"
                                                for k, v in sorted(report.ignored.items())))
    lines += [f"\nNote: {n}" for n in report.notes]
    return "\n".join(lines)


def load_with_report(doc: dict, values: dict, where: str) -> tuple[Any, str]:
    """(settings, report markdown) for a document of ours or a foreign one (``foreign.load_any``
    decides which), honouring the form's
    skip-list."""
    settings, report = foreign.load_any(doc, keep_current(values))
    if report is not None:
        return settings, _import_report(report, where)
    kept = ", ".join(f"`{k}`" for k in settings.runs.json_load_skip_list) or "nothing"
    return settings, f"**Loaded {where}.** Kept from the form (skip-list): {kept}."


def wire_files_panel(ctx: Ctx) -> None:
    _wire_save(ctx)
    _wire_load(ctx)


def _wire_save(ctx: Ctx) -> None:
    comp, reg, config = ctx.components, ctx.registry, ctx.config

    def save(data: dict):
        settings, issues = check_values(reg.values(data))
        if settings is None:
            return {comp["files_report"]: "**Not saved:**\n\n" + issues_markdown(issues)}
        default = config.settings_dir / f"{settings.model.output_name}.json"
        try:  # the typed path (always a .json) or the default, inside the configured roots
            path = settings_file(data[comp["save_path"]], config.browse_roots, default,
                                 for_writing=True)
            io.save_settings(settings, path)
        except BrowseError as exc:
            raise gr.Error(f"Not saved: {exc}") from None
        except OSError as exc:
            raise gr.Error(f"Cannot write {path}: {exc.strerror or exc}") from None
        config.save_last(settings)
        served = ctx.servable(path)
        return {comp["files_report"]: f"**Saved** to `{path}`.",
                comp["save_download"]: gr.update(value=served, visible=bool(served),
                                                 label=f"Download {path.name}")}

    comp["save"].click(save, inputs=reg.inputs | {comp["save_path"]},
                       outputs=[comp["files_report"], comp["save_download"]],
                       api_visibility="private")


def _wire_load(ctx: Ctx) -> None:
    comp, reg = ctx.components, ctx.registry
    outputs = [*form_outputs(ctx), comp["files_report"]]

    def load_from(values: dict, path: Path, where: str):
        try:
            settings, report = load_with_report(io.read_json(path), values, where)
        except SettingsError as exc:
            issues = "\n".join(f"- `{i.path}`: {i.message}" for i in exc.issues)
            return {comp["files_report"]: f"**Not loaded** ({where}):\n\n{issues}"}
        return fill_form(ctx, settings, "Settings loaded.", {comp["files_report"]: report})

    def load(values: dict):
        path = (values.get("runs.load_json_path") or "").strip()
        if not path:
            raise gr.Error("Enter a settings file in 'Load json path' (or use Browse…), then Load.")
        try:
            file = settings_file(path, ctx.config.browse_roots, Path(), for_writing=False)
        except BrowseError as exc:
            raise gr.Error(f"Not loaded: {exc}") from None
        return load_from(values, file, f"`{path}`")

    comp["load"].click(reg.handler(load), inputs=reg.inputs, outputs=outputs,
                       api_visibility="private")

    def upload(data: dict):
        file = data[comp["load_upload"]]
        if not file:
            return gr.skip()
        return load_from(reg.values(data), Path(file), "the uploaded file")

    comp["load_upload"].upload(upload, inputs=reg.inputs | {comp["load_upload"]}, outputs=outputs,
                               api_visibility="private")
