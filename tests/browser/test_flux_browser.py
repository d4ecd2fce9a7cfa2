"""The Flux demo from the page (issue 14's browser acceptance), in Debian's chromium against a real
server and the real engine: choose the Flux demo preset, Start (the tiny Flux demo is built on first
use), see loss points and a sample image, Stop, and download the LoRA, a kohya-format Flux file.
Screenshots go to test-artifacts/ (flux-*.png). Every process started here is reaped (the module's
own server fixture from test_gui_browser: its trainers are killed at the end).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import test_gui_browser as gui
from test_gui_browser import (
    ARTIFACTS,
    choose,
    field,
    no_error_toasts,
    open_tab,
    set_field,
    step_of,
    wait_text,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
server = gui.server  # this module's own GUI server (own folders), reaped at the end
page = gui.page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"flux-{name}.png"), full_page=True)


def loss_points(page) -> int:
    """How many points the run chart's lines draw (gradio draws Vega charts as SVG: one M/L per point)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('#run-plot svg .mark-line path'))
        .map((p) => ((p.getAttribute('d') || '').match(/[ML]/g) || []).length).reduce((a, b) => a + b, 0)""")


def safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def point_at_the_flux_demo(page) -> None:
    """The Flux demo preset over the form; the skip-listed folders pointed at the Flux demo."""
    choose(page, "preset", "demo-tiny-flux-cpu")
    open_tab(page, "model", "Model and folders")
    gui.wait_value(page, "model", "family", "flux")
    set_field(page, "model", "base_model", "demo-flux/model")
    set_field(page, "model", "img_folder", "demo-flux/dataset")
    set_field(page, "model", "output_folder", "outputs/browser-flux")
    page.wait_for_selector("#field-model-t5xxl", state="visible", timeout=10_000)  # Flux only
    page.wait_for_selector("#field-model-v2", state="hidden", timeout=10_000)  # SD only
    # the note under the title says which preset the form shows now
    page.wait_for_function("document.querySelector('#startup-note').innerText.includes(\"'demo-tiny-flux-cpu'\")",
                           timeout=10_000)
    open_tab(page, "images", "Image processing")
    set_field(page, "images", "max_steps", 100_000)  # runs until Stop
    open_tab(page, "samples", "Samples")
    set_field(page, "samples", "sample_every_n_steps", 25)
    set_field(page, "samples", "sample_every_n_epochs", 0)
    open_tab(page, "advanced", "Advanced")
    assert field(page, "advanced", "t5xxl_max_token_length").input_value() == "32"  # the preset's
    page.wait_for_selector("#field-advanced-noise_offset", state="hidden", timeout=10_000)  # SD and SDXL only
    shot(page, "01-preset")


def test_the_flux_demo_trains_samples_stops_and_downloads(page, server, tmp_path):
    point_at_the_flux_demo(page)
    page.locator("#run-start").click()
    wait_text(page, "#run-status", "Starting|Training", 60)
    wait_text(page, "#run-progress", r"Step \d+ / 100000", 240)
    page.wait_for_selector("#run-plot", state="visible", timeout=60_000)
    deadline = time.monotonic() + 60
    while loss_points(page) == 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert loss_points(page) > 0, "no loss point drawn"
    sample = page.locator("#run-gallery img").first
    sample.wait_for(timeout=120_000)  # a FluxPipeline sample
    assert page.evaluate("(img) => img.naturalWidth", sample.element_handle()) > 0
    shot(page, "02-training")
    assert "Training" in page.locator("#run-status").inner_text()
    at_stop = step_of(page)

    page.locator("#run-stop").click()
    wait_text(page, "#run-status", "Stopping|Stopped", 30)
    result = wait_text(page, "#run-result", r"LoRA ready[\s\S]*browser-flux", 120)
    assert "stopped early" in result and "Stopped" in page.locator("#run-status").inner_text()
    stopped_at = int(re.search(r"at step (\d+)", result).group(1))
    assert 0 < at_stop <= stopped_at < 100_000
    shot(page, "03-stopped")

    listed = re.search(r"(\S+\.safetensors)", result).group(1)
    on_disk = Path(listed) if Path(listed).is_absolute() else server["cwd"] / listed
    button = page.locator("#run-download")
    button.wait_for(state="visible")
    with page.expect_download(timeout=30_000) as download:
        button.click()
    got = tmp_path / download.value.suggested_filename
    download.value.save_as(got)
    assert got.name == on_disk.name and re.fullmatch(rf"demo-flux-lora-step{stopped_at:06d}\.safetensors", got.name)
    assert got.read_bytes() == on_disk.read_bytes()
    header = safetensors_header(got)
    meta = header["__metadata__"]
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert int(meta["ss_steps"]) == stopped_at
    keys = [k for k in header if k != "__metadata__"]
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys), keys[:10]
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys), keys[:10]
    assert not any(k.startswith("lora_te") for k in keys)  # the transformer only
    no_error_toasts(page)
    choose(page, "preset", "demo-tiny-cpu")  # back to the SD demo for any later test in the session
