"""The run list (every run folder, newest first; a row opens that run in the run panel) and the GUI's
queue (settings waiting for their turn: add, move, remove), in the Presets and runs tab."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from lora_gui.events import RunState
from lora_gui.ui.compare import curve_rows, run_settings, settings_diff
from lora_gui.ui.context import Ctx, PageState
from lora_gui.ui.fields import check_values
from lora_gui.ui.run_panel import EMPTY_PLOT, draw, panel_outputs

RUN_COLUMNS = ["run", "state", "created", "steps", "output"]
QUEUE_COLUMNS = ["position", "name", "output", "state"]


def build_runs_panel(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Accordion("Runs", open=True, elem_id="runs-list"):
        comp["runs_refresh"] = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
        comp["runs_table"] = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, wrap=True,
                                          elem_id="runs-table", max_height=300)
        gr.Markdown("Select a row to show that run in the panel on the right.")
    with gr.Accordion("Compare runs", open=True, elem_id="compare"):
        with gr.Row(equal_height=False):
            comp["compare_runs"] = gr.Dropdown(label="Runs to compare", choices=[], multiselect=True,
                                               scale=4, elem_id="compare-runs")
            comp["compare_go"] = gr.Button("Compare", size="sm", scale=1, elem_id="compare-go")
        comp["compare_plot"] = gr.LinePlot(EMPTY_PLOT, x="step", y="loss", color="series",
                                           title="Compared runs", visible=False, height=280,
                                           elem_id="compare-plot")
        comp["compare_diff"] = gr.Markdown("", elem_id="compare-diff")
    with gr.Accordion("Queue", open=True, elem_id="queue"):
        comp["queue_add"] = gr.Button("Add the current settings to the queue", elem_id="queue-add",
                                      size="sm")
        comp["queue_table"] = gr.Dataframe(headers=QUEUE_COLUMNS, interactive=False,
                                           elem_id="queue-table")
        with gr.Row(equal_height=False):
            comp["queue_item"] = gr.Dropdown(label="Queued item", choices=[], scale=3,
                                             elem_id="queue-item")
            comp["queue_up"] = gr.Button("Up", size="sm", scale=1, elem_id="queue-up")
            comp["queue_down"] = gr.Button("Down", size="sm", scale=1, elem_id="queue-down")
            comp["queue_remove"] = gr.Button("Remove", size="sm", variant="stop", scale=1,
                                             elem_id="queue-remove")


def run_rows(ctx: Ctx) -> list[list]:
    rows = []
    for info in sorted(ctx.runs.client.list_runs(), key=lambda r: r.created or 0, reverse=True):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)) if info.created else ""
        steps = f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step or "")
        state = RunState.of(info.state)
        output = info.output_path or (info.message or "" if state is RunState.FAILED else "")
        rows.append([info.run_id, "damaged" if info.damaged else state.value, created, steps,
                     output])
    return rows


def queue_rows(ctx: Ctx) -> tuple[list[list], list[str]]:
    """The queue's rows and its items' names (the dropdown's choices)."""
    items = ctx.runs.client.queue_items()
    rows = [[i, item.name, item.output_name or "", _queue_state(item)] for i, item in enumerate(items, 1)]
    return rows, [item.name for item in items]


def _queue_state(item) -> str:
    if not item.running:
        return "waiting"
    return "training" if item.gpu is None else f"training on GPU {item.gpu}"  # launch.gpu_per_run


def refresh_lists(ctx: Ctx) -> dict:
    comp = ctx.components
    runs = run_rows(ctx)
    out = {comp["runs_table"]: runs or None, comp["compare_runs"]: gr.update(choices=[r[0] for r in runs])}
    try:
        rows, names = queue_rows(ctx)
    except Exception as exc:  # noqa: BLE001 - a queue folder problem must not break the page
        rows, names = [], []
        gr.Warning(f"The queue cannot be read: {exc}")
    out[comp["queue_table"]] = rows or None
    out[comp["queue_item"]] = gr.update(choices=names, value=names[0] if names else None)
    return out


def list_outputs(ctx: Ctx) -> list:
    return [ctx.components[k] for k in ("runs_table", "queue_table", "queue_item", "compare_runs")]


def compare(ctx: Ctx, run_ids: list[str] | None) -> dict:
    """The chosen runs' curves on one chart and their settings diff."""
    comp = ctx.components
    run_ids = list(dict.fromkeys(run_ids or []))
    if len(run_ids) < 2:
        raise gr.Error("Choose two or more runs to compare.")
    views, settings = {}, {}
    for run_id in run_ids:
        try:
            views[run_id] = ctx.runs.attach_view(run_id)
        except (FileNotFoundError, ValueError) as exc:
            raise gr.Error(f"The run {run_id} cannot be read: {exc}") from None
        settings[run_id] = run_settings(ctx.runs.run(run_id).run_dir)
    rows = curve_rows(views)
    # The title names the runs: a changed title rebuilds the chart, so new series get colours.
    plot = gr.update(value=pd.DataFrame(rows) if rows else EMPTY_PLOT, visible=bool(rows),
                     title="Compared: " + ", ".join(run_ids))
    return {comp["compare_plot"]: plot, comp["compare_diff"]: settings_diff(settings)}


def wire_runs_panel(ctx: Ctx) -> None:
    comp = ctx.components
    comp["runs_refresh"].click(lambda: refresh_lists(ctx), outputs=list_outputs(ctx),
                               api_visibility="private")

    def show_run(page: PageState, evt: gr.SelectData):
        row = evt.row_value if evt is not None else None
        if not row or not row[0]:
            return gr.skip()
        with page.lock:
            page.view = ctx.runs.attach_view(str(row[0]))
            return draw(ctx, page.view, force=True)

    comp["compare_go"].click(lambda ids: compare(ctx, ids), inputs=[comp["compare_runs"]],
                             outputs=[comp["compare_plot"], comp["compare_diff"]],
                             api_visibility="private")
    comp["runs_table"].select(show_run, inputs=[comp["page"]], outputs=panel_outputs(ctx),
                              api_visibility="private")
    _wire_queue(ctx)


def _wire_queue(ctx: Ctx) -> None:
    comp, reg, client = ctx.components, ctx.registry, ctx.runs.client

    def queue_add(values: dict):
        settings, issues = check_values(values)
        if settings is None:
            raise gr.Error("Not queued: " + "; ".join(map(str, issues)))
        client.enqueue(settings)
        gr.Info(f"Queued '{settings.model.output_name}': it starts when no other run is training.")
        return {**refresh_lists(ctx), comp["timer"]: gr.Timer(active=True)}  # watch for its start

    comp["queue_add"].click(reg.handler(queue_add), inputs=reg.inputs,
                            outputs=[*list_outputs(ctx), comp["timer"]], api_visibility="private")

    def queue_edit(name: str, edit, keep_selected: bool) -> dict:
        if not name:
            raise gr.Error("Choose a queued item first.")
        try:
            edit(name)
        except (ValueError, OSError) as exc:  # e.g. the item is being trained now
            raise gr.Error(str(exc)) from None
        out = refresh_lists(ctx)
        if keep_selected:
            out[comp["queue_item"]]["value"] = name
        return out

    def queue_up(name: str):
        return queue_edit(name, lambda n: client.queue_move(n, -1), keep_selected=True)

    def queue_down(name: str):
        return queue_edit(name, lambda n: client.queue_move(n, 1), keep_selected=True)

    def queue_remove(name: str):
        return queue_edit(name, client.queue_remove, keep_selected=False)

    for handler in (queue_up, queue_down, queue_remove):
        comp[handler.__name__].click(handler, inputs=[comp["queue_item"]],
                                     outputs=list_outputs(ctx), api_visibility="private")
