"""The server-side path browser: one panel below the tabs, opened by each path field's Browse
button, limited to the configured browse roots (``ui/files.py`` enforces them)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lora_gui.ui.context import Ctx
from lora_gui.ui.fields import SPEC_BY_KEY
from lora_gui.ui.files import BrowseError, display_path, enter, list_folder, resolve_start


def build_browser_panel(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Group(visible=False, elem_id="browser") as group:
        comp["browser"] = group
        comp["browser_title"] = gr.Markdown("", elem_id="browser-title")
        comp["browser_folder"] = gr.Textbox(
            label="Folder (on the server)", elem_id="browser-folder",
            info="Type a folder and press Enter, or pick entries below.")
        comp["browser_entries"] = gr.Dropdown(label="Entries", choices=[], elem_id="browser-entries",
                                              info="A folder opens it; a file selects it.",
                                              allow_custom_value=True)
        comp["browser_selected"] = gr.Markdown("", elem_id="browser-selected")
        with gr.Row():
            comp["browser_use"] = gr.Button("Use this", variant="primary", elem_id="browser-use")
            comp["browser_cancel"] = gr.Button("Cancel", elem_id="browser-cancel")
    comp["browser_target"] = gr.State("")  # the "group.field" key the choice goes to
    comp["browser_choice"] = gr.State("")


def wants(key: str) -> str:
    """What the field ``key`` takes: "folder" or "file" (a file, or a model folder)."""
    return "folder" if key and SPEC_BY_KEY[key].widget == "folder" else "file"


def _browser_outputs(ctx: Ctx) -> list:
    comp = ctx.components
    return [comp[k] for k in ("browser", "browser_title", "browser_folder", "browser_entries",
                              "browser_selected", "browser_target", "browser_choice")]


def _listing_updates(ctx: Ctx, folder: Path, want: str, selected: str = "") -> dict:
    comp = ctx.components
    listing = list_folder(folder, ctx.config.browse_roots, want)
    more = " (first 500 shown)" if listing.truncated else ""
    return {comp["browser_folder"]: str(listing.folder),
            comp["browser_entries"]: gr.update(choices=listing.entries, value=None),
            comp["browser_selected"]: f"Selected: `{selected or listing.folder}`{more}",
            comp["browser_choice"]: selected or str(listing.folder)}


def wire_browser_panel(ctx: Ctx) -> None:
    _wire_open(ctx)
    _wire_navigation(ctx)
    _wire_choice(ctx)


def _wire_open(ctx: Ctx) -> None:
    """Each Browse button opens the panel at its field's current path."""
    comp, reg, roots = ctx.components, ctx.registry, ctx.config.browse_roots

    def opener(key: str):
        spec = SPEC_BY_KEY[key]

        def handler(data: dict):
            start = resolve_start(reg.values(data).get(key) or "", roots)
            what = "a folder" if wants(key) == "folder" else "a file (or a model folder)"
            return {comp["browser"]: gr.update(visible=True),
                    comp["browser_title"]: f"**Choose {what} for {spec.label}** — browsing is "
                                           f"limited to {', '.join(f'`{r}`' for r in roots)}.",
                    comp["browser_target"]: key, **_listing_updates(ctx, start, wants(key))}

        handler.__name__ = f"browse_{key.replace('.', '_')}"
        return handler

    for key, button in reg.browse_buttons.items():
        button.click(opener(key), inputs={reg.components[key]}, outputs=_browser_outputs(ctx),
                     api_visibility="private")


def _wire_navigation(ctx: Ctx) -> None:
    """Picking an entry opens a folder or selects a file; Enter in the folder box goes there."""
    comp, roots = ctx.components, ctx.config.browse_roots

    def pick(folder: str, entry: str, target: str):
        if not entry:
            return gr.skip()
        try:
            path, is_dir = enter(Path(folder), entry, roots)
            if not path.exists():  # an entry of the folder shown before
                return gr.skip()
            if is_dir:
                return _listing_updates(ctx, path, wants(target))
        except BrowseError as exc:
            raise gr.Error(str(exc)) from None
        return {comp["browser_selected"]: f"Selected: `{path}`", comp["browser_choice"]: str(path)}

    comp["browser_entries"].select(
        pick, inputs=[comp["browser_folder"], comp["browser_entries"], comp["browser_target"]],
        outputs=_browser_outputs(ctx), api_visibility="private")

    def go(folder: str, target: str):
        try:
            return _listing_updates(ctx, Path(folder).expanduser(), wants(target))
        except BrowseError as exc:
            raise gr.Error(str(exc)) from None

    comp["browser_folder"].submit(go, inputs=[comp["browser_folder"], comp["browser_target"]],
                                  outputs=_browser_outputs(ctx), api_visibility="private")


def _wire_choice(ctx: Ctx) -> None:
    """Use this: the chosen path goes into the field that opened the panel; Cancel closes it."""
    comp, reg = ctx.components, ctx.registry

    def use(target: str, choice: str):
        out = {comp["browser"]: gr.update(visible=False)}
        if target in reg.components and choice:
            out[reg.components[target]] = display_path(Path(choice))
        return out

    comp["browser_use"].click(use, inputs=[comp["browser_target"], comp["browser_choice"]],
                              outputs=[comp["browser"], *[reg.components[k]
                                                          for k in reg.browse_buttons]],
                              api_visibility="private")
    comp["browser_cancel"].click(lambda: gr.update(visible=False), outputs=comp["browser"],
                                 api_visibility="private")
