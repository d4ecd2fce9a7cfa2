"""Processes of a run: is a pid (still the same) live process, and ending a trainer's group.

Standard library plus psutil; the web process imports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def pid_alive(pid: int, created: float | None = None) -> bool:
    """Whether ``pid`` is a live (not zombie) process, and the same one that started at ``created``."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return created is None or abs(proc.create_time() - created) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def process_created(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # gone already, or no psutil: the pid-reuse check is skipped
        return None


def signal_group(pid: int, sig: int) -> None:
    """Signal the trainer's process group (it leads one: start_new_session), else the process."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_dead(pid: int, created: float | None, popen: subprocess.Popen | None,
              timeout: float) -> bool:
    """Until the process has ended (reaped, when we spawned it) or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not pid_alive(pid, created):
            return True
        time.sleep(0.05)
    return False


def terminate_group(pid: int, created: float | None = None,
                    popen: subprocess.Popen | None = None, wait_s: float = 5.0) -> bool:
    """SIGTERM the process group of ``pid``; SIGKILL it if it is still alive after ``wait_s``.
    Returns whether it has ended."""
    signal_group(pid, signal.SIGTERM)
    if wait_dead(pid, created, popen, wait_s):
        return True
    signal_group(pid, signal.SIGKILL)
    return wait_dead(pid, created, popen, wait_s)
