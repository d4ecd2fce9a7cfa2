"""kohya's dataset_config TOML in the Dataset tab: import one (its subsets become ``N_name`` folders
of links in the data folder and the form's folders and settings follow), or export the folders and
settings of the form as one (:mod:`lora_gui.dataset.kohya_toml`)."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from lora_gui.dataset.kohya_toml import (
    config_from_settings,
    parse_dataset_config,
    save_dataset_config,
    to_folder_layout,
)
from lora_gui.dataset.scan import DatasetError
from lora_gui.settings.schema import TrainingSettings
from lora_gui.ui.context import Ctx
from lora_gui.ui.files import display_path
from lora_gui.ui.preview import _groups as form_groups


def build_toml_box(comp: dict) -> None:
    with gr.Accordion("kohya dataset_config TOML", open=False, elem_id="ds-toml"):
        gr.Markdown("Import sd-scripts' `--dataset_config` file: each subset becomes an `N_name` "
                    "folder (links to its images) and the form takes its folders and settings. "
                    "Relative `image_dir` paths are read from the working folder, as sd-scripts does.")
        with gr.Row():
            comp["ds_toml_upload"] = gr.UploadButton("Import a TOML", size="sm", file_types=[".toml"],
                                                     elem_id="ds-toml-upload")
            comp["ds_toml_export"] = gr.Button("Export the folders as TOML", size="sm",
                                               elem_id="ds-toml-export")
            comp["ds_toml_download"] = gr.DownloadButton("Download the TOML", visible=False, size="sm",
                                                         elem_id="ds-toml-download")
        comp["ds_toml_notes"] = gr.Markdown("", elem_id="ds-toml-notes")


def _new_folder(parent: Path, name: str) -> Path:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "dataset"
    target, n = parent / base, 2
    while target.exists():
        target, n = parent / f"{base}-{n}", n + 1
    return target


def wire_toml_box(ctx: Ctx, workbench_of) -> None:
    """``workbench_of(values)``: the form's dataset (the Dataset tab's rule, passed in)."""
    comp, reg, config = ctx.components, ctx.registry, ctx.config

    def import_toml(data: dict):
        file = data[comp["ds_toml_upload"]]
        if not file:
            return gr.skip()
        try:
            text = Path(file).read_text(encoding="utf-8")
            dataset_config = parse_dataset_config(text, Path.cwd(), Path(file).name)
            layout = to_folder_layout(dataset_config, _new_folder(config.datasets_dir, Path(file).stem))
        except (DatasetError, UnicodeDecodeError) as exc:
            raise gr.Error(f"The TOML was not imported: {exc}") from None
        values = {**layout.settings, "model.img_folder": display_path(layout.img_folder),
                  "model.reg_img_folder": display_path(layout.reg_folder) if layout.reg_folder else ""}
        notes = "\n".join(f"- {n}" for n in layout.notes)
        gr.Info(f"Imported {len(dataset_config.datasets[0].subsets)} subsets into {layout.img_folder.parent}.")
        return {**reg.updates(values), comp["ds_toml_notes"]:
                f"Imported into `{display_path(layout.img_folder.parent)}`.\n{notes}"}

    comp["ds_toml_upload"].upload(import_toml, inputs=reg.inputs | {comp["ds_toml_upload"]},
                                  outputs=[*reg.outputs, comp["ds_toml_notes"]], api_visibility="private")

    def export_toml(values: dict):
        groups, _ = form_groups(values)
        settings = TrainingSettings.model_construct(**groups)
        try:
            dataset_config = config_from_settings(workbench_of(values).scan(), settings)
        except DatasetError as exc:
            raise gr.Error(f"The TOML was not exported: {exc}") from None
        folder = config.data_dir / "exports"
        folder.mkdir(parents=True, exist_ok=True)
        path = save_dataset_config(dataset_config, folder / "dataset_config.toml")
        served = ctx.servable(path)
        return {comp["ds_toml_download"]: gr.DownloadButton(value=served, visible=served is not None),
                comp["ds_toml_notes"]: f"Wrote `{path}`: download it below."}

    comp["ds_toml_export"].click(reg.handler(export_toml), inputs=reg.inputs,
                                 outputs=[comp["ds_toml_download"], comp["ds_toml_notes"]],
                                 api_visibility="private")
