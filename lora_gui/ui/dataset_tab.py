"""The Dataset tab: a paged grid of the training and regularisation images with their captions,
repeats, buckets and sizes; filters; one caption edited in place with an undo; bulk tag operations
on the filtered images; a tag-frequency chart; the checks before training.

Every action is :class:`lora_gui.dataset.workbench.Workbench` (the same code as
``lora-gui dataset ...``) on the folders and options of the form's current values.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from lora_gui.dataset.autocaption import CAPTIONERS, RULES
from lora_gui.dataset.browse import RowFilter, bucket_labels, dataset_rows, filter_rows, page_of, tag_counts
from lora_gui.dataset.images import open_rgb
from lora_gui.dataset.masks import mask_preview
from lora_gui.dataset.scan import DatasetError
from lora_gui.dataset.workbench import BULK_OPS, Workbench
from lora_gui.settings.schema import TrainingSettings
from lora_gui.ui.context import Ctx
from lora_gui.ui.dataset_folders import build_folders_box, wire_folders_box
from lora_gui.ui.dataset_toml import build_toml_box, wire_toml_box
from lora_gui.ui.preview import _groups as form_groups

PER_PAGE = 24
THUMB = 256
CHART_TAGS = 25
ALL = "(all)"


def build_dataset_tab(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
        comp["ds_status"] = gr.Markdown("Press **Load** to show the images of the Image folder.",
                                        elem_id="ds-status")
        with gr.Row():
            comp["ds_load"] = gr.Button("Load", size="sm", variant="primary", elem_id="ds-load")
            comp["ds_tag"] = gr.Textbox(label="Has tag", placeholder="any", max_lines=1, elem_id="ds-tag")
            comp["ds_no_caption"] = gr.Checkbox(label="No caption only", elem_id="ds-no-caption")
            comp["ds_bucket"] = gr.Dropdown([ALL], value=ALL, label="Bucket", elem_id="ds-bucket")
            comp["ds_folder"] = gr.Dropdown([ALL], value=ALL, label="Folder", elem_id="ds-folder")
            comp["ds_page"] = gr.Number(1, label="Page", precision=0, minimum=1, elem_id="ds-page")
        comp["ds_gallery"] = gr.Gallery(label="Images (click one to edit its caption)", columns=6,
                                        height=420, allow_preview=False, elem_id="ds-gallery")
        comp["ds_paths"] = gr.State([])  # the image paths of the page shown, in gallery order
        comp["ds_selected"] = gr.State("")
        with gr.Row():
            with gr.Column():
                comp["ds_image"] = gr.Image(label="Selected image", type="pil", interactive=False,
                                            height=320, elem_id="ds-image")
                with gr.Row():
                    comp["ds_show_mask"] = gr.Checkbox(label="Show the loss mask (masked_loss)",
                                                       elem_id="ds-show-mask")
                    comp["ds_mask_folder"] = gr.Textbox(
                        label="Mask folder", max_lines=1, elem_id="ds-mask-folder",
                        info="Masks laid out like the image folder; empty: the image's alpha channel.")
                comp["ds_mask_note"] = gr.Markdown("", elem_id="ds-mask-note")
            with gr.Column():
                comp["ds_caption"] = gr.Textbox(label="Caption", lines=3, elem_id="ds-caption",
                                                info="Comma-separated tags; saved to the caption file "
                                                     "next to the image.")
                with gr.Row():
                    comp["ds_save"] = gr.Button("Save caption", size="sm", elem_id="ds-save")
                    comp["ds_undo"] = gr.Button("Undo last change", size="sm", elem_id="ds-undo")
        with gr.Accordion("Bulk edit the filtered images", open=True, elem_id="ds-bulk"):
            with gr.Row():
                comp["ds_op"] = gr.Dropdown(list(BULK_OPS), value="add tag (front)",
                                            label="Operation", elem_id="ds-op")
                comp["ds_op_tag"] = gr.Textbox(label="Tag", max_lines=1, elem_id="ds-op-tag")
                comp["ds_op_new"] = gr.Textbox(label="New tag", max_lines=1, elem_id="ds-op-new")
                comp["ds_apply"] = gr.Button("Apply", size="sm", elem_id="ds-apply")
        build_caption_box(comp)
        comp["ds_message"] = gr.Markdown("", elem_id="ds-message")
        comp["ds_chart"] = gr.HTML("", elem_id="ds-chart")
        build_folders_box(comp)
        build_toml_box(comp)
        with gr.Accordion("Checks before training", open=False, elem_id="ds-checks-box"):
            comp["ds_check"] = gr.Button("Run checks", size="sm", elem_id="ds-check")
            comp["ds_report"] = gr.Markdown("", elem_id="ds-report")


def build_caption_box(comp: dict) -> None:
    with gr.Accordion("Auto-caption the filtered images", open=False, elem_id="ds-autocap"):
        with gr.Row():
            comp["ds_captioner"] = gr.Dropdown([(v[0], k) for k, v in CAPTIONERS.items()], value="wd14",
                                               label="Captioner", elem_id="ds-captioner")
            comp["ds_tagger"] = gr.Textbox(label="Model folder", max_lines=1, elem_id="ds-tagger",
                                           info="A local folder: model.onnx and selected_tags.csv (WD14), "
                                                "or what save_pretrained writes (BLIP, Florence-2, Qwen2-VL).")
            comp["ds_rule"] = gr.Dropdown(list(RULES), value="skip", label="Existing captions",
                                          elem_id="ds-rule", info="skip the image, prepend or append "
                                          "the new tags, or overwrite the caption")
        comp["ds_prompt"] = gr.Textbox(label="Prompt", max_lines=1, elem_id="ds-prompt",
                                       info="Florence-2: a task (<CAPTION>, <DETAILED_CAPTION>, "
                                            "<MORE_DETAILED_CAPTION>); Qwen2-VL: the instruction; BLIP: the "
                                            "start of the sentence. Empty: the captioner's default.")
        with gr.Row():
            comp["ds_general"] = gr.Number(0.35, label="General threshold", elem_id="ds-general")
            comp["ds_character"] = gr.Number(0.85, label="Character threshold", elem_id="ds-character")
            comp["ds_exclude"] = gr.Textbox(label="Excluded tags", max_lines=1, elem_id="ds-exclude",
                                            info="Comma-separated, never written.")
            comp["ds_underscores"] = gr.Checkbox(True, label="Underscores to spaces",
                                                 elem_id="ds-underscores")
        with gr.Row():
            comp["ds_caption_start"] = gr.Button("Caption", size="sm", variant="primary",
                                                 elem_id="ds-caption-start")
            comp["ds_caption_stop"] = gr.Button("Stop", size="sm", elem_id="ds-caption-stop")
        comp["ds_job"] = gr.State("")
        comp["ds_job_status"] = gr.Markdown("", elem_id="ds-job-status")
        comp["ds_timer"] = gr.Timer(1.0, active=False)


def workbench_of(values: dict[str, Any]) -> Workbench:
    groups, _ = form_groups(values)
    settings = TrainingSettings.model_construct(**groups)
    try:
        return Workbench.from_settings(settings)
    except DatasetError as exc:
        raise gr.Error(str(exc)) from None


def chart_html(counts: dict[str, int], total: int) -> str:
    """A bar chart of the most frequent tags (plain HTML: light, and readable by tests)."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:CHART_TAGS]
    if not top:
        return "<p>No tags yet: the captions are empty.</p>"
    peak = top[0][1]
    rows = "".join(
        f'<div class="ds-bar" data-tag="{html.escape(t)}" data-count="{n}" style="display:flex;'
        f'gap:.5rem;align-items:center"><span style="width:14rem;text-align:right">{html.escape(t)}'
        f'</span><span style="flex:1"><span style="display:block;background:var(--color-accent);'
        f'height:.9rem;width:{100 * n / peak:.1f}%"></span></span><span style="width:3rem">{n}</span>'
        f'</div>' for t, n in top)
    return f"<h4>Tag frequency ({total} images)</h4>{rows}"


def _thumb(path: Path, caption: str, size: int = THUMB) -> tuple[Any, str]:
    try:
        image = open_rgb(path)  # upright, as trained
        image.thumbnail((size, size))
        return image, caption
    except (OSError, ValueError, SyntaxError):
        return Image.new("RGB", (THUMB // 2, THUMB // 2), (200, 60, 60)), f"(cannot be read) {caption}"


def grid(bench: Workbench, row_filter: RowFilter, page: int) -> dict[str, Any]:
    """What the tab shows for a filter and page: thumbnails, paths, the status line, the chart."""
    try:
        all_rows = dataset_rows(bench.scan(), bench.buckets)
    except (DatasetError, OSError, ValueError) as exc:
        raise gr.Error(f"The dataset cannot be shown: {exc}") from None
    shown = filter_rows(all_rows, row_filter)
    rows, page, pages = page_of(shown, page, PER_PAGE)
    missing = sum(1 for r in all_rows if r.caption is None)
    status = (f"**{len(shown)} of {len(all_rows)} images** match the filter (page {page} of {pages}); "
              f"{missing} without a caption. Folder: `{bench.img_folder}`")
    return {"gallery": [_thumb(r.path, r.label()) for r in rows], "paths": [str(r.path) for r in rows],
            "status": status, "page": page, "chart": chart_html(tag_counts(all_rows), len(all_rows)),
            "buckets": [ALL, *bucket_labels(all_rows)], "folders": [ALL, *dict.fromkeys(r.folder for r in all_rows)]}


def _filter(data: dict, comp: dict) -> RowFilter:
    bucket, folder = data[comp["ds_bucket"]], data[comp["ds_folder"]]
    return RowFilter(tag=data[comp["ds_tag"]] or "", no_caption=bool(data[comp["ds_no_caption"]]),
                     bucket="" if bucket in (None, ALL) else bucket,
                     folder="" if folder in (None, ALL) else folder)


def wire_dataset_tab(ctx: Ctx) -> None:
    comp = ctx.components
    filters = {comp[k] for k in ("ds_tag", "ds_no_caption", "ds_bucket", "ds_folder", "ds_page")}
    view_outs = [comp[k] for k in ("ds_gallery", "ds_paths", "ds_status", "ds_page", "ds_chart",
                                   "ds_bucket", "ds_folder", "ds_message")]
    view = wire_grid(ctx, filters, view_outs)
    wire_selection(ctx)
    wire_edits(ctx, view, filters, view_outs)
    wire_checks(ctx)
    wire_captioning(ctx, view, filters, view_outs)
    wire_toml_box(ctx, workbench_of)
    wire_folders_box(ctx)


def wire_grid(ctx: Ctx, filters: set, view_outs: list):
    """Load, page and filter the grid; returns ``view``, which the other actions use to redraw it."""
    comp, reg = ctx.components, ctx.registry

    def view(data: dict, page: int | None = None, message: str | None = None) -> dict:
        bench = workbench_of(reg.values(data))
        shown = grid(bench, _filter(data, comp), int(page or data[comp["ds_page"]] or 1))
        out = {comp["ds_gallery"]: shown["gallery"], comp["ds_paths"]: shown["paths"],
               comp["ds_status"]: shown["status"], comp["ds_page"]: shown["page"],
               comp["ds_chart"]: shown["chart"],
               comp["ds_bucket"]: gr.update(choices=shown["buckets"]),
               comp["ds_folder"]: gr.update(choices=shown["folders"])}
        if message is not None:
            out[comp["ds_message"]] = message
        return out

    def load(data: dict):
        return view(data)

    def first_page(data: dict):
        return view(data, page=1)

    listen = dict(inputs=reg.inputs | filters, outputs=view_outs, api_visibility="private")
    comp["ds_load"].click(load, **listen)
    comp["ds_page"].submit(load, **listen)
    comp["ds_tag"].submit(first_page, **listen)
    for key in ("ds_no_caption", "ds_bucket", "ds_folder"):
        comp[key].input(first_page, **listen)
    return view


def wire_selection(ctx: Ctx) -> None:
    """Clicking an image shows it large with its caption; its loss mask is tinted in when asked."""
    comp, reg = ctx.components, ctx.registry

    def shown(data: dict, path: str):
        """The selected image large: with its loss mask tinted in when asked."""
        if not data[comp["ds_show_mask"]]:
            return _thumb(Path(path), "", 1024)[0], ""
        values = reg.values(data)
        folder = str(data[comp["ds_mask_folder"]] or values.get("advanced.mask_folder") or "").strip()
        try:
            preview = mask_preview(Path(path), Path(folder) if folder else None,
                                   Path(values.get("model.img_folder") or Path(path).parent), 1024)
        except (DatasetError, OSError, ValueError) as exc:
            return _thumb(Path(path), "", 1024)[0], str(exc)
        return preview.image, preview.message

    def select(data: dict, evt: gr.SelectData):
        paths = data[comp["ds_paths"]] or []
        if evt.index is None or evt.index >= len(paths):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = paths[evt.index]
        try:
            caption = workbench_of(reg.values(data)).editor().caption_of(path) or ""
        except DatasetError as exc:
            gr.Warning(str(exc))
            caption = ""
        big, note = shown(data, path)
        return path, big, caption, note

    def reshow(data: dict):
        path = data[comp["ds_selected"]]
        return shown(data, path) if path else (gr.skip(), "Click an image in the grid to see its mask.")

    mask_inputs = {comp[k] for k in ("ds_show_mask", "ds_mask_folder", "ds_selected")}
    comp["ds_gallery"].select(select, inputs=reg.inputs | mask_inputs | {comp["ds_paths"]},
                              outputs=[comp["ds_selected"], comp["ds_image"], comp["ds_caption"],
                                       comp["ds_mask_note"]], api_visibility="private")
    comp["ds_show_mask"].input(reshow, inputs=reg.inputs | mask_inputs,
                               outputs=[comp["ds_image"], comp["ds_mask_note"]], api_visibility="private")
    comp["ds_mask_folder"].submit(reshow, inputs=reg.inputs | mask_inputs,
                                  outputs=[comp["ds_image"], comp["ds_mask_note"]], api_visibility="private")


def wire_checks(ctx: Ctx) -> None:
    """The checks before training, as a markdown report."""
    comp, reg = ctx.components, ctx.registry

    def run_checks(values: dict):
        return workbench_of(values).check().to_markdown()

    comp["ds_check"].click(reg.handler(run_checks), inputs=reg.inputs, outputs=[comp["ds_report"]],
                           api_visibility="private")


def wire_edits(ctx: Ctx, view, filters: set, view_outs: list) -> None:
    """Save the selected image's caption, undo the last change, apply a bulk operation; each
    redraws the grid and the chart with the editor's sentence."""
    comp, reg = ctx.components, ctx.registry

    def edit(data: dict, action):
        bench = workbench_of(reg.values(data))
        try:
            result = action(bench, data)
        except DatasetError as exc:
            raise gr.Error(str(exc)) from None
        return view(data, message=result.message)

    def save(data: dict):
        selected = data[comp["ds_selected"]]
        if not selected:
            raise gr.Error("Click an image in the grid first: its caption is the one saved.")
        return edit(data, lambda b, d: b.editor().set_caption(selected, d[comp["ds_caption"]] or ""))

    def undo(data: dict):
        return edit(data, lambda b, d: b.editor().undo())

    def apply(data: dict):
        return edit(data, lambda b, d: b.bulk(d[comp["ds_op"]], _filter(d, comp),
                                              d[comp["ds_op_tag"]] or "", d[comp["ds_op_new"]] or ""))

    edit_inputs = reg.inputs | filters | {comp[k] for k in ("ds_selected", "ds_caption", "ds_op",
                                                           "ds_op_tag", "ds_op_new")}
    for key, fn in (("ds_save", save), ("ds_undo", undo), ("ds_apply", apply)):
        comp[key].click(fn, inputs=edit_inputs, outputs=view_outs, api_visibility="private")


def wire_captioning(ctx: Ctx, view, filters: set, view_outs: list) -> None:
    """Start an auto-captioning job in the background worker, follow it with a timer, stop it,
    and redraw the grid when it ends. The page only reads the job folder (like a training run)."""
    from lora_gui.worker.caption_job import start_caption_job
    from lora_gui.worker.client import WorkerClient

    comp, reg = ctx.components, ctx.registry
    jobs_root = ctx.config.data_dir / "caption-jobs"
    client = WorkerClient(jobs_root)
    popens: dict = {}  # job id -> Popen, reaped when the job has ended
    options = {comp[k] for k in ("ds_tagger", "ds_rule", "ds_general", "ds_character", "ds_exclude",
                                 "ds_underscores", "ds_captioner", "ds_prompt")}

    def start(data: dict):
        bench = workbench_of(reg.values(data))
        try:
            job = bench.caption_job(
                _filter(data, comp), str(data[comp["ds_tagger"]] or "").strip(), rule=data[comp["ds_rule"]],
                general_threshold=float(data[comp["ds_general"]] or 0),
                character_threshold=float(data[comp["ds_character"]] or 0),
                exclude=[t.strip() for t in (data[comp["ds_exclude"]] or "").split(",") if t.strip()],
                underscores_to_spaces=bool(data[comp["ds_underscores"]]),
                captioner=data[comp["ds_captioner"]] or "wd14", prompt=str(data[comp["ds_prompt"]] or ""))
        except DatasetError as exc:
            raise gr.Error(str(exc)) from None
        paths, popen = start_caption_job(jobs_root, job)
        popens[paths.run_id] = popen
        return {comp["ds_job"]: paths.run_id, comp["ds_timer"]: gr.Timer(active=True),
                comp["ds_job_status"]: f"Captioning {len(job.images)} images in the background…"}

    def tick(data: dict):
        job_id = data[comp["ds_job"]]
        if not job_id:
            return {comp["ds_timer"]: gr.Timer(active=False)}
        info = client.attach(job_id).info()
        if not info.final:
            done = f" {info.step} / {info.total_steps}" if info.total_steps else ""
            return {comp["ds_job_status"]: f"Captioning…{done} ({info.state.value})"}
        popen = popens.pop(job_id, None)
        if popen is not None:
            popen.wait(30)  # it has reported its end: only the exit is left
        logs = [e.message for e in client.attach(job_id).poll()[0] if e.kind == "log"]
        text = f"Captioning {info.state.value}. " + " ".join(logs)
        return {**view(data, message=text), comp["ds_job_status"]: text, comp["ds_job"]: "",
                comp["ds_timer"]: gr.Timer(active=False)}

    def stop(data: dict):
        job_id = data[comp["ds_job"]]
        if job_id:
            client.attach(job_id).stop()
        return {comp["ds_job_status"]: "Stopping: the captions written so far are kept."}

    job_outs = [comp["ds_job"], comp["ds_timer"], comp["ds_job_status"]]
    comp["ds_caption_start"].click(start, inputs=reg.inputs | filters | options, outputs=job_outs,
                                   api_visibility="private")
    comp["ds_timer"].tick(tick, inputs=reg.inputs | filters | {comp["ds_job"]},
                          outputs=[*view_outs, *job_outs], api_visibility="private")
    comp["ds_caption_stop"].click(stop, inputs={comp["ds_job"]}, outputs=[comp["ds_job_status"]],
                                  api_visibility="private")
