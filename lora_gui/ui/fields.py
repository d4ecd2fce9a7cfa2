"""The form as data: one ``FieldSpec`` per setting, read from the schema, and the conversions between
widget values (``{"group.field": value}``) and settings documents. No gradio here, so this is what
the fast tests exercise; ``form.py`` turns the specs into components.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic.fields import FieldInfo

from lora_gui.dataset.memory import effective_family
from lora_gui.settings import io
from lora_gui.settings.errors import Issue, SettingsError
from lora_gui.settings.schema import FIELD_GROUPS, GROUPS, TrainingSettings

# Widgets whose values need a choice list that the schema cannot hold as a Literal.
LIST_CHOICES: dict[str, list[str]] = {"runs.json_load_skip_list": sorted(FIELD_GROUPS)}


@dataclass(frozen=True)
class FieldSpec:
    """Everything the form needs to draw and read one setting."""

    key: str  # "group.field"
    group: str
    name: str
    widget: str
    label: str
    info: str
    advanced: bool
    order: int
    default: Any
    kind: type  # int, float, str, bool or list
    optional: bool  # None is a valid value (an empty number box)
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    custom: bool = False  # a dropdown that also takes typed-in values
    family: tuple[str, ...] = ()  # the model families that use it (shown only for those); () = all


def humanise(name: str) -> str:
    """``lr_scheduler_num_cycles`` -> ``Lr scheduler num cycles``."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(annotation without ``| None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _limits(info: FieldInfo) -> tuple[float | None, float | None]:
    low = high = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low = item.gt
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.Lt):
            high = item.lt
    return low, high


def _kind_and_choices(annotation: Any, extra: dict) -> tuple[type, tuple[str, ...]]:
    if typing.get_origin(annotation) is Literal:
        values = typing.get_args(annotation)
        return type(values[0]), tuple(str(v) for v in values)
    if typing.get_origin(annotation) is list:
        return list, ()
    return annotation, tuple(str(c) for c in extra.get("choices", ()))


def _info(description: str, low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return description
    if high is None:
        return f"{description} (at least {low:g})"
    if low is None:
        return f"{description} (at most {high:g})"
    return f"{description} (range {low:g} to {high:g})"


def field_specs() -> list[FieldSpec]:
    """Every setting of the schema, grouped by tab in schema order, each group sorted by ``order``."""
    specs: list[FieldSpec] = []
    for group, cls in GROUPS.items():
        for name, info in cls.model_fields.items():
            extra = dict(info.json_schema_extra or {})
            annotation, optional = _base_type(info.annotation)
            kind, choices = _kind_and_choices(annotation, extra)
            key = f"{group}.{name}"
            choices = choices or tuple(LIST_CHOICES.get(key, ()))
            low, high = _limits(info)
            specs.append(FieldSpec(
                key=key, group=group, name=name, widget=extra.get("widget", "text"),
                label=extra.get("label") or humanise(name),
                info=_info(info.description or "", low, high) if kind in (int, float) else
                (info.description or ""),
                advanced=bool(extra.get("advanced", False)), order=int(extra.get("order", 0)),
                default=info.get_default(call_default_factory=True), kind=kind, optional=optional,
                choices=choices, minimum=low, maximum=high, step=extra.get("step"),
                custom=bool(extra.get("custom", False)),
                family=tuple(extra.get("family", ())),
            ))
    return sorted(specs, key=lambda s: (list(GROUPS).index(s.group), s.order))


SPECS: list[FieldSpec] = field_specs()
SPEC_BY_KEY: dict[str, FieldSpec] = {s.key: s for s in SPECS}
FAMILY_KEYS: list[str] = [s.key for s in SPECS if s.family]


def family_fields_visible(values: dict[str, Any]) -> dict[str, bool]:
    """Which family-only settings the page shows: those of the chosen (or, with auto, detected)
    family; all of them while the family cannot be told."""
    family = effective_family(values.get("model.family") or "auto", values.get("model.base_model") or "")
    return {key: family is None or family in SPEC_BY_KEY[key].family for key in FAMILY_KEYS}


# --- values <-> settings ----------------------------------------------------------------------------

def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A setting's value as its widget shows it."""
    if spec.widget == "dropdown" and value is not None:
        return str(value)
    if spec.kind is list:
        return list(value or [])
    if spec.kind in (int, float) and spec.optional:
        # An optional number is a text box: gradio's number box cannot be empty (it shows and sends 0,
        # which means something else, e.g. "do not train the U-Net").
        return "" if value is None else str(value)
    return value


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """A widget's value as the schema expects it. Nothing is coerced that pydantic should judge:
    invalid text stays invalid so that validation can name the field."""
    if spec.kind is str:
        return "" if value is None else value
    if spec.kind in (int, float):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            return value.strip()  # pydantic parses numbers in text and names the field if it cannot
        if spec.kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    if spec.kind is bool:
        return bool(value)
    if spec.kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]
        return list(value or [])
    return value


def settings_to_values(settings: TrainingSettings) -> dict[str, Any]:
    """``{"group.field": widget value}`` for every setting."""
    return {s.key: to_widget(s, settings.get(s.name)) for s in SPECS}


def values_to_document(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A nested settings document (``{"group": {"field": value}}``) from widget values. Keys not in
    ``values`` are left out (so they take their defaults when validated)."""
    doc: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        spec = SPEC_BY_KEY.get(key)
        if spec is None:
            continue
        converted = from_widget(spec, value)
        if converted is None and not spec.optional:
            continue  # an emptied number box: reported below as "is required"
        doc.setdefault(spec.group, {})[spec.name] = converted
    return doc


def _empty_required(values: dict[str, Any]) -> list[Issue]:
    return [Issue(key, "is required: enter a number")
            for key, value in values.items()
            if key in SPEC_BY_KEY and SPEC_BY_KEY[key].kind in (int, float)
            and not SPEC_BY_KEY[key].optional and from_widget(SPEC_BY_KEY[key], value) is None]


def check_values(values: dict[str, Any]) -> tuple[TrainingSettings | None, list[Issue]]:
    """Validate widget values: (settings, []) or (None, every issue)."""
    missing = _empty_required(values)
    try:
        settings = io.validate_document(values_to_document(values))
    except SettingsError as exc:
        return None, missing + [i for i in exc.issues if i.path not in {m.path for m in missing}]
    if missing:
        return None, missing
    return settings, []


def issue_label(issue: Issue) -> tuple[str, str]:
    """(tab title, field label) of an issue, for the summary."""
    spec = SPEC_BY_KEY.get(issue.path)
    if spec is None:
        return "", issue.path
    return GROUPS[spec.group].title, spec.label


def issues_markdown(issues: list[Issue]) -> str:
    if not issues:
        return ""
    noun = "setting is" if len(issues) == 1 else "settings are"
    lines = [f"**{len(issues)} {noun} invalid; nothing was started:**", ""]
    for issue in issues:
        tab, label = issue_label(issue)
        where = f"{tab} › **{label}**" if tab else f"**{label}**"
        lines.append(f"- {where}: {issue.message}")
    return "\n".join(lines)


def tab_error_counts(issues: list[Issue]) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for issue in issues:
        group = issue.path.split(".")[0]
        if group in counts:
            counts[group] += 1
    return counts


def tab_label(group: str, errors: int) -> str:
    title = GROUPS[group].title
    if not errors:
        return title
    return f"{title} ({errors} error{'s' if errors > 1 else ''})"
