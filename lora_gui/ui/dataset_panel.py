"""The dataset preview in the Model tab: folders, repeats, captions, buckets, steps and thumbnails
(computed by ``ui/preview.py``), and uploading a zip of images + captions as a new dataset folder."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from lora_gui.ui.context import Ctx
from lora_gui.ui.files import BrowseError, display_path, extract_dataset_zip
from lora_gui.ui.preview import build_preview

IMAGE_FOLDER_KEY = "model.img_folder"


def build_dataset_panel(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Accordion("Dataset preview", open=True, elem_id="dataset-preview"):
        with gr.Row():
            comp["preview_refresh"] = gr.Button("Refresh preview", size="sm",
                                                elem_id="preview-refresh")
            comp["zip_upload"] = gr.UploadButton("Upload a zip of images + captions", size="sm",
                                                 file_types=[".zip"], elem_id="zip-upload")
        comp["preview_md"] = gr.Markdown("Press **Refresh preview** to scan the image folder.",
                                         elem_id="preview-md")
        comp["preview_gallery"] = gr.Gallery(label="A few images, their captions and buckets",
                                             columns=4, height=260, visible=False,
                                             elem_id="preview-gallery")


def preview_updates(ctx: Ctx, values: dict) -> dict:
    comp = ctx.components
    result = build_preview(values)
    return {comp["preview_md"]: result.markdown,
            comp["preview_gallery"]: gr.update(value=result.thumbnails or None,
                                               visible=bool(result.thumbnails))}


def wire_dataset_panel(ctx: Ctx) -> None:
    comp, reg, config = ctx.components, ctx.registry, ctx.config
    preview_outs = [comp["preview_md"], comp["preview_gallery"]]

    def preview(values: dict):
        return preview_updates(ctx, values)

    comp["preview_refresh"].click(reg.handler(preview), inputs=reg.inputs, outputs=preview_outs,
                                  api_visibility="private")

    def upload_zip(data: dict):
        file = data[comp["zip_upload"]]
        if not file:
            return gr.skip()
        try:
            folder = extract_dataset_zip(file, config.datasets_dir, Path(file).name)
        except BrowseError as exc:
            raise gr.Error(f"The dataset was not added: {exc}") from None
        values = reg.values(data)
        values[IMAGE_FOLDER_KEY] = display_path(folder)
        gr.Info(f"Extracted the dataset into {folder}; it is now the image folder.")
        return {reg.components[IMAGE_FOLDER_KEY]: values[IMAGE_FOLDER_KEY],
                **preview_updates(ctx, values)}

    comp["zip_upload"].upload(upload_zip, inputs=reg.inputs | {comp["zip_upload"]},
                              outputs=[reg.components[IMAGE_FOLDER_KEY], *preview_outs],
                              api_visibility="private")
