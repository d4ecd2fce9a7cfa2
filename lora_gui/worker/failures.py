"""Turn what killed a run (an exception, an exit code, the log's last lines) into a sentence a user
can act on. Standard library and lora_gui.events only."""

from __future__ import annotations

import errno
import os
import re
import signal
import traceback

from lora_gui.events import GPU_OOM, is_gpu_out_of_memory

KILLED = ("The trainer was killed (signal 9), probably because the machine ran out of system "
          "memory: lower the batch size, resolution or number of workers.")
DIVERGED = ("Training diverged (the loss became NaN or infinite): lower the learning rate (for "
            "example by 10x), add learning-rate warm-up, or train in full precision.")
VANISHED = ("The trainer process ended without reporting a result; it was probably killed, for "
            "example because the machine ran out of system memory: lower the batch size, "
            "resolution or number of workers, and see train.log in the run folder.")
DISK_FULL = ("The disk is full: the trainer could not write{where}. LoRAs saved before are complete "
             "(files are written whole or not at all); free some space and start again.")

_NAN_RE = re.compile(r"\bnan\b|\binf(inite)?\b.*loss|loss.*\b(nan|inf)\b|diverge", re.I)
_MISSING_RE = re.compile(r"FileNotFoundError: (?:\[Errno 2\] [^:]*: )?'?(?P<name>[^'\n]+)'?")


def traceback_tail(exc: BaseException, lines: int = 8) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_lines(text: str, lines: int = 8) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _from_exception(exc: BaseException) -> str | None:
    if is_gpu_out_of_memory(f"{type(exc).__name__}: {exc}"):
        return GPU_OOM
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return f"A file or folder the run needs is missing: {name}. Check the path in the settings."
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" in {os.path.dirname(exc.filename)}" if exc.filename else ""
        return DISK_FULL.format(where=where)
    if isinstance(exc, MemoryError):
        return ("The machine ran out of system memory: lower the batch size, resolution or "
                "number of workers.")
    if isinstance(exc, (FloatingPointError,)) or (isinstance(exc, (ValueError, RuntimeError))
                                                  and _NAN_RE.search(str(exc))):
        return DIVERGED
    if isinstance(exc, KeyboardInterrupt):
        return "The trainer was interrupted (Ctrl-C) before it finished."
    if hasattr(exc, "issues") and isinstance(exc.issues, list):  # SettingsError
        return str(exc)
    return None


def _from_log(log_tail: str) -> str | None:
    if is_gpu_out_of_memory(log_tail):
        return GPU_OOM
    match = _MISSING_RE.search(log_tail)
    if match:
        name = match.group("name").strip()
        return f"A file or folder the run needs is missing: {name}. Check the path in the settings."
    if "No space left on device" in log_tail:
        return DISK_FULL.format(where="")
    if re.search(r"loss (is|became) (nan|inf)", log_tail, re.I):
        return DIVERGED
    return None


def _from_exit_code(code: int) -> str | None:
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return KILLED
    if code in (-signal.SIGTERM, 128 + signal.SIGTERM):
        return "The trainer was terminated (signal 15, SIGTERM) before it finished."
    if code < 0:
        return (f"The trainer crashed ({_signal_name(-code)}, signal {-code}): see train.log in "
                "the run folder.")
    return None


def explain_failure(exc_or_exitcode: BaseException | int | None, log_tail: str = "") -> str:
    """One sentence that says what went wrong and what to do.

    ``exc_or_exitcode``: the exception that ended the run, the trainer's exit code (negative =
    killed by that signal, as ``Popen.returncode`` reports it), or None when unknown (the process
    vanished and we are not its parent).
    """
    if isinstance(exc_or_exitcode, BaseException):
        found = _from_exception(exc_or_exitcode)
        if found:
            return found
        last = f"{type(exc_or_exitcode).__name__}: {exc_or_exitcode}".strip()
        return f"The trainer stopped with an error: {last}"
    if isinstance(exc_or_exitcode, int):
        found = _from_exit_code(exc_or_exitcode)
        if found:
            return found
    found = _from_log(log_tail)
    if found:
        return found
    if exc_or_exitcode is None:
        return VANISHED
    tail = last_lines(log_tail, 3)
    where = f" The log ends with:\n{tail}" if tail else " See train.log in the run folder."
    return f"The trainer exited (code {exc_or_exitcode}) without reporting a result.{where}"
