"""``build_app(config)``: the whole page. The settings tabs come from the schema (``form``); the
run panel, the tool panels (presets, settings files, path browser, dataset preview, runs and queue)
and the API are wired around them. Building does not launch anything."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from lora_gui.events import RunState, Stop
from lora_gui.settings import SettingsError, io
from lora_gui.ui.browser_panel import build_browser_panel, wire_browser_panel
from lora_gui.ui.config import UIConfig
from lora_gui.ui.context import Ctx, PageState
from lora_gui.ui.dataset_panel import build_dataset_panel, wire_dataset_panel
from lora_gui.ui.dataset_tab import build_dataset_tab, wire_dataset_tab
from lora_gui.ui.fields import settings_to_values
from lora_gui.ui.files import ServedFiles
from lora_gui.ui.files_panel import build_files_panel, wire_files_panel
from lora_gui.ui.form import build_tabs, wire_family_fields
from lora_gui.ui.presets_panel import build_preset_picker, wire_presets_panel
from lora_gui.ui.run_control import RunController
from lora_gui.ui.run_panel import build_panel, draw, on_load, panel_outputs, wire_panel
from lora_gui.ui.runs_panel import build_runs_panel, list_outputs, refresh_lists, wire_runs_panel
from lora_gui.ui.tools_tab import build_tools_tab, wire_tools_tab

CSS = """
#run-panel { position: sticky; top: 0.5rem; }
#validation-summary { border-left: 4px solid var(--error-border-color, #dc2626); padding-left: 0.75rem; }
#run-result h3 { margin-top: 0.25rem; }
"""

TITLE = "lora-gui"


def make_client(config: UIConfig):
    from lora_gui.worker.client import WorkerClient

    return WorkerClient(config.runs_dir, warm=True)


def build_app(config: UIConfig | None = None, client: Any = None) -> gr.Blocks:
    """The page, not launched. ``client`` defaults to a ``WorkerClient`` on ``config.runs_dir``
    (tests pass a fake). The parts are reachable as ``blocks.lora_gui`` (a ``Ctx``)."""
    config = config or UIConfig()
    ctx = Ctx(config=config, runs=RunController(client if client is not None else make_client(config)))
    ctx.stage = ServedFiles(config.browse_roots)
    settings, note = config.initial_settings()
    values = settings_to_values(settings)
    comp = ctx.components
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        ctx.blocks = blocks
        gr.Markdown(f"# {TITLE}\nTrain a LoRA for SD 1.x/2.x, SDXL or Flux.1: choose a preset, check the tabs, "
                    "press Start. Each field says what it does under its label.", elem_id="header")
        comp["note"] = gr.Markdown(f"<small>{note}</small>", elem_id="startup-note")
        with gr.Row():
            with gr.Column(scale=3):
                build_preset_picker(ctx)
                comp["summary"] = gr.Markdown("", visible=False, elem_id="validation-summary")
                with gr.Tabs(elem_id="settings-tabs", overflow_behavior="wrap"):  # all tabs in view
                    ctx.registry = build_tabs(values, extras={
                        "model": lambda: build_dataset_panel(ctx),
                        "runs": lambda: (build_files_panel(ctx), build_runs_panel(ctx)),
                        "launch": _gpu_list,
                    })
                    build_tools_tab(ctx)
                    build_dataset_tab(ctx)
                wire_family_fields(ctx.registry)
                build_browser_panel(ctx)
            with gr.Column(scale=2, elem_id="run-panel"):
                build_panel(ctx)
        for wire in (wire_panel, wire_presets_panel, wire_files_panel, wire_browser_panel,
                     wire_dataset_panel, wire_dataset_tab, wire_runs_panel, wire_tools_tab):
            wire(ctx)
        wire_load(ctx)
        wire_api(ctx)
    blocks.lora_gui = ctx
    return blocks


def wire_load(ctx: Ctx) -> None:
    comp, reg, config = ctx.components, ctx.registry, ctx.config

    def load(page: PageState):
        out = {}
        if config.last_settings_path.is_file():  # a restart or another page may have saved newer ones
            try:
                settings, note = config.initial_settings()
                out.update(reg.updates(settings_to_values(settings)))
                out[comp["note"]] = f"<small>{note}</small>"
            except SettingsError:
                pass
        out.update(on_load(ctx, page))
        out.update(refresh_lists(ctx))
        return out

    comp["load_outputs"] = [*reg.outputs, *panel_outputs(ctx), *list_outputs(ctx), comp["note"]]
    ctx.blocks.load(load, inputs=[comp["page"]], outputs=comp["load_outputs"],
                    api_visibility="private")


def wire_api(ctx: Ctx) -> None:
    """Endpoints for scripts (``gradio_client``): start a run from a settings JSON, read its status,
    stop it. The page's own events are private."""

    def start_run(settings_json: str) -> str:
        """Start a run from a lora-gui settings document (JSON text); returns the run id."""
        try:
            settings = io.load_document(io.parse_json(settings_json, "the settings"))
        except SettingsError as exc:
            raise gr.Error(str(exc)) from None
        if ctx.runs.active_id():
            raise gr.Error("A run is already training: stop it first.")
        ctx.runs.ensure_demo(settings)
        return ctx.runs.start(settings)

    def run_status(run_id: str) -> str:
        """The run's state, step, losses so far and output as JSON text."""
        try:
            view = ctx.runs.attach_view(run_id)
            info = ctx.runs.run(run_id).info()
        except (FileNotFoundError, ValueError) as exc:  # no such run, or not a run id
            raise gr.Error(str(exc)) from None
        # The state is the run folder's, reconciled with the process (the page shows the same).
        return json.dumps({
            "run_id": run_id, "state": "damaged" if info.damaged else RunState.of(info.state).value,
            "step": view.progress.step if view.progress else info.step,
            "total_steps": view.progress.total_steps if view.progress else info.total_steps,
            "losses": view.losses, "validation": view.validation,
            "samples": [p for p, _ in view.samples],
            "output_path": view.finished.output_path if view.finished else info.output_path,
            "message": view.failed.message if view.failed else (info.message or ""),
        })

    def stop_run(run_id: str) -> str:
        """Ask the run to save and stop; returns a sentence."""
        ctx.runs.command(run_id, Stop())
        return f"Run {run_id} is saving and stopping."

    gr.api(start_run, api_name="start_run")
    gr.api(run_status, api_name="run_status")
    gr.api(stop_run, api_name="stop_run")


__all__ = ["CSS", "build_app", "draw"]


def _gpu_list() -> None:
    """The GPUs this machine has (NVML, torch-free), under the GPUs and machines tab."""
    from lora_gui.worker.launch import find_gpus

    gpus = find_gpus()
    text = "; ".join(g.describe() for g in gpus) if gpus else (
        "No NVIDIA GPU found: several processes run on the CPU (correct, not faster).")
    gr.Markdown(f"<small>GPUs found: {text}</small>", elem_id="gpu-list")
