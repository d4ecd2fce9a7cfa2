"""The page's tools around the settings form: presets, save/load/import of settings files, the
server-side path browser, uploading a dataset zip, the dataset preview, and the run list and queue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr

from lora_gui.settings import SettingsError, io
from lora_gui.settings.foreign import convert, looks_foreign
from lora_gui.ui.context import Ctx, PageState, keep_current
from lora_gui.ui.fields import SPEC_BY_KEY, check_values, issues_markdown, settings_to_values
from lora_gui.ui.files import (
    BrowseError,
    display_path,
    enter,
    extract_dataset_zip,
    list_folder,
    resolve_start,
)
from lora_gui.ui.panel import draw, panel_outputs
from lora_gui.ui.preview import build_preview
from lora_gui.ui.session import state_name

RUN_COLUMNS = ["run", "state", "created", "steps", "output"]
QUEUE_COLUMNS = ["position", "name", "output", "state"]


# --- layout ---------------------------------------------------------------------------------------

def build_presets_bar(ctx: Ctx) -> None:
    ctx.c["preset"] = gr.Dropdown(
        choices=sorted(ctx.config.presets()), value=ctx.config.preset, label="Preset",
        info="Choose one to load it over the form; the settings in the skip-list (Presets and runs "
             "tab) keep their values.", elem_id="preset")


def build_dataset_section(ctx: Ctx) -> None:
    c = ctx.c
    with gr.Accordion("Dataset preview", open=True, elem_id="dataset-preview"):
        with gr.Row():
            c["preview_refresh"] = gr.Button("Refresh preview", size="sm", elem_id="preview-refresh")
            c["zip_upload"] = gr.UploadButton("Upload a zip of images + captions", size="sm",
                                              file_types=[".zip"], elem_id="zip-upload")
        c["preview_md"] = gr.Markdown("Press **Refresh preview** to scan the image folder.",
                                      elem_id="preview-md")
        c["preview_gallery"] = gr.Gallery(label="A few images, their captions and buckets",
                                          columns=4, height=260, visible=False,
                                          elem_id="preview-gallery")


def build_files_section(ctx: Ctx) -> None:
    c = ctx.c
    with gr.Accordion("Settings files", open=True, elem_id="settings-files"):
        gr.Markdown("Save the form as JSON, load one (lora-gui, kohya_ss or the older script format), "
                    "or upload one. Settings in the skip-list above are never overwritten by a load.")
        with gr.Row(equal_height=True):
            c["save_path"] = gr.Textbox(
                label="Save to (server path)", scale=4, elem_id="save-path",
                placeholder=f"empty = {display_path(ctx.config.settings_dir)}/<output name>.json")
            c["save"] = gr.Button("Save settings", scale=1, elem_id="save-settings", size="sm")
            c["save_download"] = gr.DownloadButton("Download settings", visible=False, scale=1,
                                                   elem_id="save-download")
        with gr.Row(equal_height=True):
            c["load"] = gr.Button("Load from 'Load json path'", elem_id="load-settings", size="sm")
            c["load_upload"] = gr.UploadButton("Upload settings JSON…", file_types=[".json"],
                                               elem_id="load-upload", size="sm")
        with gr.Row(equal_height=True):
            c["preset_name"] = gr.Textbox(label="Save the form as a preset named", scale=3,
                                          elem_id="preset-name", placeholder="my-style")
            c["preset_save"] = gr.Button("Save preset", scale=1, elem_id="preset-save", size="sm")
        c["files_report"] = gr.Markdown("", elem_id="files-report")


def build_runs_section(ctx: Ctx) -> None:
    c = ctx.c
    with gr.Accordion("Runs", open=True, elem_id="runs-list"):
        c["runs_refresh"] = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
        c["runs_table"] = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True,
                                       elem_id="runs-table", max_height=300)
        gr.Markdown("Select a row to show that run in the panel on the right.")
    with gr.Accordion("Queue", open=True, elem_id="queue"):
        c["queue_add"] = gr.Button("Add the current settings to the queue", elem_id="queue-add",
                                   size="sm")
        c["queue_table"] = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False,
                                        elem_id="queue-table")
        with gr.Row(equal_height=False):
            c["queue_item"] = gr.Dropdown(label="Queued item", choices=[], scale=3,
                                          elem_id="queue-item")
            c["queue_up"] = gr.Button("Up", size="sm", scale=1, elem_id="queue-up")
            c["queue_down"] = gr.Button("Down", size="sm", scale=1, elem_id="queue-down")
            c["queue_remove"] = gr.Button("Remove", size="sm", variant="stop", scale=1,
                                          elem_id="queue-remove")


def build_browser(ctx: Ctx) -> None:
    c = ctx.c
    with gr.Group(visible=False, elem_id="browser") as group:
        c["browser"] = group
        c["browser_title"] = gr.Markdown("", elem_id="browser-title")
        c["browser_folder"] = gr.Textbox(label="Folder (on the server)", elem_id="browser-folder",
                                         info="Type a folder and press Enter, or pick entries below.")
        c["browser_entries"] = gr.Dropdown(label="Entries", choices=[], elem_id="browser-entries",
                                           info="A folder opens it; a file selects it.",
                                           allow_custom_value=True)
        c["browser_selected"] = gr.Markdown("", elem_id="browser-selected")
        with gr.Row():
            c["browser_use"] = gr.Button("Use this", variant="primary", elem_id="browser-use")
            c["browser_cancel"] = gr.Button("Cancel", elem_id="browser-cancel")
    c["browser_target"] = gr.State("")
    c["browser_choice"] = gr.State("")


# --- helpers --------------------------------------------------------------------------------------

def _apply(ctx: Ctx, settings, message: str, extra: dict | None = None) -> dict:
    out = ctx.registry.updates(settings_to_values(settings))
    out[ctx.c["summary"]] = gr.update(value="", visible=False)
    out.update(ctx.registry.tab_updates({g: 0 for g in ctx.registry.tabs}))
    out.update(extra or {})
    gr.Info(message)
    return out


def _issues_text(exc: SettingsError) -> str:
    return "\n".join(f"- `{i.path}`: {i.message}" for i in exc.issues)


def load_any(ctx: Ctx, doc: dict, values: dict, where: str) -> tuple[Any, str]:
    """(settings, report markdown) for a document of ours or a foreign one, honouring the form's
    skip-list."""
    current = keep_current(values)
    if looks_foreign(doc):
        settings, report = convert(doc, current)
        lines = [f"**Imported {where}** (a kohya_ss or older-script file): mapped {len(report.mapped)} "
                 f"keys, ignored {len(report.ignored)}."]
        if report.mapped:
            lines.append("\nMapped:\n" + "\n".join(
                f"- `{k}` → `{v}`" + (" (empty: default kept)" if k in report.defaulted else "")
                for k, v in sorted(report.mapped.items())))
        if report.ignored:
            lines.append("\nIgnored:\n" + "\n".join(f"- `{k}`: {v}"
                                                    for k, v in sorted(report.ignored.items())))
        lines += [f"\nNote: {n}" for n in report.notes]
        return settings, "\n".join(lines)
    settings = io.load_document(doc, current)
    kept = ", ".join(f"`{k}`" for k in settings.runs.json_load_skip_list) or "nothing"
    return settings, f"**Loaded {where}.** Kept from the form (skip-list): {kept}."


def _runs_rows(ctx: Ctx) -> list[list]:
    rows = []
    for info in sorted(ctx.bridge.client.list_runs(), key=lambda r: r.created or 0, reverse=True):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)) if info.created else ""
        steps = f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step or "")
        state = state_name(info.state)
        output = info.output_path or (info.message or "" if state == "failed" else "")
        rows.append([info.run_id, state, created, steps, output])
    return rows


def _queue_rows(ctx: Ctx) -> tuple[list[list], list[str]]:
    rows, names = [], []
    for i, item in enumerate(ctx.bridge.client.queue_items(), 1):
        name = getattr(item, "name", str(item))
        output = getattr(item, "output_name", "") or ""
        rows.append([i, name, output, "training" if getattr(item, "running", False) else "waiting"])
        names.append(name)
    return rows, names


def refresh_lists(ctx: Ctx) -> dict:
    c = ctx.c
    out = {c["runs_table"]: _runs_rows(ctx) or None}
    try:
        rows, names = _queue_rows(ctx)
    except Exception as exc:  # noqa: BLE001 - a queue folder problem must not break the page
        rows, names = [], []
        gr.Warning(f"The queue cannot be read: {exc}")
    out[c["queue_table"]] = rows or None
    out[c["queue_item"]] = gr.update(choices=names, value=names[0] if names else None)
    return out


# --- wiring ---------------------------------------------------------------------------------------

def wire_tools(ctx: Ctx) -> None:
    for wire in (_wire_presets, _wire_files, _wire_browser, _wire_dataset, _wire_lists):
        wire(ctx)


def _field_outputs(ctx: Ctx) -> list:
    return [*ctx.registry.outputs, ctx.c["summary"], *ctx.registry.tabs.values()]


def _wire_presets(ctx: Ctx) -> None:
    c, reg, config = ctx.c, ctx.registry, ctx.config
    field_outs = _field_outputs(ctx)

    def choose_preset(data: dict):
        values, name = reg.values(data), data[c["preset"]]
        if not name:
            return gr.skip()
        try:
            settings = config.load_preset(name, keep_current(values))
        except SettingsError as exc:
            raise gr.Error(f"The preset {name} cannot be used: {exc}") from None
        return _apply(ctx, settings, f"Preset '{name}' loaded.")

    # .select fires once per choice (gradio 6.31 fires .input twice for a dropdown: click and blur)
    c["preset"].select(choose_preset, inputs=reg.inputs | {c["preset"]}, outputs=field_outs,
                      api_visibility="private")

    def save_preset(data: dict):
        values, name = reg.values(data), (data[c["preset_name"]] or "").strip()
        if not name or any(ch in name for ch in '\\/:*?"<>|') or name.startswith("."):
            raise gr.Error("Give the preset a plain name (letters, digits, '-' or '_').")
        settings, issues = check_values(values)
        if settings is None:
            raise gr.Error("The preset was not saved: " + "; ".join(map(str, issues)))
        io.save_settings(settings, config.presets_dir / f"{name}.json", sparse=True)
        gr.Info(f"Saved preset '{name}' in {config.presets_dir}.")
        return gr.update(choices=sorted(config.presets()), value=name)

    c["preset_save"].click(save_preset, inputs=reg.inputs | {c["preset_name"]}, outputs=c["preset"],
                           api_visibility="private")


def _wire_files(ctx: Ctx) -> None:
    """Save to a server path (and offer it as a download), load from a path or an upload; files of
    other trainers are recognised and imported with a report."""
    c, reg, config = ctx.c, ctx.registry, ctx.config
    field_outs = _field_outputs(ctx)

    def save(data: dict):
        values = reg.values(data)
        settings, issues = check_values(values)
        if settings is None:
            return {c["files_report"]: "**Not saved:**\n\n" + issues_markdown(issues)}
        raw = (data[c["save_path"]] or "").strip()
        path = Path(raw).expanduser() if raw else config.settings_dir / f"{settings.model.output_name}.json"
        if path.suffix.lower() != ".json":
            path = path.with_suffix(".json")
        try:
            io.save_settings(settings, path)
        except OSError as exc:
            raise gr.Error(f"Cannot write {path}: {exc.strerror or exc}") from None
        config.save_last(settings)
        ctx.allow(path.parent)
        return {c["files_report"]: f"**Saved** to `{path.resolve()}`.",
                c["save_download"]: gr.update(value=str(path.resolve()), visible=True,
                                              label=f"Download {path.name}")}

    c["save"].click(save, inputs=reg.inputs | {c["save_path"]},
                    outputs=[c["files_report"], c["save_download"]], api_visibility="private")

    def load(values: dict):
        path = (values.get("runs.load_json_path") or "").strip()
        if not path:
            raise gr.Error("Enter a settings file in 'Load json path' (or use Browse…), then Load.")
        return _load_from(values, Path(path).expanduser(), f"`{path}`")

    def _load_from(values: dict, path: Path, where: str):
        try:
            settings, report = load_any(ctx, io.read_json(path), values, where)
        except SettingsError as exc:
            return {c["files_report"]: f"**Not loaded** ({where}):\n\n{_issues_text(exc)}"}
        return _apply(ctx, settings, "Settings loaded.", {c["files_report"]: report})

    c["load"].click(reg.handler(load), inputs=reg.inputs, outputs=[*field_outs, c["files_report"]],
                    api_visibility="private")

    def upload(data: dict):
        file = data[c["load_upload"]]
        if not file:
            return gr.skip()
        return _load_from(reg.values(data), Path(file), "the uploaded file")

    c["load_upload"].upload(upload, inputs=reg.inputs | {c["load_upload"]},
                            outputs=[*field_outs, c["files_report"]], api_visibility="private")


def _wire_browser(ctx: Ctx) -> None:
    """The server-side path browser: one panel, opened by each path field's Browse button."""
    c, reg, config = ctx.c, ctx.registry, ctx.config
    path_keys = list(reg.browse_buttons)
    browser_outs = [c["browser"], c["browser_title"], c["browser_folder"], c["browser_entries"],
                    c["browser_selected"], c["browser_target"], c["browser_choice"]]

    def show(folder: Path, want: str, selected: str = "") -> dict:
        listing = list_folder(folder, config.browse_roots, want)
        more = " (first 500 shown)" if listing.truncated else ""
        return {c["browser_folder"]: str(listing.folder),
                c["browser_entries"]: gr.update(choices=listing.entries, value=None),
                c["browser_selected"]: f"Selected: `{selected or listing.folder}`{more}",
                c["browser_choice"]: selected or str(listing.folder)}

    def open_browser(key: str):
        spec = SPEC_BY_KEY[key]

        def handler(data: dict):
            values = reg.values(data)
            start = resolve_start(values.get(key) or "", config.browse_roots)
            what = "a folder" if spec.widget == "folder" else "a file (or a model folder)"
            return {c["browser"]: gr.update(visible=True),
                    c["browser_title"]: f"**Choose {what} for {spec.label}** — browsing is limited to "
                                        f"{', '.join(f'`{r}`' for r in config.browse_roots)}.",
                    c["browser_target"]: key, **show(start, "folder" if spec.widget == "folder" else
                                                     "file")}

        handler.__name__ = f"browse_{key.replace('.', '_')}"
        return handler

    for key, button in reg.browse_buttons.items():
        button.click(open_browser(key), inputs={reg.components[key]}, outputs=browser_outs,
                     api_visibility="private")

    def want_of(target: str) -> str:
        return "folder" if target and SPEC_BY_KEY[target].widget == "folder" else "file"

    def pick(folder: str, entry: str, target: str):
        if not entry:
            return gr.skip()
        try:
            path, is_dir = enter(Path(folder), entry, config.browse_roots)
            if not path.exists():  # an entry of the folder shown before
                return gr.skip()
            if is_dir:
                return show(path, want_of(target))
        except BrowseError as exc:
            raise gr.Error(str(exc)) from None
        return {c["browser_selected"]: f"Selected: `{path}`", c["browser_choice"]: str(path)}

    c["browser_entries"].select(pick, inputs=[c["browser_folder"], c["browser_entries"],
                                             c["browser_target"]], outputs=browser_outs,
                               api_visibility="private")

    def go(folder: str, target: str):
        try:
            return show(Path(folder).expanduser(), want_of(target))
        except BrowseError as exc:
            raise gr.Error(str(exc)) from None

    c["browser_folder"].submit(go, inputs=[c["browser_folder"], c["browser_target"]],
                               outputs=browser_outs, api_visibility="private")

    def use(target: str, choice: str):
        out = {c["browser"]: gr.update(visible=False)}
        if target in reg.components and choice:
            out[reg.components[target]] = display_path(Path(choice))
        return out

    c["browser_use"].click(use, inputs=[c["browser_target"], c["browser_choice"]],
                           outputs=[c["browser"], *[reg.components[k] for k in path_keys]],
                           api_visibility="private")
    c["browser_cancel"].click(lambda: gr.update(visible=False), outputs=c["browser"],
                              api_visibility="private")


def _wire_dataset(ctx: Ctx) -> None:
    c, reg, config = ctx.c, ctx.registry, ctx.config
    def preview(values: dict):
        result = build_preview(values)
        return {c["preview_md"]: result.markdown,
                c["preview_gallery"]: gr.update(value=result.thumbnails or None,
                                                visible=bool(result.thumbnails))}

    preview_outs = [c["preview_md"], c["preview_gallery"]]
    c["preview_refresh"].click(reg.handler(preview), inputs=reg.inputs, outputs=preview_outs,
                               api_visibility="private")

    img_key = "model.img_folder"

    def upload_zip(data: dict):
        file = data[c["zip_upload"]]
        if not file:
            return gr.skip()
        try:
            folder = extract_dataset_zip(file, config.datasets_dir, Path(file).name)
        except BrowseError as exc:
            raise gr.Error(f"The dataset was not added: {exc}") from None
        values = reg.values(data)
        values[img_key] = display_path(folder)
        gr.Info(f"Extracted the dataset into {folder}; it is now the image folder.")
        return {reg.components[img_key]: values[img_key], **preview(values)}

    c["zip_upload"].upload(upload_zip, inputs=reg.inputs | {c["zip_upload"]},
                           outputs=[reg.components[img_key], *preview_outs], api_visibility="private")


def _wire_lists(ctx: Ctx) -> None:
    c, reg = ctx.c, ctx.registry
    list_outs = [c["runs_table"], c["queue_table"], c["queue_item"]]
    c["runs_refresh"].click(lambda: refresh_lists(ctx), outputs=list_outs, api_visibility="private")

    def show_run(page: PageState, evt: gr.SelectData):
        row = evt.row_value if evt is not None else None
        if not row or not row[0]:
            return gr.skip()
        with page.lock:
            page.view = ctx.bridge.attach_view(str(row[0]))
            return draw(ctx, page.view, force=True)

    c["runs_table"].select(show_run, inputs=[c["page"]], outputs=panel_outputs(ctx),
                           api_visibility="private")

    def queue_add(values: dict):
        settings, issues = check_values(values)
        if settings is None:
            raise gr.Error("Not queued: " + "; ".join(map(str, issues)))
        ctx.bridge.client.enqueue(settings)
        gr.Info(f"Queued '{settings.model.output_name}': it starts when no other run is training.")
        return {**refresh_lists(ctx), c["timer"]: gr.Timer(active=True)}  # watch for its start

    c["queue_add"].click(reg.handler(queue_add), inputs=reg.inputs, outputs=[*list_outs, c["timer"]],
                         api_visibility="private")

    def queue_op(op: str):
        def handler(name: str):
            if not name:
                raise gr.Error("Choose a queued item first.")
            try:
                if op == "remove":
                    ctx.bridge.client.queue_remove(name)
                else:
                    ctx.bridge.client.queue_move(name, -1 if op == "up" else 1)
            except (ValueError, OSError) as exc:  # e.g. the item is being trained now
                raise gr.Error(str(exc)) from None
            out = refresh_lists(ctx)
            if op != "remove":
                out[c["queue_item"]]["value"] = name
            return out

        handler.__name__ = f"queue_{op}"
        return handler

    for op in ("up", "down", "remove"):
        c[f"queue_{op}"].click(queue_op(op), inputs=[c["queue_item"]], outputs=list_outs,
                               api_visibility="private")
