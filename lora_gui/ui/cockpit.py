"""The run panel's cockpit parts that other trainers do not show: every checkpoint with its
validation loss (the best marked), the sample grid (prompts x steps), the strength sweep (prompts x
LoRA strength), the trainer's RAM and GPU, and a browser notification when a run ends."""

from __future__ import annotations

import time

import gradio as gr

from lora_gui.ui.grid import sample_grid
from lora_gui.ui.runview import RunView
from lora_gui.worker.resources import resources_markdown

CHECKPOINT_COLUMNS = ["step", "file", "validation loss", "note"]
RESOURCES_EVERY_S = 2.0  # NVML and psutil are asked at most this often per page
PARTS = ("checkpoints", "grid", "sweep", "resources")

# A browser notification when the run shown goes from an active state to an ended one (not when a
# page opens on a run that has already ended). Permission is asked when Start is clicked (browsers
# ask only from a user's gesture). Reads the status line once a second: no observer on the page.
NOTIFY_JS = """
() => {
  if (window.__loraNotify) return;
  window.__loraNotify = true;
  const ended = /^(Finished|Stopped|Failed)/, active = /^(Starting|Training|Stopping)/;
  let last = '';
  document.addEventListener('click', (e) => {
    if (e.target.closest && e.target.closest('#run-start') && window.Notification
        && Notification.permission === 'default') { Notification.requestPermission(); }
  }, true);
  setInterval(() => {
    // the state word is the status line's bold text (the line may also hold a progress timer)
    const word = (document.querySelector('#run-status strong')?.innerText || '').trim();
    if (word !== last && ended.test(word) && active.test(last) && window.Notification
        && Notification.permission === 'granted') {
      const line = (document.querySelector('#run-status .prose')
                    || document.querySelector('#run-status'))?.innerText.trim() || word;
      new Notification('lora-gui: ' + word.split(/\s/)[0].toLowerCase() + ' run',
                       {body: line, tag: 'lora-gui-run'});
    }
    last = word;
  }, 1000);
}
"""


def build_cockpit(ctx) -> None:
    comp = ctx.components
    comp["resources"] = gr.Markdown("", elem_id="run-resources")
    comp["checkpoints"] = gr.Dataframe(headers=CHECKPOINT_COLUMNS, interactive=False, visible=False,
                                       label="Checkpoints (★ = lowest validation loss)",
                                       elem_id="run-checkpoints", max_height=220)
    comp["grid"] = gr.Image(label="Sample grid: prompts (rows) × steps", type="pil", visible=False,
                            interactive=False, elem_id="run-grid", buttons=["download", "fullscreen"])
    comp["sweep"] = gr.Image(label="Strength sweep: prompts (rows) × LoRA strength", type="pil",
                             visible=False, interactive=False, elem_id="run-sweep",
                             buttons=["download", "fullscreen"])


def cockpit_outputs(ctx) -> list:
    return [ctx.components[k] for k in PARTS]


def draw_cockpit(ctx, view: RunView, force: bool = False) -> dict:
    """Updates for the cockpit parts that changed (all of them when ``force``)."""
    comp, out = ctx.components, {}
    if force or view.changed("checkpoints"):
        rows = view.checkpoint_rows()
        out[comp["checkpoints"]] = gr.update(value=rows or None, visible=bool(rows))
        view.mark_drawn("checkpoints")
    for part, sweep in (("grid", False), ("sweep", True)):
        if force or view.changed(part):
            image = sample_grid(view.sample_events, sweep=sweep)
            out[comp[part]] = gr.update(value=image, visible=image is not None)
            view.mark_drawn(part)
    now = time.monotonic()
    if view.active and now - view.resources_at >= RESOURCES_EVERY_S:
        view.resources_at = now
        text = resources_markdown(ctx.runs.trainer_pid(view.run_id))
        if text != view.resources:
            view.resources = text
            out[comp["resources"]] = f"<small>{text}</small>" if text else ""
    elif force or (not view.active and view.resources):
        view.resources = ""
        out[comp["resources"]] = ""
    return out


def wire_notifications(ctx) -> None:
    ctx.blocks.load(None, js=NOTIFY_JS)
