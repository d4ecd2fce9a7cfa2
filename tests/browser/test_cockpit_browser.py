"""The run cockpit in Debian's chromium at 1280 px against a real server and the real engine on
the demo (issue 11, items 11-13): every tab visible without the overflow menu; the validation
series shows live; Save now, Sample now, Force stop and a past run picked in the runs table; every
checkpoint with its validation loss and the best marked; the sample grid and the strength sweep;
the trainer's RAM; two runs compared; a browser notification when a run ends. Screenshots go to
test-artifacts/ (cockpit-*.png). Every process started here is reaped (the module's server fixture).
"""

from __future__ import annotations

import re
import time

import pytest
import test_gui_browser as gui
from test_gui_browser import (
    ARTIFACTS,
    CHROMIUM,
    FLAGS,
    TABS,
    box,
    no_error_toasts,
    open_tab,
    set_field,
    sync_api,
    wait_text,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
server = gui.server  # the module's own GUI server (its own folders), reaped at the end

# Records the page's notifications (headless chromium shows none) and grants the permission.
FAKE_NOTIFICATION = """
window.__notes = [];
window.Notification = class {
  constructor(title, options) { window.__notes.push([title, (options || {}).body || '']); }
  static get permission() { return 'granted'; }
  static requestPermission() { return Promise.resolve('granted'); }
};
"""


@pytest.fixture
def page(server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(30_000)
        context.add_init_script(FAKE_NOTIFICATION)
        pg = context.new_page()
        pg.goto(server["url"])
        pg.wait_for_selector("#run-start")
        pg.wait_for_function("() => document.querySelector('#run-status')?.innerText.length > 0")
        try:
            yield pg
        finally:
            context.close()


def run_ids(server) -> list[str]:
    """The run folders' names, oldest first (the runs folder also holds the warm trainer's log)."""
    return sorted(p.parent.name for p in (server["cwd"] / "runs").glob("*/status.json"))


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"cockpit-{name}.png"), full_page=True)


def legend(page, elem_id: str) -> str:
    """The chart's legend labels (gradio draws Vega charts as SVG)."""
    return page.evaluate("(id) => Array.from(document.querySelectorAll("
                         "`#${id} svg .role-legend-label text`)).map((t) => t.textContent).join(' | ')",
                         elem_id)


def validation_drawn(page) -> int:
    """How many validation points the run chart draws: the line of the validation colour."""
    return page.evaluate("""() => {
      const paths = Array.from(document.querySelectorAll('#run-plot svg .mark-line path'));
      const counts = paths.filter((p) => (p.getAttribute('stroke') || '').toLowerCase() === '#e6550d')
        .map((p) => ((p.getAttribute('d') || '').match(/[ML]/g) || []).length);
      return Math.max(0, ...counts); }""")


def wait_legend(page, elem_id: str, pattern: str, timeout: float) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = legend(page, elem_id)
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"#{elem_id} never showed {pattern!r}; its text: {text!r}")


def wait_log(page, pattern: str, timeout: float) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = page.locator("#run-log textarea").input_value()
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"the log never showed {pattern!r}; its last lines: {text[-500:]!r}")


def test_every_tab_is_visible_at_1280px(page):
    for group, _ in TABS:
        assert page.locator(f"#tab-{group}-button").is_visible(), group
    more = page.get_by_role("button", name="More tabs")
    assert more.count() == 0 or not more.first.is_visible()
    shot(page, "01-tabs-1280")


def configure(page, output: str, max_steps: int, *extra: tuple[str, str, object]) -> None:
    open_tab(page, "model", "Model and folders")
    set_field(page, "model", "img_folder", "demo/dataset")
    set_field(page, "model", "output_folder", output)
    open_tab(page, "images", "Image processing")
    set_field(page, "images", "max_steps", max_steps)
    for group, name, value in extra:
        open_tab(page, group, dict(TABS)[group])
        set_field(page, group, name, value)


def test_a_run_in_the_cockpit_then_force_stop_past_run_and_compare(page, server):
    configure(page, "outputs/cockpit", 80, ("images", "save_every_n_epochs", 1),
              ("images", "keep_best_checkpoints", 1), ("samples", "sample_every_n_steps", 20),
              ("samples", "sample_every_n_epochs", 0), ("samples", "strength_sweep", "0.5, 1"))
    page.locator("#run-start").click()
    wait_text(page, "#run-status", "Training", 240)
    # the validation series appears live (the demo validates every 10 steps), no reload
    wait_legend(page, "run-plot", r"validation", 180)
    assert "smoothed" in legend(page, "run-plot")
    deadline = time.monotonic() + 120
    while validation_drawn(page) < 2 and time.monotonic() < deadline:  # steps 10 and 20
        time.sleep(0.5)
    assert validation_drawn(page) >= 2, "the validation line is not drawn live"
    wait_text(page, "#run-resources", r"Trainer RAM: \d+\.\d\d GiB", 30)
    shot(page, "02-validation-live")
    page.locator("#run-save-now").click()
    wait_log(page, r"Saved \S+-step\d{6}\.safetensors", 120)
    page.locator("#run-sample-now").click()
    wait_log(page, r"Making 2 sample images at step [1-9]", 120)
    shot(page, "03-save-and-sample-now")
    wait_text(page, "#run-result", "LoRA ready", 400)
    checkpoints = wait_text(page, "#run-checkpoints", "final", 30)
    assert "★ best" in checkpoints and re.search(r"\d\.\d{4}", checkpoints), checkpoints
    assert "deleted (keep_best_checkpoints)" in checkpoints  # keep_best_checkpoints = 1 of 2 intermediate saves (3 epochs)
    page.wait_for_selector("#run-grid img")
    page.wait_for_selector("#run-sweep img")
    wait_log(page, r"Making 2 sample images at step 80 at strength 0\.5", 10)
    page.wait_for_function("() => window.__notes.length === 1", timeout=10_000)
    title, body = page.evaluate("() => window.__notes[0]")
    assert title == "lora-gui: finished run" and body.startswith("Finished"), (title, body)
    shot(page, "04-finished-checkpoints-grid-sweep")
    first_run = run_ids(server)[-1]

    force_stop_a_second_run(page)
    pick_the_past_run(page, first_run)
    compare_the_two_runs(page, server)
    no_error_toasts(page)


def force_stop_a_second_run(page) -> None:
    configure(page, "outputs/cockpit2", 400, ("training", "learning_rate", 0.002),
              ("samples", "strength_sweep", ""))
    page.locator("#run-start").click()
    wait_text(page, "#run-progress", r"Step \d+ / 400", 240)
    page.locator("#run-force-stop").click()
    wait_text(page, "#run-status", "Stopping|Stopped", 20)
    wait_text(page, "#run-status", r"Stopped|Failed", 60)
    page.wait_for_function("() => window.__notes.length === 2", timeout=10_000)
    shot(page, "05-force-stopped")


def pick_the_past_run(page, run_id: str) -> None:
    open_tab(page, "runs", "Presets and runs")
    page.locator("#runs-refresh").click()
    wait_text(page, "#runs-table", "stopped|failed")
    page.locator("#runs-table .body-cell", has_text=run_id).first.click()
    wait_text(page, "#run-status", rf"Finished\s+{re.escape(run_id)}", 30)
    wait_text(page, "#run-checkpoints", "★ best", 30)
    page.wait_for_selector("#run-sweep img")
    shot(page, "06-past-run")


def compare_the_two_runs(page, server) -> None:
    runs = run_ids(server)[-2:]
    open_tab(page, "runs", "Presets and runs")
    page.locator("#runs-refresh").click()
    for run_id in runs:
        page.locator("#compare-runs input").click()
        page.get_by_role("option", name=run_id, exact=True).click()
    page.locator("#compare-go").click()
    text = wait_legend(page, "compare-plot", "#2 loss", 60)
    assert {"#1 loss", "#1 validation", "#2 loss"} <= set(text.split(" | ")), text
    diff = wait_text(page, "#compare-diff", "differ", 30)
    assert f"#1 {runs[0]}" in diff and f"#2 {runs[1]}" in diff
    assert "training.learning_rate" in diff and "images.max_steps" in diff
    assert "samples.strength_sweep" in diff and "0.5, 1" in diff
    box(page, "compare-runs").press("Escape")
    shot(page, "07-compare")
