"""The GUI in Debian's chromium (Playwright) against a real server and the real engine on the demo.

One server (a subprocess, its own working folder, runs folder and data folder) serves the module;
every test gets a fresh browser profile. Screenshots of each stage go to test-artifacts/. Every
process started here (server, trainers) is reaped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reap_trainers(runs: Path) -> None:
    """End every trainer a test left running (they lead their own process group)."""
    for status in runs.glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("pid")
        except (OSError, ValueError):
            continue
        if not pid:
            continue
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    for record in runs.glob("*/process.json"):
        try:
            pid = json.loads(record.read_text()).get("pid")
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, TypeError, ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("gui")
    (cwd / "mydata" / "10_cat").mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, "LORA_GUI_HOME": str(cwd / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("LORA_GUI_AUTH", None)
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--preset",
                             "demo-tiny-cpu", "--runs-dir", "runs"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (cwd / "server.log").read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the GUI did not answer in 90 s"
                time.sleep(0.3)
        yield {"url": url, "cwd": cwd, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        _reap_trainers(cwd / "runs")


@pytest.fixture
def page(server, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1500, "height": 1000})
        context.set_default_timeout(30_000)
        pg = context.new_page()
        pg.goto(server["url"])
        pg.wait_for_selector("#run-start")
        pg.wait_for_function("() => document.querySelector('#run-status')?.innerText.length > 0")
        try:
            yield pg
        finally:
            context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, group: str, title: str) -> None:
    """Tabs render their fields only when selected; some sit in the overflow menu."""
    button = page.locator(f"#tab-{group}-button")
    if button.count() and button.is_visible():
        button.click()
    else:
        page.get_by_role("button", name="More tabs").click()
        page.locator(".overflow-dropdown button", has_text=title).click()
    page.wait_for_selector(f"#tab-{group}", state="visible")


def tab_labels(page) -> list[str]:
    """Every tab's label (also those in the overflow menu), from gradio's hidden measuring row."""
    return page.locator("#settings-tabs .visually-hidden button").all_inner_texts()


def box(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def field(page, group: str, name: str):
    return box(page, f"field-{group}-{name}")


def set_field(page, group: str, name: str, value) -> None:
    box = field(page, group, name)
    box.fill(str(value))
    box.blur()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def upload(page, elem_id: str, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.locator(f"#{elem_id}").click()
    chooser.value.set_files(str(path))


def wait_text(page, selector: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"{selector} never matched {pattern!r}; last text: {text!r}")


def stays(condition, seconds: float, what: str) -> None:
    """``condition()`` holds throughout ``seconds`` (checked every 0.1 s); fails at the first miss."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.1)


def close_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        if button.is_visible():
            button.click()
    page.wait_for_function("() => document.querySelectorAll('.toast-body').length === 0")


def run_folders(server) -> list[str]:
    runs = server["cwd"] / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def no_error_toasts(page) -> None:
    errors = page.locator(".toast-body.error")
    assert errors.count() == 0, errors.all_inner_texts()


def step_of(page) -> int:
    match = re.search(r"Step (\d+) / \d+", page.locator("#run-progress").inner_text())
    return int(match.group(1)) if match else -1


# --- tests ---------------------------------------------------------------------------------------

TABS = [("model", "Model and folders"), ("triggers", "Trigger words"), ("images", "Image processing"),
        ("training", "Training"), ("labels", "Labels"), ("advanced", "Advanced"),
        ("samples", "Samples"), ("runs", "Presets and runs")]


def test_every_tab_and_validation(page, server):
    for group, title in TABS:
        open_tab(page, group, title)
        page.wait_for_selector(f"#tab-{group} [id^='field-{group}-']")  # its fields render
        shot(page, f"01-tab-{group}")
    open_tab(page, "training", "Training")
    set_field(page, "training", "learning_rate", -1)
    open_tab(page, "samples", "Samples")
    set_field(page, "samples", "sample_width", 100)
    page.locator("#run-validate").click()
    summary = wait_text(page, "#validation-summary", "invalid")
    assert "Training › Learning rate: must be at least 0" in summary
    assert "Samples › Sample width: must be a multiple of 8" in summary
    assert "Training (1 error)" in tab_labels(page) and "Samples (1 error)" in tab_labels(page)
    wait_text(page, "#field-samples-sample_width", "must be a multiple of 8")  # under the field
    shot(page, "02-validation")
    # Start refuses: the click is answered (the summary's toast, the red message under the field),
    # no run starts, and nothing typed is lost
    close_toasts(page)
    before = run_folders(server)
    page.locator("#run-start").click()
    page.locator(".toast-body", has_text="2 invalid settings").wait_for()
    wait_text(page, "#field-samples-sample_width", "must be a multiple of 8")
    stays(lambda: "Idle" in page.locator("#run-status").inner_text()
          and run_folders(server) == before, 2.0, "Start ran with invalid settings")
    assert field(page, "samples", "sample_width").input_value() == "100"
    set_field(page, "samples", "sample_width", 64)
    open_tab(page, "training", "Training")
    assert field(page, "training", "learning_rate").input_value() == "-1"
    set_field(page, "training", "learning_rate", 0.001)
    page.locator("#run-validate").click()
    page.wait_for_selector("#validation-summary", state="hidden")
    assert "Training" in tab_labels(page) and not any("error" in t for t in tab_labels(page))
    no_error_toasts(page)


def wait_value(page, group: str, name: str, value: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#field-{group}-{name} input').value "
                           f"=== {json.dumps(value)}")


def test_presets_save_load_and_browser(page, server):
    choose_presets(page)
    save_browse_and_load_back(page, server)
    import_kohya_file(page)
    upload_zip_dataset(page, server)
    no_error_toasts(page)
    choose(page, "preset", "demo-tiny-cpu")  # back to the demo for the next tests


def choose_presets(page) -> None:
    """A preset loads over the form; a skip-listed field keeps the form's value."""
    open_tab(page, "training", "Training")
    assert field(page, "training", "network_dim").input_value() == "4"
    choose(page, "preset", "sd15-style")
    wait_value(page, "training", "network_dim", "32")
    open_tab(page, "model", "Model and folders")
    assert field(page, "model", "base_model").input_value() == "demo/model"  # skip-listed: kept
    shot(page, "03-preset")
    choose(page, "preset", "demo-tiny-cpu")
    open_tab(page, "training", "Training")
    wait_value(page, "training", "network_dim", "4")


def save_browse_and_load_back(page, server) -> None:
    """Save, change, load back: the saved value returns, a skip-listed path keeps the form's value
    (filled in with the server-side browser)."""
    open_tab(page, "runs", "Presets and runs")
    box(page, "save-path").fill("saved/settings.json")
    page.locator("#save-settings").click()
    wait_text(page, "#files-report", "Saved")
    saved = server["cwd"] / "saved" / "settings.json"
    assert json.loads(saved.read_text())["training"]["network_dim"] == 4
    page.wait_for_selector("#save-download", state="visible")
    open_tab(page, "training", "Training")
    set_field(page, "training", "network_dim", 12)
    open_tab(page, "model", "Model and folders")
    page.locator("#browse-model-img_folder").click()
    page.wait_for_selector("#browser", state="visible")
    box(page, "browser-folder").fill(str(server["cwd"]))
    box(page, "browser-folder").press("Enter")
    choose(page, "browser-entries", "📁 mydata")
    wait_text(page, "#browser-selected", "mydata")
    shot(page, "04-browser")
    page.locator("#browser-use").click()
    page.wait_for_selector("#browser", state="hidden")
    assert field(page, "model", "img_folder").input_value() == "mydata"
    open_tab(page, "runs", "Presets and runs")
    set_field(page, "runs", "load_json_path", "saved/settings.json")
    page.locator("#load-settings").click()
    wait_text(page, "#files-report", "Loaded")
    open_tab(page, "training", "Training")
    wait_value(page, "training", "network_dim", "4")
    open_tab(page, "model", "Model and folders")
    assert field(page, "model", "img_folder").input_value() == "mydata"  # skip-listed: kept
    shot(page, "05-loaded")


def import_kohya_file(page) -> None:
    """A kohya_ss file is imported with a report of mapped and ignored keys."""
    open_tab(page, "runs", "Presets and runs")
    upload(page, "load-upload", ROOT / "tests" / "fixtures" / "kohya_ss_config.json")
    report = wait_text(page, "#files-report", "Imported")
    assert "Mapped:" in report and "Ignored:" in report and "max_resolution" in report
    shot(page, "05b-imported")


def upload_zip_dataset(page, server) -> None:
    """A zip of images + captions becomes a new dataset folder and is previewed."""
    png = server["cwd"] / "red.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(png)
    archive = server["cwd"] / "cats.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(png, "cats/4_cat/a.png")
        z.writestr("cats/4_cat/a.txt", "cat, red")
    open_tab(page, "model", "Model and folders")
    upload(page, "zip-upload", archive)
    preview = wait_text(page, "#preview-md", "4_cat")
    assert re.search(r"4_cat\s+train\s+4\s+1\s+1\s+0", preview) and "steps per epoch" in preview
    assert field(page, "model", "img_folder").input_value() == "data/datasets/cats"
    page.wait_for_selector("#preview-gallery img")
    shot(page, "05c-dataset-preview")


def test_run_end_to_end_with_reload_and_stop(page, server):
    """Start the demo (built on first use), see loss points and a sample, reload mid-run, stop,
    and get a LoRA that exists on disk."""
    open_tab(page, "model", "Model and folders")
    set_field(page, "model", "img_folder", "demo/dataset")
    set_field(page, "model", "output_folder", "outputs/browser")
    open_tab(page, "images", "Image processing")
    set_field(page, "images", "max_steps", 400)
    open_tab(page, "samples", "Samples")
    set_field(page, "samples", "sample_every_n_steps", 2)
    set_field(page, "samples", "sample_every_n_epochs", 0)
    page.locator("#run-start").click()
    wait_text(page, "#run-status", "Starting|Training", 30)
    shot(page, "06-starting")
    wait_text(page, "#run-progress", r"Step \d+ / 400", 240)
    page.wait_for_selector("#run-plot", state="visible", timeout=60_000)
    page.wait_for_selector("#run-gallery img", timeout=90_000)  # a sample image
    shot(page, "07-running")
    before = step_of(page)

    page.reload()
    page.wait_for_selector("#run-start")
    wait_text(page, "#run-status", "Training", 30)
    page.wait_for_selector("#run-plot", state="visible")  # the history is redrawn
    deadline = time.monotonic() + 60
    while step_of(page) <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert step_of(page) > before, "progress did not continue after the reload"
    page.wait_for_selector("#run-gallery img")  # the samples are redrawn too
    shot(page, "08-reloaded")

    page.locator("#run-stop").click()
    wait_text(page, "#run-status", "Stopping|Stopped", 20)
    result = wait_text(page, "#run-result", "LoRA ready", 120)
    shot(page, "09-result")
    path = re.search(r"(\S+\.safetensors)", result).group(1)
    lora = Path(path) if Path(path).is_absolute() else server["cwd"] / path
    assert lora.is_file() and lora.stat().st_size > 0
    page.wait_for_selector("#run-download", state="visible")
    assert "Stopped" in page.locator("#run-status").inner_text()

    open_tab(page, "runs", "Presets and runs")
    page.locator("#runs-refresh").click()
    wait_text(page, "#runs-table", "stopped")
    shot(page, "10-runs")
    no_error_toasts(page)


def test_api_drives_a_short_run(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    doc = json.loads((ROOT / "presets" / "demo-tiny-cpu.json").read_text())
    doc["images"]["max_steps"] = 3
    doc["model"]["output_folder"] = "outputs/api"
    doc["samples"]["sample_every_n_epochs"] = 0
    run_id = client.predict(json.dumps(doc), api_name="/start_run")
    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline:
        status = json.loads(client.predict(run_id, api_name="/run_status"))
        if status["state"] in ("finished", "stopped", "failed"):
            break
        time.sleep(1)
    assert status["state"] == "finished", status
    assert [s for s, _ in status["losses"]] == [1, 2, 3]
    assert (server["cwd"] / status["output_path"]).is_file()


def test_the_sdxl_demo_trains_from_the_page(page, server):
    """The SDXL demo preset, pointed at the SDXL demo (built on first use): the SD-only fields hide,
    a short run ends with an SDXL LoRA on disk."""
    choose(page, "preset", "demo-tiny-sdxl-cpu")
    open_tab(page, "model", "Model and folders")
    wait_value(page, "model", "family", "sdxl")
    set_field(page, "model", "base_model", "demo-sdxl/model")
    set_field(page, "model", "img_folder", "demo-sdxl/dataset")
    set_field(page, "model", "output_folder", "outputs/browser-sdxl")
    page.wait_for_selector("#field-model-v2", state="hidden", timeout=10_000)  # SD only
    open_tab(page, "images", "Image processing")
    set_field(page, "images", "max_steps", 4)
    open_tab(page, "samples", "Samples")
    set_field(page, "samples", "sample_every_n_epochs", 0)
    page.locator("#run-start").click()
    wait_text(page, "#run-status", "Starting|Training", 60)  # this run, not an earlier run's result
    result = wait_text(page, "#run-result", r"LoRA ready[\s\S]*browser-sdxl", 300)
    shot(page, "12-sdxl-result")
    path = re.search(r"(\S+\.safetensors)", result).group(1)
    lora = Path(path) if Path(path).is_absolute() else server["cwd"] / path
    header = json.loads(lora.read_bytes()[8:8 + int.from_bytes(lora.read_bytes()[:8], "little")])
    assert header["__metadata__"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_te2_") for k in header) and any(k.startswith("lora_unet_input_blocks_") for k in header)
    choose(page, "preset", "demo-tiny-cpu")  # back to the SD demo for any later test
    no_error_toasts(page)
