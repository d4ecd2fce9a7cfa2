"""Our one error type for settings: every issue names the field path and says what to do."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True)
class Issue:
    path: str  # "training.learning_rate", or "(file)" for problems with the document itself
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SettingsError(ValueError):
    """All problems of one settings document, reported together."""

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        super().__init__(self.summary())

    def summary(self) -> str:
        if len(self.issues) == 1:
            return f"Invalid setting {self.issues[0]}."
        lines = "\n".join(f"- {i}" for i in self.issues)
        return f"{len(self.issues)} invalid settings:\n{lines}"

    @property
    def paths(self) -> list[str]:
        return [i.path for i in self.issues]


def _plain(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: dict, known: list[str]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    name = str(err["loc"][-1]) if err["loc"] else ""
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "remove it or check its spelling"
        return f"is not a setting lora-gui knows: {hint}"
    if kind == "missing":
        return "is required: enter a value"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = next(iter(ctx.values()), "")
        word = {"greater_than_equal": "at least", "greater_than": "above",
                "less_than_equal": "at most", "less_than": "below"}[kind]
        return f"must be {word} {bound} (you gave {_plain(value)})"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number (you gave {_plain(value)})"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"must be a number such as 0.0001 (you gave {_plain(value)})"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false (you gave {_plain(value)})"
    if kind in ("string_type",):
        return f"must be text (you gave {_plain(value)})"
    if kind in ("list_type",):
        return f"must be a list of setting names (you gave {_plain(value)})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a group of settings (a JSON object), not {_plain(value)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')} (you gave {_plain(value)})"
    if kind in ("string_too_short",):
        return "must not be empty"
    if kind in ("string_too_long",):
        return f"is too long (at most {ctx.get('max_length')} characters)"
    return f"{err['msg']} (you gave {_plain(value)})"


def from_validation_error(exc: ValidationError, known: list[str]) -> SettingsError:
    issues: list[Issue] = []
    for err in exc.errors(include_url=False):
        if err["type"] == "cross_field":
            issues += [Issue(p, m) for p, m in err["ctx"]["issues"]]
            continue
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        # Errors inside a field validator of a Literal/union carry extra loc parts: keep the path short.
        path = ".".join(p or repr(p) for p in loc[:2]) if loc else "(settings)"
        issues.append(Issue(path, _message(err, known)))
    return SettingsError(issues)
