"""Settings files: save/load JSON, the skip-list, sparse presets, versioned migrations.

Documents are nested by group (``{"settings_version": 1, "model": {...}, "training": {...}}``).
Every problem in a document is reported together as one ``SettingsError``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_gui.atomic import write_text
from lora_gui.settings.errors import Issue, SettingsError, from_validation_error
from lora_gui.settings.schema import FIELD_GROUPS, GROUPS, TrainingSettings, cross_field_issues

SETTINGS_VERSION = 1
VERSION_KEY = "settings_version"
SKIP_KEY = "json_load_skip_list"

# version -> function that turns a document of that version into one of version + 1.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def defaults() -> TrainingSettings:
    return TrainingSettings()


def to_document(settings: TrainingSettings, *, sparse: bool = False) -> dict[str, Any]:
    """The settings as a JSON-ready dict; ``sparse`` keeps only values that differ from defaults."""
    full = settings.model_dump(mode="json")
    if sparse:
        base = defaults().model_dump(mode="json")
        full = {g: {k: v for k, v in vals.items() if base[g][k] != v} for g, vals in full.items()}
        full = {g: vals for g, vals in full.items() if vals}
    return {VERSION_KEY: SETTINGS_VERSION, **full}


def dumps(settings: TrainingSettings, *, sparse: bool = False) -> str:
    return json.dumps(to_document(settings, sparse=sparse), indent=2, ensure_ascii=False) + "\n"


def save_settings(settings: TrainingSettings, path: str | os.PathLike, *, sparse=False) -> Path:
    """Save the full settings (or only what differs from defaults) atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, dumps(settings, sparse=sparse))


def settings_copy_folder(settings: TrainingSettings) -> Path:
    """Where copies of the settings go: ``runs.save_json_folder``, else the output folder."""
    folder = settings.runs.save_json_folder.strip() or settings.model.output_folder
    return Path(folder).expanduser()


def save_settings_copy(settings: TrainingSettings, name: str | None = None) -> Path:
    """THE copy of the settings that ``runs.save_json_only`` writes instead of training and that a
    run leaves in ``runs.save_json_folder``: ``<folder>/<output name>.json`` (see
    ``settings_copy_folder``), with ``save_json_only`` off so that the copy trains when it is run
    later. A different file of that name is never overwritten: the copy then gets a time stamp
    (``<output name>-YYYYmmdd-HHMMSS.json``); an identical one is reused. ``name`` replaces the
    output name (a run that saves under another name because the first was taken)."""
    runs = settings.runs.model_copy(update={"save_json_only": False})
    text = dumps(settings.model_copy(update={"runs": runs}))
    folder, name = settings_copy_folder(settings), name or settings.model.output_name
    path = folder / f"{name}.json"
    if path.exists():
        try:
            if path.read_text(encoding="utf-8") == text:
                return path
        except (OSError, UnicodeDecodeError):
            pass
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
        while path.exists():
            path, n = folder / f"{name}-{stamp}{f'-{n}' if n > 1 else ''}.json", n + 1
    folder.mkdir(parents=True, exist_ok=True)
    return write_text(path, text)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError([Issue("(file)", f"{path} does not exist: check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError([Issue("(file)", f"cannot read {path}: {exc}")]) from None
    return parse_json(text, str(path))


MAX_JSON_DEPTH = 32  # settings are two levels deep; foreign configs a few more


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a decoded JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_bounded(text: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that turns too deep a nesting into a ``ValueError`` sentence: Python's decoder
    raises RecursionError near 1000 levels, and anything that walks a deep value later
    (validation, copies, messages) can hit the same limit."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(_too_deep(where, "about a thousand", max_depth)) from None
    depth = json_depth(value)
    if depth > max_depth:
        raise ValueError(_too_deep(where, str(depth), max_depth))
    return value


def _too_deep(where: str, depth: str, limit: int) -> str:
    return (f"{where} nests lists or objects {depth} levels deep, more than the {limit} such a "
            "file can need: it is damaged or not a file of this kind")


def parse_json(text: str, where: str = "the document") -> dict[str, Any]:
    try:
        doc = loads_bounded(text, where)
    except json.JSONDecodeError as exc:
        raise SettingsError([Issue(
            "(file)", f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}): fix the file or save the settings again")]) from None
    except ValueError as exc:
        raise SettingsError([Issue("(file)", str(exc))]) from None
    if not isinstance(doc, dict):
        raise SettingsError([Issue("(file)", f"{where} must hold a JSON object of settings, "
                                             f"not {type(doc).__name__}")])
    return doc


def migrate(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring a document to the current version. Documents without a version are current."""
    doc = dict(doc)
    version = doc.pop(VERSION_KEY, SETTINGS_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SettingsError([Issue(VERSION_KEY, f"must be a whole number, not {version!r}")])
    if version > SETTINGS_VERSION:
        raise SettingsError([Issue(VERSION_KEY, f"the file was written by a newer lora-gui "
                                                f"(version {version}): update lora-gui")])
    while version < SETTINGS_VERSION:
        if version not in MIGRATIONS:
            raise SettingsError([Issue(VERSION_KEY, f"version {version} is not a lora-gui settings "
                                                    "version: remove the key or fix the number")])
        doc = MIGRATIONS[version](doc)
        version += 1
    return doc


def validate_document(doc: dict[str, Any]) -> TrainingSettings:
    """Migrate and validate a nested document; all problems together as SettingsError."""
    doc = migrate(doc)
    try:
        return TrainingSettings.model_validate(doc)
    except ValidationError as exc:
        error = from_validation_error(exc, list(FIELD_GROUPS) + list(GROUPS))
    raise SettingsError(error.issues + _cross_issues_of_valid_groups(doc, error.paths)) from None


def _cross_issues_of_valid_groups(doc: dict[str, Any], bad_paths: list[str]) -> list[Issue]:
    """Cross-field rules do not run while a field is invalid; check them on the groups that are
    valid so that one report lists every problem of the document."""
    groups, good = {}, set()
    for name, cls in GROUPS.items():
        try:
            groups[name] = cls.model_validate(doc.get(name, {}))
            good.add(name)
        except (ValidationError, TypeError):
            groups[name] = cls()
    if not good or len(good) == len(GROUPS):
        return []
    merged = TrainingSettings.model_construct(**groups)
    return [Issue(p, m) for p, m in cross_field_issues(merged)
            if p.split(".")[0] in good and p not in bad_paths]


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Group-wise merge of two nested documents (top wins). Malformed groups pass through so that
    validation reports them."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _keep(doc: dict[str, Any], current: TrainingSettings, keys: Iterable[str]) -> dict[str, Any]:
    kept = {}
    for name in keys:
        group = FIELD_GROUPS[name]
        kept.setdefault(group, {})[name] = current.get(name)
    return overlay(doc, kept)


def load_document(doc: dict[str, Any], current: TrainingSettings | None = None) -> TrainingSettings:
    """Settings from a document loaded over the defaults. With ``current`` settings, keys in the
    current skip-list keep their current values. The skip-list is never taken from the document."""
    merged = overlay(to_document(defaults()), migrate(doc))
    merged.pop(VERSION_KEY, None)
    keep = [SKIP_KEY] if current is None else [*current.runs.json_load_skip_list, SKIP_KEY]
    return validate_document(_keep(merged, current or defaults(), keep))


def load_settings(path: str | os.PathLike, current: TrainingSettings | None = None):
    """Load a settings file of ours (see ``load_document``)."""
    return load_document(read_json(path), current)


# --- presets ---------------------------------------------------------------------------------

def preset_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    dirs = [PRESETS_DIR, *map(Path, extra)]
    user = os.environ.get("LORA_GUI_PRESETS")
    if user:
        dirs.append(Path(user))
    return dirs


def list_presets(extra: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
    """Preset name -> file; later folders (the user's) override shipped names."""
    found: dict[str, Path] = {}
    for folder in preset_dirs(extra):
        if folder.is_dir():
            for file in sorted(folder.glob("*.json")):
                found[file.stem] = file
    return found


def load_preset(name: str, current: TrainingSettings | None = None,
                extra: Iterable[str | os.PathLike] = ()) -> TrainingSettings:
    """A preset is a sparse overlay on the defaults. Skip-listed keys that the preset does not set
    keep their current values (so choosing a preset does not forget your folders)."""
    presets = list_presets(extra)
    if name not in presets:
        raise SettingsError([Issue("(preset)", f"there is no preset named {name!r}: choose one of "
                                               f"{', '.join(sorted(presets)) or 'none'}")])
    doc = migrate(read_json(presets[name]))
    merged = overlay(to_document(defaults()), doc)
    merged.pop(VERSION_KEY, None)
    if current is not None:
        given = {k for group in doc.values() if isinstance(group, dict) for k in group}
        keep = [k for k in current.runs.json_load_skip_list if k not in given]
        merged = _keep(merged, current, [*keep, SKIP_KEY])
    return validate_document(merged)


# --- command-line overrides ---------------------------------------------------------------------

def apply_overrides(settings: TrainingSettings, assignments: Iterable[str]) -> TrainingSettings:
    """Apply ``group.field=value`` (or ``field=value``) strings; values are JSON or plain text."""
    changes: dict[str, dict[str, Any]] = {}
    issues: list[Issue] = []
    for item in assignments:
        key, sep, raw = item.partition("=")
        name = key.strip().split(".")[-1]
        if not sep or name not in FIELD_GROUPS:
            issues.append(Issue(key.strip() or item, "is not a setting: write group.field=value, e.g. "
                                                     "training.learning_rate=0.0002"))
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        changes.setdefault(FIELD_GROUPS[name], {})[name] = value
    if issues:
        raise SettingsError(issues)
    return validate_document(overlay(to_document(settings), changes))
