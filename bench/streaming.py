"""4. Streaming: latency from an event written by the trainer to its appearance in the page, the
CPU of an idle open page and of a polling page (GUI server and chromium), and the GUI process's RSS
(target < 300 MB; it never imports torch). Measured by :mod:`bench.gui` in the same session as the
GUI part of 3.

Run alone: ``python -m bench.streaming``.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench import common


def run(work: Path | None = None) -> common.Section:
    from bench import gui

    work = work or common.workdir()
    t0 = time.perf_counter()
    try:
        result = gui.measure(work)
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return common.Section("4. Streaming", "", [
            f"Not measured: {type(exc).__name__}: {exc}. TODO(lead): make bench/gui.py work with "
            "the GUI as it lands."], {"error": str(exc)}, time.perf_counter() - t0)
    rows = gui.streaming_rows(result)
    mem = result["memory"]
    notes = [
        "Latency: for each 'Step N' the page shows, the time since the trainer wrote the Progress "
        f"event of step N (the page polls every {_poll_s()} s while a run is active). CPU: % of one "
        f"core over {gui.CPU_WINDOW_S:.0f} s, page open and idle (no run) vs. page polling a "
        "training run (trainer not counted); chromium = all its processes.",
        f"GUI server RSS target < 300 MB: {'met' if mem['rss_mb'] < 300 else 'NOT met'}; torch in "
        f"the GUI process: {'NO (as intended)' if mem['torch_loaded'] is False else mem['torch_loaded']}.",
    ]
    notes.append("Measured in the same GUI session as the GUI part of 3 (its time is counted there).")
    return common.Section("4. Streaming", common.markdown_table(("GUI", "value"), list(rows.items())),
                          notes, {"gui": result})


def _poll_s() -> str:
    """The page's poll interval, read from the source (importing the GUI would load gradio)."""
    import re

    try:
        text = (common.ROOT / "lora_gui" / "ui" / "panel.py").read_text(encoding="utf-8")
        return re.search(r"^ACTIVE_POLL_S\s*=\s*([\d.]+)", text, re.M).group(1)
    except (OSError, AttributeError):
        return "?"


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
