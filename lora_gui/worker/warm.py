"""A warm trainer: a ``python -m lora_gui.worker --warm`` process started before Start, which has
already imported the engine (torch, diffusers, transformers: seconds of imports) and waits for one
run folder on its stdin. Start hands it the folder instead of spawning a cold process.

Rules: a warm process trains at most one run (it reads one line, then its stdin is closed); it
watches its launcher while it waits (end of file on stdin: the launcher exited or was killed; a
changed parent pid: the same), so it is never left behind; and its launcher reaps it.
Standard library only: the web process imports this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

WARM_FLAG = "--warm"
WARM_READY = "warm trainer: engine imported, waiting for a run"  # its line in the warm log
MAX_EARLY_EXITS = 3  # a warm trainer that keeps dying before a run (a broken engine import): give up


def warm_argv(python: str = sys.executable) -> list[str]:
    return [python, "-m", "lora_gui.worker", WARM_FLAG]


class WarmTrainer:
    """At most one idle warm trainer process; ``take`` hands it a run folder, once."""

    def __init__(self, python: str = sys.executable, log_path: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None):
        self.python = python
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self._proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.early_exits = 0
        self._lock = threading.Lock()  # ensure/take/close from the page, the queue, a rewarm thread
        self._closed = False

    @property
    def argv(self) -> list[str]:
        return warm_argv(self.python)

    def ready(self) -> bool:
        """A warm process is alive (importing or waiting)."""
        return self._proc is not None and self._proc.poll() is None

    def ensure(self) -> bool:
        """Start a warm process unless one is alive; returns whether one is alive now."""
        with self._lock:
            return self._ensure()

    def _ensure(self) -> bool:
        if self._closed:
            return False
        if self._proc is not None and self._proc.poll() is not None:  # died while idle: reaped
            self.early_exits += 1
            self._proc = None
        if self._proc is None:
            if self.early_exits >= MAX_EARLY_EXITS:
                return False
            self._spawn()
        return self.ready()

    def _spawn(self) -> None:
        env = {**(self.env if self.env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=env)
            self.started_at = time.time()
        except OSError:
            self._proc = None
            self.early_exits += 1
        finally:
            if log is not subprocess.DEVNULL:
                log.close()

    def take(self, run_dir: str | os.PathLike) -> subprocess.Popen | None:
        """Hand ``run_dir`` to the warm process and give up its handle; None when there is none
        (the caller spawns a cold trainer then). Its stdin is closed: it can never get a second run."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return None
        if not self._is_ready(proc):
            # Still importing: it would write no heartbeat until its imports end (on a busy machine
            # longer than a run may stay silent), so a cold trainer (heartbeat first) starts instead.
            _end(proc, wait_s=0)
            return None
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"{os.fspath(run_dir)}\n".encode())
            proc.stdin.close()
        except (OSError, ValueError):  # it died meanwhile
            _end(proc)
            return None
        return proc

    def _is_ready(self, proc: subprocess.Popen) -> bool:
        """Whether ``proc`` has said in the log that its imports are done (no log: assume so)."""
        if self.log_path is None:
            return True
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return f"{WARM_READY} (pid {proc.pid})" in text

    def close(self, wait_s: float = 5.0) -> None:
        """End the idle warm process (end of file on its stdin, then SIGKILL) and reap it."""
        with self._lock:
            proc, self._proc, self._closed = self._proc, None, True
        if proc is not None:
            _end(proc, wait_s)


def _end(proc: subprocess.Popen, wait_s: float = 5.0) -> None:
    try:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        if wait_s > 0:
            proc.wait(timeout=wait_s)
        else:
            proc.kill()
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
    proc.wait()


def wait_for_run(fd: int, parent: int, poll_s: float = 1.0) -> str | None:
    """The warm process's side: block until the launcher writes a run folder line on ``fd``; None
    when the launcher is gone (end of file, or the parent pid changed) without sending one."""
    import select

    buf = b""
    while True:
        if os.getppid() != parent:
            return None
        readable, _, _ = select.select([fd], [], [], poll_s)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        if b"\n" in buf:
            line = buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
            return line or None

