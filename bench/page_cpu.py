"""The page's own CPU while it polls a training run, and tabs at 1280 px (issue 11, item 13).

The real GUI server (``app.py`` of ``--root``, default this tree) with the simulated engine
(``tests/support/simulated_engine.py``: 20 loss points a second, no torch, so the trainer does not
compete for the CPU), a run started through the API, then Debian's chromium (1280 x 900) opens the
page, which attaches to the run and polls it. Reported: chromium's CPU (all its processes, % of one
core) and the GUI server's over a window, the number of chart redraws in that window (Vega views
re-run), and whether every settings tab shows without the overflow menu.

    python -m bench.page_cpu                       # this tree
    python -m bench.page_cpu --root /tmp/before    # e.g. ``git archive main | tar -x -C /tmp/before``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import common
from bench.gui import FLAGS, _cpu_percent, _free_port

SUPPORT = common.ROOT / "tests" / "support"


def _serve(root: Path, cwd: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = common.child_env(LORA_GUI_HOME=str(cwd / "data"),
                           LORA_GUI_WORKER_ENGINE="simulated_engine:run_training",
                           LORA_GUI_SIMULATE_STEP_S="0.05")
    env["PYTHONPATH"] = f"{root}:{SUPPORT}"
    env.pop("LORA_GUI_AUTH", None)
    proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--port", str(port), "--preset",
                             "demo-tiny-cpu", "--runs-dir", "runs"], cwd=cwd, env=env,
                            stdout=open(cwd / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError((cwd / "server.log").read_text()[-800:])
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the GUI did not answer in 120 s") from None
            time.sleep(0.3)


def _start_run(url: str, cwd: Path, steps: int) -> str:
    from gradio_client import Client

    (cwd / "images").mkdir(exist_ok=True)
    (cwd / "model").mkdir(exist_ok=True)
    doc = json.loads((common.ROOT / "presets" / "demo-tiny-cpu.json").read_text())
    doc["model"].update(base_model=str(cwd / "model"), img_folder=str(cwd / "images"),
                        output_folder=str(cwd / "out"))
    doc["images"]["max_steps"] = steps
    return Client(url, verbose=False).predict(json.dumps(doc), api_name="/start_run")


COUNT_REDRAWS = """() => {
  window.__redraws = 0;
  new MutationObserver((ms) => { for (const m of ms) if (m.target.closest && m.target.closest('#run-plot'))
    { window.__redraws++; return; } }).observe(document.querySelector('#run-plot') || document.body,
    {subtree: true, childList: true, attributes: false});
}"""


def measure(root: Path, window_s: float = 10.0) -> dict:
    from playwright.sync_api import sync_playwright

    cwd = Path(tempfile.mkdtemp(prefix="page-cpu-"))
    proc, url = _serve(root, cwd)
    try:
        _start_run(url, cwd, steps=4000)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#run-plot", state="visible", timeout=60_000)
            tabs_menu = page.get_by_role("button", name="More tabs")
            overflow = tabs_menu.count() > 0 and tabs_menu.first.is_visible()
            time.sleep(3)
            page.evaluate(COUNT_REDRAWS)
            cpu = _cpu_percent(proc.pid, window_s)
            redraws = page.evaluate("() => window.__redraws")
            step = page.locator("#run-progress").inner_text()
            browser.close()
        return {"chromium_cpu": cpu["chromium"], "server_cpu": cpu["server"],
                "plot_mutations_per_s": redraws / window_s, "tabs_overflow_menu": overflow,
                "progress_shown": step}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for status in (cwd / "runs").glob("*/process.json"):
            try:
                import os
                import signal

                os.killpg(json.loads(status.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError, ProcessLookupError):
                pass
        shutil.rmtree(cwd, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.page_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(common.ROOT), help="the lora-gui tree whose app.py to serve")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured")
    args = parser.parse_args(argv)
    common.setup()
    result = measure(Path(args.root).resolve(), args.window)
    print(json.dumps(result, indent=1))
    print(common.markdown_table(("page polling a run (1280 px)", "value"), [
        ("chromium CPU (% of a core)", result["chromium_cpu"]),
        ("GUI server CPU (% of a core)", result["server_cpu"]),
        ("chart DOM mutations per s", result["plot_mutations_per_s"]),
        ("settings tabs in an overflow menu", "yes" if result["tabs_overflow_menu"] else "no")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
