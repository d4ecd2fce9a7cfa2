"""The Dataset tab's folder table: several image folders, each with its repeats and class tokens
(and regularisation folders), built into ``N_tokens`` folders of links in the data folder; the
form's Image and Regularisation folders then point at them (:mod:`lora_gui.dataset.folders`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from lora_gui.dataset.folders import build_folders, parse_rows
from lora_gui.dataset.scan import DatasetError
from lora_gui.ui.context import Ctx
from lora_gui.ui.dataset_toml import _new_folder
from lora_gui.ui.files import display_path

HEADERS = ["Image folder", "Repeats", "Class tokens", "Regularisation"]


def build_folders_box(comp: dict) -> None:
    with gr.Accordion("Folders, repeats and class tokens (several concepts)", open=False,
                      elem_id="ds-folders"):
        gr.Markdown("One row per image folder: its repeats and class tokens (the caption of images "
                    "without one). **Build** links the images into `N_tokens` folders in the data "
                    "folder and sets the Image and Regularisation folders; the originals are "
                    "not moved, and caption edits go to them.")
        comp["ds_folder_rows"] = gr.Dataframe(
            value=[["", 1, "", False], ["", 1, "", False]], headers=HEADERS, datatype=["str", "number", "str", "bool"],
            type="array", row_count=2, column_count=4, interactive=True, elem_id="ds-folder-rows")
        with gr.Row():
            comp["ds_folders_name"] = gr.Textbox("multi-concept", label="Dataset name", max_lines=1,
                                                 elem_id="ds-folders-name")
            comp["ds_folders_build"] = gr.Button("Build", size="sm", elem_id="ds-folders-build")
        comp["ds_folders_note"] = gr.Markdown("", elem_id="ds-folders-note")


def build_from_rows(rows: list, name: str, values: dict[str, Any], datasets_dir: Path) -> tuple[dict, str]:
    """The form's new folder values and a note, after building the folders of ``rows``;
    DatasetError with a sentence when a row is wrong."""
    entries = parse_rows(rows or [], Path.cwd())
    dest = _new_folder(datasets_dir, name or "multi-concept")
    img, reg = build_folders(entries, dest, values.get("labels.caption_extension") or ".txt")
    folders = sorted(p.name for p in img.iterdir()) + (sorted(p.name for p in reg.iterdir()) if reg else [])
    which = "The Image and Regularisation folders now point" if reg else "The Image folder now points"
    note = f"Built `{display_path(dest)}`: {', '.join(f'`{f}`' for f in folders)}. {which} there."
    return {"model.img_folder": display_path(img), "model.reg_img_folder": display_path(reg) if reg else ""}, note


def wire_folders_box(ctx: Ctx) -> None:
    comp, reg = ctx.components, ctx.registry

    def build(data: dict):
        try:
            values, note = build_from_rows(data[comp["ds_folder_rows"]], data[comp["ds_folders_name"]],
                                           reg.values(data), ctx.config.datasets_dir)
        except DatasetError as exc:
            raise gr.Error(f"The folders were not built: {exc}") from None
        return {**reg.updates(values), comp["ds_folders_note"]: note}

    comp["ds_folders_build"].click(
        build, inputs=reg.inputs | {comp["ds_folder_rows"], comp["ds_folders_name"]},
        outputs=[*reg.outputs, comp["ds_folders_note"]], api_visibility="private")
