"""A lora-gui server in a subprocess, and the page's events called over HTTP the way the browser
calls them (``POST /gradio_api/queue/join`` + the server-sent events of ``/queue/data``), so tests
can drive private events without a browser. Every process started here is reaped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GuiServer:
    """``app.py`` serving ``cwd`` on a free loopback port; a context manager that always reaps it."""

    def __init__(self, cwd: Path, *args: str, timeout: float = 120, env: dict | None = None) -> None:
        self.cwd, self.port = Path(cwd), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.timeout = list(args), timeout
        self.env = {**os.environ, "LORA_GUI_HOME": str(self.cwd / "data"), "OMP_NUM_THREADS": "1",
                    **(env or {})}
        self.env.pop("LORA_GUI_AUTH", None)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GuiServer:
        self.log = open(self.cwd / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(self.port), "--runs-dir", "runs",
             *self.args], cwd=self.cwd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError("the GUI exited:\n" + self.log_text())
            try:
                urllib.request.urlopen(self.url + "/config", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the GUI did not answer in {self.timeout:.0f} s") from None
                time.sleep(0.3)
        return self

    def log_text(self) -> str:
        self.log.flush()
        return (self.cwd / "server.log").read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self.log.close()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def page(self) -> Page:
        return Page(self)


class EventError(AssertionError):
    """The event answered with an error (``gr.Error`` text in ``message``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Page:
    """One browser-like session: the page's config, its component values, and its events."""

    def __init__(self, server: GuiServer) -> None:
        self.server = server
        status, body = server.get("/config")
        assert status == 200, body
        self.config = json.loads(body)
        self.prefix = self.config.get("api_prefix", "/gradio_api")
        self.by_elem = {c["props"].get("elem_id"): c for c in self.config["components"]
                        if c.get("props", {}).get("elem_id")}
        self.by_id = {c["id"]: c for c in self.config["components"]}
        self.session = uuid.uuid4().hex[:12]

    def component_id(self, elem_id: str) -> int:
        return self.by_elem[elem_id]["id"]

    def dependency(self, elem_id: str, trigger: str) -> dict:
        cid = self.component_id(elem_id)
        for dep in self.config["dependencies"]:
            if [cid, trigger] in dep["targets"]:
                return dep
        raise KeyError(f"no {trigger} event on #{elem_id}")

    def call(self, elem_id: str, trigger: str = "click", values: dict | None = None,
             timeout: float = 60) -> dict[int, object]:
        """Run the event on ``#elem_id`` with the page's initial values (``values`` by elem_id
        override them); returns the outputs by component id, or raises ``EventError``."""
        dep = self.dependency(elem_id, trigger)
        overrides = {self.component_id(k): v for k, v in (values or {}).items()}
        data = [overrides.get(i, self.by_id[i]["props"].get("value")) for i in dep["inputs"]]
        outputs = self._join(dep["id"], data, self.component_id(elem_id), timeout)
        return dict(zip(dep["outputs"], outputs, strict=False))

    def load(self, timeout: float = 60) -> dict[int, object]:
        """The page's load event (what opening the page runs); outputs by component id."""
        dep = next(d for d in self.config["dependencies"]
                   if any(t[1] == "load" for t in d["targets"]))
        data = [self.by_id[i]["props"].get("value") for i in dep["inputs"]]
        return dict(zip(dep["outputs"], self._join(dep["id"], data, None, timeout), strict=False))

    def api(self, name: str, *args, timeout: float = 60):
        """Call a public ``gr.api`` endpoint (what gradio_client does); its single result."""
        dep = next(d for d in self.config["dependencies"] if d.get("api_name") == name)
        return self._join(dep["id"], list(args), None, timeout)[0]

    def _join(self, fn_index: int, data: list, trigger_id: int | None, timeout: float) -> list:
        body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": self.session,
                           "trigger_id": trigger_id, "event_data": None}).encode()
        request = urllib.request.Request(self.server.url + self.prefix + "/queue/join", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            event_id = json.loads(resp.read())["event_id"]
        return self._result(event_id, timeout)

    def _result(self, event_id: str, timeout: float) -> list:
        url = f"{self.server.url}{self.prefix}/queue/data?session_hash={self.session}"
        deadline = time.monotonic() + timeout
        result = None
        with urllib.request.urlopen(url, timeout=timeout) as stream:
            for raw in stream:
                if time.monotonic() > deadline:
                    break
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("msg") == "close_stream" and result is not None:
                    break  # read to the end, as gradio's clients do: the server frees the session
                if msg.get("event_id") != event_id or msg.get("msg") != "process_completed":
                    continue
                result = msg
        if result is None:
            raise AssertionError(f"no answer to the event in {timeout:.0f} s")
        output = result.get("output") or {}
        if not result.get("success", False):
            raise EventError(str(output.get("error") or output))
        return output.get("data", [])


def upload(server: GuiServer, path: Path, prefix: str = "/gradio_api") -> dict:
    """Upload a file the way the page does; returns the FileData value for an event's input."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    body += path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + prefix + "/upload", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        stored = json.loads(resp.read())[0]
    return {"path": stored, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
