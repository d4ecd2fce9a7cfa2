"""Two or more runs side by side (no gradio): their loss (smoothed) and validation curves on one
chart, and the settings that differ between them."""

from __future__ import annotations

from typing import Any

from lora_gui.settings import SettingsError, io
from lora_gui.ui.runview import thin
from lora_gui.worker.protocol import RunPaths

MAX_DIFF_ROWS = 60


def label(position: int) -> str:
    """A run's short name in the comparison (run ids are too long for a chart legend)."""
    return f"#{position}"


def curve_rows(views: dict[str, Any]) -> list[dict[str, Any]]:
    """Chart rows (step, loss, series) for ``{run_id: RunView}`` in order: "#1 loss" (the
    smoothed training loss) and "#1 validation" for the first run, and so on."""
    rows = []
    for position, view in enumerate(views.values(), 1):
        name = label(position)
        rows += [{"step": s, "loss": v, "series": f"{name} loss"} for s, v in thin(view.smoothed)]
        rows += [{"step": s, "loss": v, "series": f"{name} validation"}
                 for s, v in thin(view.validation)]
    return rows


def _flat(doc: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_settings(run_dir) -> dict[str, Any]:
    """The run's settings document, flattened to "group.key" (settings_version left out); {} with
    a note when the file is missing or unreadable."""
    try:
        doc = io.read_json(RunPaths(run_dir).settings)
    except SettingsError as exc:
        return {"(settings.json)": f"unreadable: {exc}"}
    doc.pop("settings_version", None)
    return _flat(doc)


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ⏎ ")
    return f"`{text[:60]}{'…' if len(text) > 60 else ''}`" if text else "(empty)"


def settings_diff(settings: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the settings whose values differ between the runs (``{run_id: flat
    settings}``); a missing key shows as "–"."""
    if len(settings) < 2:
        return "Choose two or more runs to compare."
    keys = sorted(set().union(*settings.values()))
    missing = object()
    differing = [k for k in keys if len({repr(s.get(k, missing)) for s in settings.values()}) > 1]
    if not differing:
        return "These runs were trained with the same settings."
    runs = list(settings)
    lines = [f"**{len(differing)} setting{'s' if len(differing) > 1 else ''} differ:**", "",
             "| setting | " + " | ".join(f"{label(i)} `{r}`" for i, r in enumerate(runs, 1)) + " |",
             "|---|" + "---|" * len(runs)]
    for key in differing[:MAX_DIFF_ROWS]:
        cells = [_cell(settings[r][key]) if key in settings[r] else "–" for r in runs]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if len(differing) > MAX_DIFF_ROWS:
        lines.append(f"\n… and {len(differing) - MAX_DIFF_ROWS} more.")
    return "\n".join(lines)
