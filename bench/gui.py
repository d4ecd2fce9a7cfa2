"""The GUI parts of 3 (start-up) and 4 (streaming): the real GUI server (``app.py``) and the real
worker/engine on the demo preset, driven by Playwright with Debian's chromium
(``executable_path=shutil.which("chromium")``; never ``playwright install``).

One session measures everything (the results are kept per work folder, so 3 and 4 share it):

* Start -> first loss point: seconds from clicking Start to the loss chart showing its first point
  (recorded in the page by ``requestAnimationFrame``/``MutationObserver`` with ``Date.now()``),
  after a first run that builds the demo and warms the caches; broken down with the run's
  ``events.jsonl``, tailed every 2 ms by this process: click -> the trainer's first event -> the
  first loss event written -> the point in the page.
* streaming latency: for each "Step N" the page shows, the time since the trainer wrote the
  Progress event of step N (same machine, same wall clock).
* CPU (% of one core, over a window) of the GUI server and of chromium (all its processes) with the
  page open and idle, and with the page polling a running run (the trainer's CPU not included).
* the GUI server's RSS (now and peak) and whether it has loaded torch (its memory maps).

The machine is shared, so each timed Start also reports two load-independent figures: the CPU
seconds the trainer spent between the click and its first loss event (the warm trainer's CPU
times before and after), and the contention of the moment: the wall time over the CPU time of a
fixed single-threaded busy loop run just before the click (1.0 on an idle core; 4 means a runnable
thread got a quarter of a core). Start -> first point divided by it estimates the idle figure.

Run alone: ``python -m bench.gui``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import common

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
REPEATS = int(os.environ.get("BENCH_GUI_REPEATS", "2"))
CPU_WINDOW_S = float(os.environ.get("BENCH_GUI_CPU_S", "5"))
_RESULTS: dict[str, dict] = {}
GUI_PHASES = ("click -> trainer process running", "-> engine imported (Log 'Loading the base model')",
              "-> set-up done (Started: model, latents, LoRA, text cache)",
              "-> first loss event written", "-> point in the page")


def unavailable() -> str | None:
    """Why the GUI cannot be driven here, or None."""
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed"
    try:
        import playwright.sync_api  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    if not (common.ROOT / "app.py").is_file():
        return "app.py is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python app.py`` in its own folder; ends its trainers (by their recorded pids) on exit."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        cwd.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runs = cwd / "runs"

    def __enter__(self) -> Server:
        env = common.child_env(LORA_GUI_HOME=str(self.cwd / "data"))
        env.pop("LORA_GUI_AUTH", None)
        self.log = open(self.cwd / "server.log", "w")
        self.t_launch = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, str(common.ROOT / "app.py"), "--port", str(self.port), "--preset",
             "demo-tiny-cpu", "--runs-dir", "runs"], cwd=self.cwd, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the GUI server exited: "
                                   + (self.cwd / "server.log").read_text()[-500:])
            try:
                urllib.request.urlopen(self.url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the GUI did not answer in 120 s") from None
                time.sleep(0.2)
        self.t_ready = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        for record in list(self.runs.glob("*/process.json")) + list(self.runs.glob("*/status.json")):
            try:
                pid = json.loads(record.read_text()).get("pid")
                if pid and os.getpgid(pid) == pid:  # a trainer leads its own process group
                    os.killpg(pid, 9)
            except (OSError, ValueError, TypeError, ProcessLookupError, PermissionError):
                pass


class Tail(threading.Thread):
    """Timestamps every line of the newest run's events.jsonl as it is written (2 ms polls)."""

    def __init__(self, runs: Path) -> None:
        super().__init__(daemon=True)
        self.runs, self.known = runs, set(runs.glob("*")) if runs.exists() else set()
        self.lines: list[tuple[float, dict]] = []
        self.run_dir: Path | None = None
        self.pid: int | None = None  # the trainer whose CPU time is read at the first loss event
        self.on_loss = None
        self.loss_cpu: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        offset, buffer = 0, b""
        while not self.halt.is_set():
            if self.run_dir is None:
                new = [p for p in self.runs.glob("*") if p.is_dir() and p not in self.known] \
                    if self.runs.exists() else []
                self.run_dir = new[0] if new else None
            if self.run_dir is not None:
                try:
                    with open(self.run_dir / "events.jsonl", "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read()
                except OSError:
                    chunk = b""
                if chunk:
                    now = time.time()
                    offset += len(chunk)
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    for line in complete:
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue
                        self.lines.append((now, event))
                        if event.get("kind") == "loss" and self.loss_cpu is None and self.on_loss:
                            self.loss_cpu = self.on_loss(self.pid)
            time.sleep(0.002)

    def first(self, pred) -> float | None:
        return next((t for t, e in list(self.lines) if pred(e)), None)


_OBSERVE = """() => {
  window.__bench = {progress: [], plot: null};
  const progress = document.querySelector('#run-progress');
  const seen = () => {
    const m = /Step\\s*(\\d+)\\s*\\/\\s*\\d+/.exec(progress ? progress.innerText : '');
    if (m) window.__bench.progress.push([Date.now(), parseInt(m[1])]);
  };
  if (progress) new MutationObserver(seen).observe(progress, {subtree: true, childList: true,
                                                              characterData: true});
  // The previous run's chart stays up until Start clears it: wait for it to be hidden first.
  let armed = false;
  const plot = () => {
    const el = document.querySelector('#run-plot');
    const shown = !!el && el.getClientRects().length > 0 && el.offsetHeight > 0;
    if (!shown) armed = true;
    else if (armed && el.querySelector('canvas, svg')) window.__bench.plot = Date.now();
    if (window.__bench.plot === null) requestAnimationFrame(plot);
  };
  requestAnimationFrame(plot);
}"""


def _chromium_processes(server_pid: int):
    import psutil

    me = psutil.Process()
    server = {server_pid} | {p.pid for p in psutil.Process(server_pid).children(recursive=True)}
    return [p for p in me.children(recursive=True)
            if p.pid not in server and "chrom" in (p.name() or "").lower()]


def _cpu_percent(server_pid: int, seconds: float) -> dict[str, float]:
    """% of one core used by the GUI server and by chromium over ``seconds``."""
    import psutil

    def times(procs):
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    server = [psutil.Process(server_pid)]
    browser = _chromium_processes(server_pid)
    s0, b0, t0 = times(server), times(browser), time.monotonic()
    time.sleep(seconds)
    s1, b1, dt = times(server), times(browser), time.monotonic() - t0
    return {"server": 100 * (s1 - s0) / dt, "chromium": 100 * (b1 - b0) / dt}


def _server_memory(pid: int) -> dict:
    import psutil

    proc = psutil.Process(pid)
    rss = proc.memory_info().rss / 2**20
    peak = float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        maps = " ".join(m.path for m in proc.memory_maps())
        torch_loaded = bool(re.search(r"libtorch|torch/_C", maps))
    except (psutil.Error, AttributeError):
        torch_loaded = None
    return {"rss_mb": rss, "peak_rss_mb": peak, "torch_loaded": torch_loaded}


def contention(cpu_s: float = 0.3) -> float:
    """Wall seconds over CPU seconds of a busy loop of ``cpu_s`` CPU seconds (1.0: an idle core)."""
    w0, c0 = time.perf_counter(), time.process_time()
    x = 0
    while time.process_time() - c0 < cpu_s:
        x += sum(range(1000))
    return (time.perf_counter() - w0) / max(time.process_time() - c0, 1e-9)


def _warm_pid(server: Server) -> int | None:
    """The pid of the warm trainer waiting now (its last ready line in the warm log)."""
    from lora_gui.worker.client import WARM_LOG
    from lora_gui.worker.warm import WARM_READY

    log = server.runs / WARM_LOG
    found = re.findall(re.escape(WARM_READY) + r" \(pid (\d+)\)",
                       log.read_text(errors="replace") if log.is_file() else "")
    return int(found[-1]) if found else None


def _cpu_s(pid: int | None) -> float | None:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except (psutil.Error, TypeError, ValueError):
        return None


def _wait_text(page, selector: str, pattern: str, timeout: float) -> str:
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise RuntimeError(f"{selector} never showed {pattern!r} (last: {text[:120]!r})")


def _one_run(page, server: Server, measure_streaming: bool) -> dict:
    """Click Start, wait for the first loss point; optionally measure streaming while it trains;
    then Stop and wait until the run has ended."""
    page.evaluate(_OBSERVE)
    tail = Tail(server.runs)
    tail.on_loss = _cpu_s
    tail.start()
    load = contention()
    warm_pid = _warm_pid(server)
    tail.pid, cpu_before = warm_pid, _cpu_s(warm_pid)
    t_click = time.time()
    page.locator("#run-start").click()
    page.wait_for_function("() => window.__bench.plot !== null", timeout=240_000, polling=50)
    t_point = page.evaluate("() => window.__bench.plot") / 1000
    out = {"start_to_first_loss_point": t_point - t_click, "contention": load,
           "estimated_idle_s": (t_point - t_click) / load}
    if cpu_before is not None and tail.loss_cpu is not None:
        out["trainer_cpu_to_first_loss_s"] = tail.loss_cpu - cpu_before
    try:  # the trainer writes its start time into status.json as soon as it runs
        t_process = json.loads((tail.run_dir / "status.json").read_text())["started"]
    except (OSError, ValueError, KeyError, TypeError):
        t_process = None
    marks = [t_click, t_process,
             tail.first(lambda e: (e.get("message") or "").startswith("Loading the base model")),
             tail.first(lambda e: e.get("kind") == "started"),
             tail.first(lambda e: e.get("kind") == "loss"), t_point]
    for name, a, b in zip(GUI_PHASES, marks, marks[1:]):
        out[name] = b - a if a is not None and b is not None else float("nan")
    if measure_streaming:
        out["cpu_polling"] = _cpu_percent(server.proc.pid, CPU_WINDOW_S)
        shown = page.evaluate("() => window.__bench.progress")
        written: dict[int, float] = {}
        for t, e in list(tail.lines):
            if e.get("kind") == "progress" and e.get("phase", "training") == "training":
                written.setdefault(int(e["step"]), t)
        latencies, last_step = [], None
        for t_ms, step in shown:
            if step != last_step and step in written:
                latencies.append(t_ms / 1000 - written[step])
            last_step = step
        out["latencies"] = latencies
    page.locator("#run-stop").click()
    _wait_text(page, "#run-status", r"Stopped|Finished|Failed", 120)
    _wait_text(page, "#run-start", r"Start", 10)
    tail.halt.set()
    tail.join(5)
    return out


def _wait_warm(server: Server, runs_done: int, timeout: float = 180) -> None:
    """Until the warm trainer that followed the last run has imported the engine (a user takes a
    few seconds between runs; an immediate Start gets a trainer that is still importing)."""
    from lora_gui.worker.client import WARM_LOG
    from lora_gui.worker.warm import WARM_READY

    log = server.runs / WARM_LOG
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if text.count(WARM_READY) > runs_done:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no warm trainer became ready within {timeout:g} s (see {log})")


def measure(work: Path) -> dict:
    """Every GUI number (memoised per work folder); raises when the GUI cannot be driven."""
    key = str(work)
    if key in _RESULTS:
        return _RESULTS[key]
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    from playwright.sync_api import sync_playwright

    result: dict = {}
    with Server(work / "gui" / f"session-{time.time_ns()}") as server:
        result["server_ready_s"] = server.t_ready - server.t_launch
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.wait_for_selector("#run-start")
            page.wait_for_function("() => document.querySelector('#run-status')?.innerText.length > 0")
            time.sleep(2)
            result["cpu_idle"] = _cpu_percent(server.proc.pid, CPU_WINDOW_S)
            result["first_run"] = _one_run(page, server, measure_streaming=False)  # builds the demo
            result["runs"] = []
            for i in range(REPEATS):
                _wait_warm(server, i + 1)
                result["runs"].append(_one_run(page, server, measure_streaming=(i == 0)))
            result["memory"] = _server_memory(server.proc.pid)
            browser.close()
    _RESULTS[key] = result
    return result


def startup_rows(result: dict) -> dict:
    runs = result["runs"]
    table = {"GUI server start (launch -> answers HTTP)": result["server_ready_s"],
             "first run (builds the demo): Start -> first loss point":
                 result["first_run"]["start_to_first_loss_point"]}
    for key in GUI_PHASES:
        table[f"  {key}"] = common.median(r.get(key, float("nan")) for r in runs)
    table["**Start -> first loss point (cached runs)**"] = common.median(
        r["start_to_first_loss_point"] for r in runs)
    table["  contention (busy loop wall / CPU; 1.0 idle)"] = common.median(
        r["contention"] for r in runs)
    table["  Start -> first loss point / contention (idle estimate)"] = common.median(
        r["estimated_idle_s"] for r in runs)
    table["  warm trainer CPU seconds, Start -> first loss event"] = common.median(
        r.get("trainer_cpu_to_first_loss_s", float("nan")) for r in runs)
    return table


def streaming_rows(result: dict) -> dict:
    run = result["runs"][0]
    lat = sorted(run.get("latencies", []))
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))  # noqa: E731
    mem = result["memory"]
    return {
        "event written -> shown in the page, median (s)": common.median(lat),
        "  90th percentile (s)": pct(0.9),
        "  max (s)": lat[-1] if lat else float("nan"),
        "  updates measured": len(lat),
        "idle open page: GUI server CPU (% of a core)": result["cpu_idle"]["server"],
        "idle open page: chromium CPU (% of a core)": result["cpu_idle"]["chromium"],
        "polling page (run training): GUI server CPU (% of a core)": run["cpu_polling"]["server"],
        "polling page (run training): chromium CPU (% of a core)": run["cpu_polling"]["chromium"],
        "GUI server RSS now / peak (MB)": f"{mem['rss_mb']:.0f} / {mem['peak_rss_mb']:.0f}",
        "GUI server has loaded torch": {True: "yes", False: "no", None: "unknown"}[mem["torch_loaded"]],
    }


if __name__ == "__main__":
    common.setup()
    data = measure(common.workdir())
    print(json.dumps(data, indent=1, default=str))
    print(common.markdown_table(("GUI start-up", "seconds"), list(startup_rows(data).items())))
    print(common.markdown_table(("GUI streaming", "value"), list(streaming_rows(data).items())))
