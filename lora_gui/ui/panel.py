"""The run panel (always visible, outside the tabs): Start/Stop/Save now/Sample now/Force stop, the
status line, progress, the live loss chart, the sample gallery, the log tail and the result card.

Streaming is a ``gr.Timer`` poll of the run's event file from a cursor kept in the page's state, plus
a page-load handler that attaches to the active run and redraws its history, so a reloaded page and
a restarted GUI both pick the run up again."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from lora_gui.ui.context import Ctx, PageState
from lora_gui.ui.fields import check_values, issues_markdown, tab_error_counts
from lora_gui.ui.runview import RunView
from lora_gui.ui.session import DemoBuildError, demo_dir_for

ACTIVE_POLL_S = 0.5
IDLE_POLL_S = 2.0  # while queued items wait for their turn
# The timer is off while nothing runs and nothing is queued: each tick makes the page drop the red
# validation messages under the fields (gradio 6.31 resets the loading status of components that
# another event updated), and an idle page should cost the server nothing.
EMPTY_PLOT = pd.DataFrame({"step": pd.Series([], dtype="int64"), "loss": pd.Series([], dtype="float64"),
                           "series": pd.Series([], dtype="str")})


def build_panel(ctx: Ctx) -> None:
    c = ctx.c
    with gr.Row():
        c["start"] = gr.Button("Start", variant="primary", elem_id="run-start", scale=2)
        c["validate"] = gr.Button("Validate", elem_id="run-validate", scale=1)
    with gr.Row():
        c["stop"] = gr.Button("Stop (saves)", variant="stop", interactive=False, elem_id="run-stop",
                              size="sm")
        c["save_now"] = gr.Button("Save now", interactive=False, elem_id="run-save-now", size="sm")
        c["sample_now"] = gr.Button("Sample now", interactive=False, elem_id="run-sample-now",
                                    size="sm")
        c["force_stop"] = gr.Button("Force stop", interactive=False, elem_id="run-force-stop",
                                    size="sm")
    c["status"] = gr.Markdown(RunView().status_markdown(), elem_id="run-status")
    c["progress"] = gr.Markdown("", elem_id="run-progress")
    c["result"] = gr.Markdown("", elem_id="run-result")
    c["download"] = gr.DownloadButton("Download the LoRA", visible=False, elem_id="run-download",
                                      variant="primary")
    c["plot"] = gr.LinePlot(EMPTY_PLOT, x="step", y="loss", color="series", title="Loss",
                            x_title="step", y_title="loss", visible=False, elem_id="run-plot",
                            height=260, color_map={"loss": "#9ecae1", "smoothed": "#08519c",
                                                   "validation": "#e6550d"})
    c["gallery"] = gr.Gallery(label="Samples (newest first)", columns=3, height=300, visible=False,
                              elem_id="run-gallery", object_fit="contain")
    c["log"] = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False,
                          elem_id="run-log")
    c["page"] = gr.State(PageState())
    c["timer"] = gr.Timer(ACTIVE_POLL_S, active=False)


def _buttons(ctx: Ctx, active: bool) -> dict:
    c = ctx.c
    return {c["start"]: gr.update(interactive=not active),
            **{c[k]: gr.update(interactive=active)
               for k in ("stop", "save_now", "sample_now", "force_stop")}}


def draw(ctx: Ctx, view: RunView, force: bool = False) -> dict:
    """Updates for the parts of the panel that changed (all of them when ``force``)."""
    c, out = ctx.c, {}
    if force or view.changed("status"):
        out[c["status"]] = view.status_markdown()
        out.update(_buttons(ctx, view.active))
        out[c["timer"]] = timer_update(ctx, view)
        view.mark_drawn("status")
    if force or view.changed("progress"):
        out[c["progress"]] = view.progress_markdown()
        view.mark_drawn("progress")
    has_points = bool(view.losses or view.validation)
    if (force and has_points) or view.plot_due():
        out[c["plot"]] = gr.update(value=pd.DataFrame(view.plot_rows()), visible=True)
        view.mark_drawn("plot")
        view.plot_drawn_at = time.monotonic()
    elif force:
        out[c["plot"]] = gr.update(value=EMPTY_PLOT, visible=False)
    if force or view.changed("gallery"):
        items = view.gallery()
        for path, _ in items[:1]:
            ctx.allow(Path(path).parent)
        out[c["gallery"]] = gr.update(value=items or None, visible=bool(items))
        view.mark_drawn("gallery")
    if force or view.changed("log"):
        out[c["log"]] = view.log_text()
        view.mark_drawn("log")
    if force or view.changed("result"):
        out[c["result"]] = view.result_markdown()
        path = view.result_file()
        if path:
            ctx.allow(Path(path).parent)
        out[c["download"]] = gr.update(value=path, visible=bool(path))
        view.mark_drawn("result")
    return out


def timer_update(ctx: Ctx, view: RunView) -> gr.Timer:
    if view.active:
        return gr.Timer(ACTIVE_POLL_S, active=True)
    return gr.Timer(IDLE_POLL_S, active=ctx.bridge.queue_pending())


def panel_outputs(ctx: Ctx) -> list:
    c = ctx.c
    return [c[k] for k in ("status", "progress", "plot", "gallery", "log", "result", "download",
                           "timer", "start", "stop", "save_now", "sample_now", "force_stop")]


def wire_panel(ctx: Ctx) -> None:
    validator, summary = _validation(ctx)
    _wire_tick(ctx)
    _wire_validate_and_start(ctx, validator, summary)
    _wire_commands(ctx)


def _wire_tick(ctx: Ctx) -> None:
    c = ctx.c

    def tick(page: PageState):
        with page.lock:
            view = page.view
            if view.active:
                ctx.bridge.poll(view)
                return draw(ctx, view) or gr.skip()
            active = ctx.bridge.active_id(max_age_s=IDLE_POLL_S)
            if active and active != view.run_id:  # started by the queue (or another page)
                page.view = ctx.bridge.attach_view(active)
                return draw(ctx, page.view, force=True)
            out = draw(ctx, view)
            if not ctx.bridge.queue_pending():
                out[c["timer"]] = gr.Timer(active=False)
            return out or gr.skip()

    c["timer"].tick(tick, inputs=[c["page"]], outputs=panel_outputs(ctx), show_progress="hidden",
                    trigger_mode="once", concurrency_limit=None, api_visibility="private")


def _validation(ctx: Ctx):
    """The event validator (a red message under each invalid field; the event does not run) and
    the summary handler (the list above the tabs, tab labels with error counts, a toast)."""
    c, reg = ctx.c, ctx.registry

    def validator(data: dict):
        _, issues = check_values(reg.values(data))
        by_key: dict[str, str] = {}
        for issue in issues:
            by_key.setdefault(issue.path, issue.message)
        return {comp: gr.validate(key not in by_key, by_key.get(key, ""))
                for key, comp in reg.components.items()}

    def summary(values: dict):
        _, issues = check_values(values)
        if issues:
            gr.Warning(f"{len(issues)} invalid setting{'s' if len(issues) > 1 else ''}: see the list "
                       "above the tabs and the red messages under the fields.")
        return {c["summary"]: gr.update(value=issues_markdown(issues), visible=bool(issues)),
                **reg.tab_updates(tab_error_counts(issues))}

    return validator, reg.handler(summary)


def _wire_validate_and_start(ctx: Ctx, validator, summary) -> None:
    """The summary runs first and the validated event after it: a listener that takes the fields as
    inputs clears their red messages when its first result arrives, so the two must not overlap."""
    c, reg = ctx.c, ctx.registry
    summary_outs = [c["summary"], *ctx.registry.tabs.values()]

    def validated(values: dict):
        gr.Success("All settings are valid.")

    def start(data: dict):
        yield from start_run(ctx, data)

    c["validate"].click(summary, inputs=reg.inputs, outputs=summary_outs, show_progress="hidden",
                        api_visibility="private").then(
        reg.handler(validated), inputs=reg.inputs, outputs=None, validator=validator,
        api_visibility="private", show_progress="hidden")
    c["start"].click(summary, inputs=reg.inputs, outputs=summary_outs, show_progress="hidden",
                     api_visibility="private").then(
        start, inputs=reg.inputs | {c["page"]},
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
    page: PageState = data[ctx.c["page"]]
    settings, _ = check_values(ctx.registry.values(data))
    if settings is None:
        raise gr.Error("Some settings are invalid: see the list above the tabs.")
    active = ctx.bridge.active_id()
    if active:
        raise gr.Error(f"Run {active} is still training: stop it first, or add these settings to "
                       "the queue (Presets and runs tab).")
    ctx.config.save_last(settings)
    view = RunView(state="starting")
    view.set_note("building the tiny demo model and dataset (first use, about 20 s)…"
                  if demo_dir_for(settings) else "starting the trainer…")
    yield _show(ctx, page, view, force=True)
    try:
        built = ctx.bridge.ensure_demo(settings)
        run_id = ctx.bridge.start(settings)
    except DemoBuildError as exc:
        yield _show(ctx, page, fail=str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the worker's sentence goes to the page
        yield _show(ctx, page, fail=f"The run could not start: {exc}")
        return
    view = RunView(run_id=run_id, state="starting")
    if built:
        view.log.append(built)
    view.set_note("starting the trainer…")
    ctx.bridge.poll(view)
    yield _show(ctx, page, view, force=True)


COMMAND_NOTES = {
    "stop": ("saving the LoRA at the current step, then stopping…", "stopping"),
    "save_now": ("saving the LoRA now…", None),
    "sample_now": ("making samples now…", None),
    "force_stop": ("ending the trainer (it is killed if it does not stop within 10 s)…", "stopping"),
}


def _wire_commands(ctx: Ctx) -> None:
    c = ctx.c

    def command(what: str):
        def send(page: PageState):
            with page.lock:
                view = page.view
                if not view.run_id or not view.active:
                    raise gr.Error("No run is training.")
                ctx.bridge.command(view.run_id, what)
                view.set_note(*COMMAND_NOTES[what])
                return draw(ctx, view) or gr.skip()

        send.__name__ = what
        return send

    for what in COMMAND_NOTES:
        c[what].click(command(what), inputs=[c["page"]], outputs=panel_outputs(ctx),
                      api_visibility="private", concurrency_limit=None, show_progress="hidden")


def on_load(ctx: Ctx, page: PageState) -> dict:
    """Attach the page to the active run (or show the latest one) with its whole history."""
    with page.lock:
        run_id = ctx.bridge.latest_id()
        page.view = ctx.bridge.attach_view(run_id) if run_id else RunView()
        if run_id and not page.view.active and page.view.state == "starting":
            page.view.state = "idle"  # an old run folder with no events
        return draw(ctx, page.view, force=True)
