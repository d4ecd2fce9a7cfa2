"""Components built from the schema: one per setting, registered by ``"group.field"``.

Handlers never see a positional list: they take the registry's ``inputs`` (a set, so gradio passes
``{component: value}``) and turn it into ``{"group.field": value}`` with ``Registry.values``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from lora_gui.settings.schema import GROUPS
from lora_gui.ui.fields import (
    FAMILY_KEYS,
    SPEC_BY_KEY,
    SPECS,
    FieldSpec,
    family_fields_visible,
    tab_label,
    to_widget,
)


@dataclass
class Registry:
    """``"group.field"`` -> component, and the tabs and browse buttons that go with them."""

    components: dict[str, gr.components.Component] = field(default_factory=dict)
    tabs: dict[str, gr.Tab] = field(default_factory=dict)
    browse_buttons: dict[str, gr.Button] = field(default_factory=dict)

    def add(self, key: str, component: gr.components.Component) -> None:
        if key in self.components:
            raise ValueError(f"setting {key} has two components")
        self.components[key] = component

    @property
    def inputs(self) -> set:
        return set(self.components.values())

    @property
    def outputs(self) -> list:
        return list(self.components.values())

    def values(self, data: dict) -> dict[str, Any]:
        """``{component: value}`` (gradio's dict of a set input) -> ``{"group.field": value}``."""
        by_id = {c._id: k for k, c in self.components.items()}
        return {by_id[c._id]: v for c, v in data.items() if c._id in by_id}

    def updates(self, values: dict[str, Any]) -> dict:
        """``{"group.field": widget value}`` -> ``{component: value}`` for a handler's return."""
        return {self.components[k]: v for k, v in values.items() if k in self.components}

    def handler(self, fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict], Any]:
        """Wrap ``fn(values)`` so that gradio can call it with the set inputs' dict."""

        def wrapped(data: dict):
            return fn(self.values(data))

        wrapped.__name__ = getattr(fn, "__name__", "handler")
        return wrapped

    def tab_updates(self, counts: dict[str, int]) -> dict:
        return {self.tabs[g]: gr.update(label=tab_label(g, n)) for g, n in counts.items()
                if g in self.tabs}


def make_component(spec: FieldSpec, value: Any, scale: int | None = None,
                   visible: bool = True) -> gr.components.Component:
    """The component for one setting. Numbers get no min/max here: gradio would reject an out-of-range
    number with a toast that does not name the field, so the range is in the tooltip and pydantic
    judges it (the message then names the field)."""
    common = dict(label=spec.label, info=spec.info, elem_id=f"field-{spec.group}-{spec.name}",
                  scale=scale, visible=visible)
    value = to_widget(spec, value)
    if spec.widget == "checkbox":
        return gr.Checkbox(value=bool(value), **common)
    if spec.widget == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), value=value, allow_custom_value=spec.custom,
                           **common)
    if spec.widget == "list":
        return gr.Dropdown(choices=list(spec.choices) or list(value or []), value=list(value or []),
                           multiselect=True, allow_custom_value=True, **common)
    if spec.widget == "slider" and spec.minimum is not None and spec.maximum is not None:
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=spec.step or
                         (1 if spec.kind is int else None), value=value, **common)
    if spec.widget == "number" and spec.optional:
        return gr.Textbox(value=value, lines=1, max_lines=1, placeholder="empty = the default", **common)
    if spec.widget in ("number", "slider"):
        step = spec.step or (1 if spec.kind is int else None)
        return gr.Number(value=value, step=step, precision=None, **common)
    if spec.widget == "textarea":
        return gr.Textbox(value=value, lines=4, max_lines=20, **common)
    return gr.Textbox(value=value, lines=1, max_lines=1, **common)


def _field(registry: Registry, spec: FieldSpec, value: Any, visible: bool = True) -> None:
    if spec.widget in ("folder", "file"):
        with gr.Row(equal_height=False):
            component = make_component(spec, value, scale=8)
            button = gr.Button("Browse…", size="sm", scale=1, min_width=90,
                               elem_id=f"browse-{spec.group}-{spec.name}")
        registry.browse_buttons[spec.key] = button
    else:
        component = make_component(spec, value, visible=visible)
    registry.add(spec.key, component)


def build_tabs(values: dict[str, Any], extras: dict[str, Callable[[], None]] | None = None,
               groups: Iterable[str] | None = None) -> Registry:
    """One tab per group (title from the group class) with its basic fields, then a closed
    "Advanced" accordion. ``extras[group]()`` adds more to a tab (dataset preview, run list)."""
    registry = Registry()
    extras = extras or {}
    shown = family_fields_visible({k: values.get(k, SPEC_BY_KEY[k].default) for k in ("model.family",
                                                                                     "model.base_model")})
    for group in groups or GROUPS:
        specs = [s for s in SPECS if s.group == group]
        with gr.Tab(tab_label(group, 0), id=group, elem_id=f"tab-{group}") as tab:
            registry.tabs[group] = tab
            for spec in (s for s in specs if not s.advanced):
                _field(registry, spec, values.get(spec.key, spec.default), shown.get(spec.key, True))
            advanced = [s for s in specs if s.advanced]
            if advanced:
                with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{group}"):
                    for spec in advanced:
                        _field(registry, spec, values.get(spec.key, spec.default), shown.get(spec.key, True))
            if group in extras:
                extras[group]()
    return registry


def wire_family_fields(registry: Registry) -> None:
    """Show a family-only setting only while its family is chosen or detected (schema metadata
    ``family``): re-evaluated when the family or the base model changes."""
    sources = [registry.components["model.family"], registry.components["model.base_model"]]
    targets = [registry.components[k] for k in FAMILY_KEYS]

    def update(family, base_model):
        shown = family_fields_visible({"model.family": family, "model.base_model": base_model})
        return [gr.update(visible=shown[k]) for k in FAMILY_KEYS]

    for source in sources:
        source.change(update, inputs=sources, outputs=targets, api_visibility="private")
