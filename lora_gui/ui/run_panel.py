"""The run panel (always visible, outside the tabs): Start/Stop/Save now/Sample now/Force stop, the
status line, progress, the live loss chart, the sample gallery, the log tail and the result card.

Streaming is a ``gr.Timer`` poll of the run's event file from a cursor kept in the page's state, plus
a page-load handler that attaches to the active run and redraws its history, so a reloaded page and
a restarted GUI both pick the run up again."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from lora_gui.events import Command, ForceStop, RunState, SampleNow, SaveNow, Stop
from lora_gui.ui.cockpit import build_cockpit, cockpit_outputs, draw_cockpit, wire_notifications
from lora_gui.ui.context import Ctx, PageState
from lora_gui.ui.demo_build import DemoBuildError
from lora_gui.ui.fields import check_values, issues_markdown, tab_error_counts
from lora_gui.ui.runview import RunView
from lora_gui.worker.demo import demo_dir_for

# The panel's command buttons (each component is named by its command's kind), what each
# sends, and the note (and state) the panel shows until the run answers.
COMMANDS: tuple[tuple[Command, str, RunState | None], ...] = (
    (Stop(), "saving the LoRA at the current step, then stopping…", RunState.STOPPING),
    (SaveNow(), "saving the LoRA now…", None),
    (SampleNow(), "making samples now…", None),
    (ForceStop(), f"ending the trainer (it is killed if it does not stop within {ForceStop().grace_s:g} "
                  "s)…", RunState.STOPPING),
)
COMMAND_BUTTONS = tuple(command.kind for command, _, _ in COMMANDS)

# Once points arrive the page polls every second: every poll costs the browser gradio's status work
# across the whole page (it grows with the number of settings), so polling every 0.5 s cost 34-35 %
# of a core in chromium and every 1 s 19-20 % (bench/page_cpu.py, quiet machine, one run); the chart
# is redrawn at most every 2 s either way. From Start to the first loss point the page polls every
# 0.25 s: the trainer's set-up takes a second or two, and the first point should not wait for a poll.
ACTIVE_POLL_S = 1.0
FIRST_POINT_POLL_S = 0.25
IDLE_POLL_S = 2.0  # while queued items wait for their turn
# The timer is off while nothing runs and nothing is queued: each tick makes the page drop the red
# validation messages under the fields (gradio 6.31 resets the loading status of components that
# another event updated), and an idle page should cost the server nothing.
EMPTY_PLOT = pd.DataFrame({"step": pd.Series([], dtype="int64"), "loss": pd.Series([], dtype="float64"),
                           "series": pd.Series([], dtype="str")})


def build_panel(ctx: Ctx) -> None:
    comp = ctx.components
    with gr.Row():
        comp["start"] = gr.Button("Start", variant="primary", elem_id="run-start", scale=2)
        comp["validate"] = gr.Button("Validate", elem_id="run-validate", scale=1)
    with gr.Row():
        comp["stop"] = gr.Button("Stop (saves)", variant="stop", interactive=False, elem_id="run-stop",
                                 size="sm")
        comp["save_now"] = gr.Button("Save now", interactive=False, elem_id="run-save-now", size="sm")
        comp["sample_now"] = gr.Button("Sample now", interactive=False, elem_id="run-sample-now",
                                       size="sm")
        comp["force_stop"] = gr.Button("Force stop", interactive=False, elem_id="run-force-stop",
                                       size="sm")
    comp["status"] = gr.Markdown(RunView().status_markdown(), elem_id="run-status")
    comp["progress"] = gr.Markdown("", elem_id="run-progress")
    comp["result"] = gr.Markdown("", elem_id="run-result")
    comp["download"] = gr.DownloadButton("Download the LoRA", visible=False, elem_id="run-download",
                                         variant="primary")
    comp["plot"] = gr.LinePlot(EMPTY_PLOT, x="step", y="loss", color="series", title="Loss",
                               x_title="step", y_title="loss", visible=False, elem_id="run-plot",
                               height=260, color_map={"loss": "#9ecae1", "smoothed": "#08519c",
                                                      "validation": "#e6550d"})
    comp["gallery"] = gr.Gallery(label="Samples (newest first)", columns=3, height=300, visible=False,
                                 elem_id="run-gallery", object_fit="contain")
    build_cockpit(ctx)
    comp["log"] = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False,
                             elem_id="run-log")
    comp["page"] = gr.State(PageState())
    comp["timer"] = gr.Timer(ACTIVE_POLL_S, active=False)


def _buttons(ctx: Ctx, active: bool) -> dict:
    comp = ctx.components
    return {comp["start"]: gr.update(interactive=not active),
            **{comp[k]: gr.update(interactive=active)
               for k in COMMAND_BUTTONS}}


def draw(ctx: Ctx, view: RunView, force: bool = False) -> dict:
    """Updates for the parts of the panel that changed (all of them when ``force``)."""
    comp, out = ctx.components, {}
    if force or view.changed("status"):
        out[comp["status"]] = view.status_markdown()
        out.update(_buttons(ctx, view.active))
        out[comp["timer"]] = timer_update(ctx, view)
        view.mark_drawn("status")
    elif view.active and view.poll_s != poll_interval(view):  # the first point arrived
        out[comp["timer"]] = timer_update(ctx, view)
    if force or view.changed("progress"):
        out[comp["progress"]] = view.progress_markdown()
        view.mark_drawn("progress")
    has_points = bool(view.losses or view.validation)
    if (force and has_points) or view.plot_due():
        out[comp["plot"]] = gr.update(value=pd.DataFrame(view.plot_rows()), visible=True)
        view.mark_drawn("plot")
        view.plot_drawn_at = time.monotonic()
    elif force:
        out[comp["plot"]] = gr.update(value=EMPTY_PLOT, visible=False)
    if force or view.changed("gallery"):
        items = [(served, caption) for path, caption in view.gallery()
                 if (served := ctx.servable(path))]
        out[comp["gallery"]] = gr.update(value=items or None, visible=bool(items))
        view.mark_drawn("gallery")
    if force or view.changed("log"):
        out[comp["log"]] = view.log_text()
        view.mark_drawn("log")
    if force or view.changed("result"):
        out[comp["result"]] = view.result_markdown()
        path = ctx.servable(view.result_file())
        out[comp["download"]] = gr.update(value=path, visible=bool(path))
        view.mark_drawn("result")
    out.update(draw_cockpit(ctx, view, force))
    return out


def poll_interval(view: RunView) -> float:
    return ACTIVE_POLL_S if view.losses or view.validation else FIRST_POINT_POLL_S


def timer_update(ctx: Ctx, view: RunView) -> gr.Timer:
    if view.active:
        view.poll_s = poll_interval(view)
        return gr.Timer(view.poll_s, active=True)
    view.poll_s = 0.0
    return gr.Timer(IDLE_POLL_S, active=ctx.runs.queue_pending())


def panel_outputs(ctx: Ctx) -> list:
    comp = ctx.components
    return [*(comp[k] for k in ("status", "progress", "plot", "gallery", "log", "result", "download",
                                "timer", "start", *COMMAND_BUTTONS)), *cockpit_outputs(ctx)]


def wire_panel(ctx: Ctx) -> None:
    validator, summary = _validation(ctx)
    _wire_tick(ctx)
    _wire_validate_and_start(ctx, validator, summary)
    _wire_commands(ctx)
    wire_notifications(ctx)


def _wire_tick(ctx: Ctx) -> None:
    comp = ctx.components

    def tick(page: PageState):
        with page.lock:
            view = page.view
            if view.active:
                ctx.runs.poll(view)
                return draw(ctx, view) or gr.skip()
            active = ctx.runs.active_id(max_age_s=IDLE_POLL_S)
            if active and active != view.run_id:  # started by the queue (or another page)
                page.view = ctx.runs.attach_view(active)
                return draw(ctx, page.view, force=True)
            out = draw(ctx, view)
            if not ctx.runs.queue_pending():
                out[comp["timer"]] = gr.Timer(active=False)
            return out or gr.skip()

    comp["timer"].tick(tick, inputs=[comp["page"]], outputs=panel_outputs(ctx),
                       show_progress="hidden", trigger_mode="once", concurrency_limit=None,
                       api_visibility="private")


def _validation(ctx: Ctx):
    """The event validator (a red message under each invalid field; the event does not run) and
    the summary handler (the list above the tabs, tab labels with error counts, a toast)."""
    comp, reg = ctx.components, ctx.registry

    def validator(data: dict):
        _, issues = check_values(reg.values(data))
        by_key: dict[str, str] = {}
        for issue in issues:
            by_key.setdefault(issue.path, issue.message)
        return {component: gr.validate(key not in by_key, by_key.get(key, ""))
                for key, component in reg.components.items()}

    def summary(values: dict):
        _, issues = check_values(values)
        if issues:
            gr.Warning(f"{len(issues)} invalid setting{'s' if len(issues) > 1 else ''}: see the list "
                       "above the tabs and the red messages under the fields.")
        return {comp["summary"]: gr.update(value=issues_markdown(issues), visible=bool(issues)),
                **reg.tab_updates(tab_error_counts(issues))}

    return validator, reg.handler(summary)


def _wire_validate_and_start(ctx: Ctx, validator, summary) -> None:
    """The summary runs first and the validated event after it: a listener that takes the fields as
    inputs clears their red messages when its first result arrives, so the two must not overlap."""
    comp, reg = ctx.components, ctx.registry
    summary_outs = [comp["summary"], *ctx.registry.tabs.values()]

    def validated(values: dict):
        gr.Success("All settings are valid.")

    def start(data: dict):
        yield from start_run(ctx, data)

    comp["validate"].click(summary, inputs=reg.inputs, outputs=summary_outs, show_progress="hidden",
                           api_visibility="private").then(
        reg.handler(validated), inputs=reg.inputs, outputs=None, validator=validator,
        api_visibility="private", show_progress="hidden")
    comp["start"].click(summary, inputs=reg.inputs, outputs=summary_outs, show_progress="hidden",
                        api_visibility="private").then(
        start, inputs=reg.inputs | {comp["page"]},
        outputs=panel_outputs(ctx), validator=validator, api_visibility="private",
        concurrency_limit=None, show_progress="hidden")


def _show(ctx: Ctx, page: PageState, view: RunView | None = None, force: bool = False,
          fail: str | None = None) -> dict:
    with page.lock:
        if view is not None:
            page.view = view
        if fail:
            page.view.fail(fail)
        return draw(ctx, page.view, force=force)


def start_run(ctx: Ctx, data: dict):
    """Start: save the settings as the last used, build the demo on first use, start the worker.
    A generator, so that the page says what it is doing while the demo model is built."""
    page: PageState = data[ctx.components["page"]]
    settings, _ = check_values(ctx.registry.values(data))
    if settings is None:
        raise gr.Error("Some settings are invalid: see the list above the tabs.")
    active = ctx.runs.active_id()
    if active:
        raise gr.Error(f"Run {active} is still training: stop it first, or add these settings to "
                       "the queue (Presets and runs tab).")
    ctx.config.save_last(settings)
    view = RunView(state=RunState.STARTING)
    view.set_note("building the tiny demo model and dataset (first use, about 20 s)…"
                  if demo_dir_for(settings) else "starting the trainer…")
    yield _show(ctx, page, view, force=True)
    try:
        built = ctx.runs.ensure_demo(settings)
        run_id = ctx.runs.start(settings)
    except DemoBuildError as exc:
        yield _show(ctx, page, fail=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker's sentence goes to the page
        yield _show(ctx, page, fail=f"The run could not start: {exc}")
        return
    view = ctx.runs.new_view(run_id)
    if built:
        view.log.append(built)
    view.set_note("starting the trainer…")
    ctx.runs.poll(view)
    yield _show(ctx, page, view, force=True)


def _wire_commands(ctx: Ctx) -> None:
    comp = ctx.components

    def sender(command: Command, note: str, state: RunState | None):
        def send(page: PageState):
            with page.lock:
                view = page.view
                if not view.run_id or not view.active:
                    raise gr.Error("No run is training.")
                ctx.runs.command(view.run_id, command)
                view.set_note(note, state)
                return draw(ctx, view) or gr.skip()

        send.__name__ = command.kind
        return send

    for command, note, state in COMMANDS:
        comp[command.kind].click(sender(command, note, state), inputs=[comp["page"]],
                                 outputs=panel_outputs(ctx), api_visibility="private",
                                 concurrency_limit=None, show_progress="hidden")


def on_load(ctx: Ctx, page: PageState) -> dict:
    """Attach the page to the active run (or show the latest one) with its whole history."""
    with page.lock:
        run_id = ctx.runs.latest_id()
        page.view = ctx.runs.attach_view(run_id) if run_id else RunView()
        return draw(ctx, page.view, force=True)
