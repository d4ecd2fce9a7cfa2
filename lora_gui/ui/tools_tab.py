"""The Tools tab: resize, merge, extract and inspect LoRAs, each as a background worker run.

The fields are drawn from the job models (settings/tools.py: label = field name, info = its
description). Start writes a tool run folder (``runs/tools/<id>/tool.json``) through the worker
client; a ``gr.Timer`` follows its events (progress per module) until it ends, then the result is
shown: the file to download, the kept energy per module, or the inspect card and block-weight chart.
The page never imports torch: the tool runs in the worker process.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_gui.events import Progress, RunState
from lora_gui.settings.errors import SettingsError
from lora_gui.settings.tools import ExtractJob, InspectJob, MergeJob, ResizeJob, field_order, parse_job
from lora_gui.ui.context import Ctx

TOOLS = (("resize", "Resize", ResizeJob), ("merge", "Merge", MergeJob), ("extract", "Extract", ExtractJob),
         ("inspect", "Inspect", InspectJob))
POLL_S = 0.5
EMPTY_CHART = pd.DataFrame({"block": pd.Series([], dtype=str), "norm": pd.Series([], dtype=float)})


def _kinds(annotation) -> list:
    args = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    return [c for a in args for c in (typing.get_args(a) if typing.get_origin(a) is typing.Literal else (a,))]


def _widget(kind: str, name: str, field):
    """One input for a job field: the field name as label, its description as info."""
    elem_id = f"tool-{kind}-{name.replace('_', '-')}"
    common = {"label": name, "info": field.description, "elem_id": elem_id}
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    kinds = _kinds(field.annotation)
    if field.annotation is bool:
        return gr.Checkbox(value=bool(default), **common)
    if typing.get_origin(field.annotation) is list:
        text = "\n".join(map(str, default or []))
        return gr.Textbox(value=text, lines=2, placeholder="one per line", **common)
    if all(isinstance(k, str) for k in kinds):
        choices = ([""] if default is None else []) + kinds
        return gr.Dropdown(choices=choices, value=default or ("" if default is None else kinds[0]), **common)
    if kinds and kinds[0] in (int, float) and default is None:  # optional: an empty box means "not set"
        return gr.Textbox(value="", placeholder="empty: not set", **common)
    if kinds and kinds[0] in (int, float):
        return gr.Number(value=default, precision=0 if kinds[0] is int else None, **common)
    return gr.Textbox(value=default or "", **common)


def _document(kind: str, names: list[str], values: tuple) -> dict:
    """The job document from the widgets' values: empty optional fields left out, lists split."""
    model = dict((k, m) for k, _, m in TOOLS)[kind]
    doc: dict = {"kind": kind}
    for name, value in zip(names, values):
        field = model.model_fields[name]
        if typing.get_origin(field.annotation) is list:
            items = [v.strip() for v in str(value or "").replace(",", "\n").splitlines() if v.strip()]
            doc[name] = [float(v) for v in items] if name == "weights" and _floats(items) else items
        elif value is None or value == "":
            continue
        else:
            doc[name] = int(value) if isinstance(value, float) and _kinds(field.annotation)[:1] == [int] else value
    return doc


def _floats(items: list[str]) -> bool:
    try:
        [float(v) for v in items]
        return True
    except ValueError:
        return False


def build_tools_tab(ctx: Ctx) -> None:
    comp = ctx.components
    comp["tool_fields"] = {}
    with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
        gr.Markdown("Work on LoRA files: each tool runs in the background worker (Stop ends it; an existing "
                    "file is never overwritten). Paths are on the machine that runs lora-gui.")
        with gr.Tabs(elem_id="tool-tabs"):
            for kind, title, model in TOOLS:
                with gr.Tab(title, id=f"tool-{kind}", elem_id=f"tool-tab-{kind}"):
                    gr.Markdown((model.__doc__ or "").strip())
                    names = field_order(model)
                    widgets = [_widget(kind, n, model.model_fields[n]) for n in names]
                    comp["tool_fields"][kind] = (names, widgets)
                    comp[f"tool_start_{kind}"] = gr.Button(f"{title}", variant="primary",
                                                           elem_id=f"tool-start-{kind}")
        with gr.Row():
            comp["tool_status"] = gr.Markdown("", elem_id="tool-status")
            comp["tool_stop"] = gr.Button("Stop the tool", variant="stop", size="sm", elem_id="tool-stop")
        comp["tool_download"] = gr.DownloadButton("Download the result", visible=False, elem_id="tool-download")
        comp["tool_report"] = gr.Markdown("", elem_id="tool-report")
        comp["tool_table"] = gr.Dataframe(visible=False, interactive=False, elem_id="tool-table", max_height=300)
        comp["tool_chart"] = gr.BarPlot(EMPTY_CHART, x="block", y="norm", title="Block weights (norm of the update)",
                                        visible=False, elem_id="tool-chart", sort=None)
        comp["tool_run"] = gr.State(None)  # (run id, events read so far)
        comp["tool_timer"] = gr.Timer(POLL_S, active=False)


def _tools_client(ctx: Ctx):
    client = ctx.components.get("tools_client")
    if client is None:
        from lora_gui.worker.client import TOOLS_DIR, WorkerClient

        base = ctx.runs.client
        client = base.tools_client() if hasattr(base, "tools_client") else WorkerClient(ctx.config.runs_dir / TOOLS_DIR)
        ctx.components["tools_client"] = client
    return client


def wire_tools_tab(ctx: Ctx) -> None:
    comp = ctx.components
    outputs = [comp[k] for k in ("tool_status", "tool_download", "tool_report", "tool_table", "tool_chart",
                                 "tool_run", "tool_timer")]
    for kind, _, _ in TOOLS:
        names, widgets = comp["tool_fields"][kind]

        def start(*values, kind=kind, names=names):
            return _start(ctx, kind, names, values)

        comp[f"tool_start_{kind}"].click(start, inputs=widgets, outputs=outputs, api_visibility="private")
    comp["tool_timer"].tick(lambda state: _poll(ctx, state), inputs=[comp["tool_run"]], outputs=outputs,
                            api_visibility="private")
    comp["tool_stop"].click(lambda state: _stop(ctx, state), inputs=[comp["tool_run"]], outputs=[comp["tool_status"]],
                            api_visibility="private")


def _start(ctx: Ctx, kind: str, names: list[str], values: tuple) -> list:
    try:
        job = parse_job(_document(kind, names, values))
        run = _tools_client(ctx).start_tool(job)
    except SettingsError as exc:
        raise gr.Error(str(exc)) from None
    except RuntimeError as exc:  # another tool is still running
        raise gr.Error(str(exc)) from None
    return [f"**{kind}**: starting the worker ...", gr.DownloadButton(visible=False), "",
            gr.Dataframe(visible=False), gr.BarPlot(visible=False), (run.run_id, 0), gr.Timer(POLL_S, active=True)]


def _stop(ctx: Ctx, state) -> str:
    if not state:
        return "No tool is running."
    _tools_client(ctx).attach(state[0]).stop()
    return "Stopping the tool ..."


def _poll(ctx: Ctx, state) -> list:
    keep = [gr.skip()] * 5
    if not state:
        return [*keep, state, gr.Timer(active=False)]
    run_id, since = state
    run = _tools_client(ctx).attach(run_id)
    events, since = run.poll(since)
    progress = [e for e in events if isinstance(e, Progress)]
    info = run.info()
    if not info.final:
        status = (f"**{progress[-1].phase}**: {progress[-1].step} / {progress[-1].total_steps} modules"
                  if progress else gr.skip())
        return [status, *keep[1:], (run_id, since), gr.skip()]
    return [*_result(ctx, run, info), None, gr.Timer(active=False)]


def _result(ctx: Ctx, run, info) -> list:
    state = RunState.of(info.state)
    hidden = [gr.DownloadButton(visible=False), "", gr.Dataframe(visible=False), gr.BarPlot(visible=False)]
    if state is not RunState.FINISHED:
        return [f"**{state.value}**: {info.message or ''}", *hidden]
    try:
        result = json.loads(run.paths.result.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"**finished**: {info.message or ''}", *hidden]
    if result.get("tool") == "inspect":
        chart = pd.DataFrame([{"block": b["block"], "norm": float(b["norm"])} for b in result.get("blocks", [])])
        return ["**inspect**: done", gr.DownloadButton(visible=False), result.get("card_text", ""),
                gr.Dataframe(visible=False), gr.BarPlot(chart if len(chart) else EMPTY_CHART, visible=True)]
    output = Path(result["output"])
    served = ctx.servable(output)  # only files inside the configured roots are offered
    size = result.get("output_size", 0) / 1e6
    status = f"**{result['tool']}**: wrote `{output}` ({size:.2f} MB)"
    table = gr.Dataframe(visible=False)
    if "modules" in result and isinstance(result["modules"], list):
        rows = [[m["name"], m["old_rank"], m["new_rank"], round(m["new_alpha"], 4), round(m["fro_retained"], 4)]
                for m in result["modules"]]
        table = gr.Dataframe(pd.DataFrame(rows, columns=["module", "rank", "new rank", "new alpha", "kept energy"]),
                             visible=True)
        status += (f"; kept energy mean {result['mean_fro_retained']:.1%}, lowest {result['min_fro_retained']:.1%}"
                   f" (input {result['input_size'] / 1e6:.2f} MB)")
    elif "kept_energy" in result:
        rows = [[k, round(v, 4)] for k, v in result["kept_energy"].items()]
        table = gr.Dataframe(pd.DataFrame(rows, columns=["module", "kept energy"]), visible=True)
    if served is None:
        status += " (outside the folders this page may serve: fetch it on the server, or start the GUI with --browse-root)"
    return [status, gr.DownloadButton(value=served, visible=served is not None), "", table, gr.BarPlot(visible=False)]
