"""The one helper every setting is declared with.

``setting(default, "description", widget=..., advanced=...)`` returns a pydantic ``Field`` whose
``description`` is the tooltip and the CLI help, and whose ``json_schema_extra`` carries neutral UI
metadata (widget kind as a plain word, order, basic/advanced). The tab is the group class's ``tab``.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import Field

# Widget kinds the UI knows how to draw. Plain words so that settings/ never imports gradio.
WIDGETS = frozenset(
    {"text", "textarea", "number", "slider", "checkbox", "dropdown", "folder", "file", "list"}
)

_order = itertools.count()


def setting(
    default: Any,
    description: str,
    *,
    widget: str,
    advanced: bool = False,
    label: str | None = None,
    choices: list[str] | None = None,
    step: float | None = None,
    custom: bool = False,
    family: str | tuple[str, ...] | None = None,
    **constraints: Any,
) -> Any:
    """Declare one setting. ``constraints`` are pydantic's (ge, le, gt, lt, min_length, ...).

    ``custom``: a dropdown whose choices are suggestions; other values may be typed in.
    ``family``: the model family ("sd", "sdxl", "flux") or families that use the setting; the page
    shows it only for those."""
    if widget not in WIDGETS:
        raise ValueError(f"unknown widget kind {widget!r}")
    extra: dict[str, Any] = {"widget": widget, "advanced": advanced, "order": next(_order)}
    if label:
        extra["label"] = label
    if choices:
        extra["choices"] = list(choices)
    if step is not None:
        extra["step"] = step
    if custom:
        extra["custom"] = True
    if family is not None:
        extra["family"] = [family] if isinstance(family, str) else list(family)
    return Field(default, description=description, json_schema_extra=extra, **constraints)
