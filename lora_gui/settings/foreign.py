"""Import flat settings files from other trainers: kohya_ss GUI configs and seed 001's script JSON.

Every key is one of: mapped onto one of our settings (``mapped``); a setting another open issue adds
(``later``, with the issue); not applicable here, with the reason (``not_applicable``); or not
imported because its value or name is not understood (``rejected``, with the reason). Nothing is
dropped silently, and a key we do not understand never aborts the import. Values stored as strings
("0.0001", "True") are converted by the target's type. The key tables live in ``kohya_keys.py``.
The sd-scripts flags in kohya_ss's ``additional_parameters`` are imported like keys (they win over
the file's keys, as they come last on sd-scripts' command line).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from lora_gui.settings.errors import SettingsError
from lora_gui.settings.kohya_keys import (
    ALIASES,
    EMPTY_IS_UNSET,
    HELPERS,
    LATER,
    NOT_APPLICABLE,
    ZERO_IS_UNSET,
)
from lora_gui.settings.schema import (
    FIELD_GROUPS,
    GROUPS,
    OPTIMIZERS,
    SAMPLERS,
    TrainingSettings,
    parse_optimizer_args,
    sampler_name,
)

_OPTIMIZER_NAMES = {o.lower(): o for o in OPTIMIZERS} | {"adamw_8bit": "AdamW8bit"}
_LOCON_TYPES = {"kohya locon", "lora-c3lier", "kohya lora-c3lier"}  # kohya's LoRA with conv_dim
# kohya_ss LoRA_type (lowercase) -> our network_type (kohya_ss/lora_gui.py: algo=... of lycoris.kohya)
_LYCORIS_TYPES = {"locon": "LoCon", "lycoris/locon": "LoCon", "lycoris/loha": "LoHa",
                  "lycoris/lokr": "LoKr", "lycoris/ia3": "IA3", "lycoris/glora": "GLoRA",
                  "lycoris/native fine-tuning": "Full", "lycoris/diag-oft": "Diag-OFT",
                  "lycoris/boft": "BOFT"}
# When both keys of a pair are set, the second one wins (as sd-scripts reads them).
_LOSES_TO = {"epoch": "max_train_epochs", "num_epochs": "max_train_epochs",
             "learning_rate_te": "text_encoder_lr", "clip_l": "flux1_clip_l", "t5xxl": "flux1_t5xxl"}
_UNKNOWN = "not a setting lora-gui knows, and no open issue adds it"


@dataclass
class ForeignImport:
    document: dict[str, dict[str, Any]]  # nested, ours
    mapped: dict[str, str] = field(default_factory=dict)  # foreign key -> "group.field"
    later: dict[str, str] = field(default_factory=dict)  # foreign key -> the issue that adds it
    not_applicable: dict[str, str] = field(default_factory=dict)  # foreign key -> why
    rejected: dict[str, str] = field(default_factory=dict)  # foreign key -> what was wrong
    notes: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)  # mapped keys left empty: default kept

    @property
    def ignored(self) -> dict[str, str]:
        """Every key that did not become a setting, with its reason."""
        later = {k: f"comes with {v}" for k, v in self.later.items()}
        return {**self.not_applicable, **later, **self.rejected}

    def report(self) -> str:
        lines = [f"Mapped {len(self.mapped)} keys:"]
        lines += [f"  {k} -> {v}" + (" (empty: default kept)" if k in self.defaulted else "")
                  for k, v in sorted(self.mapped.items())]
        lines.append(f"Added by another open issue {len(self.later)} keys (not imported yet):")
        lines += [f"  {k}: {v}" for k, v in sorted(self.later.items())]
        lines.append(f"Not applicable {len(self.not_applicable)} keys:")
        lines += [f"  {k}: {v}" for k, v in sorted(self.not_applicable.items())]
        lines.append(f"Not imported {len(self.rejected)} keys:")
        lines += [f"  {k}: {v}" for k, v in sorted(self.rejected.items())]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def looks_foreign(doc: dict[str, Any]) -> bool:
    """Our documents are nested by group; foreign ones are flat."""
    return not all(k == "settings_version" or (k in GROUPS and isinstance(v, dict))
                   for k, v in doc.items())


def _field_type(name: str):
    group = GROUPS[FIELD_GROUPS[name]]
    return group.model_fields[name].annotation


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no",
                                                           "off", "0", ""):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return value


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return value
        return int(number) if kind is int and number.is_integer() else number
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _coerce(name: str, value: Any) -> Any:
    kind = _field_type(name)
    if kind is bool:
        return _bool(value)
    if kind in (int, float) or kind in (float | None, int | None):
        if isinstance(value, bool):  # kohya_ss writes false for an unset number (min_timestep)
            return int(value)
        return _number(value, int if kind in (int, int | None) else float)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _renamed(key: str, value: Any, out: ForeignImport, label: str) -> tuple[str, Any] | None:
    """Renames with a fixed value conversion. Returns (field, value), or None when not one."""
    if key == "xformers":
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return "attention", "xformers" if _bool(value) else "sdpa"
        if str(value).lower() == "none":
            out.notes.append("xformers='none': using sdpa attention (PyTorch's own kernel)")
            return "attention", "sdpa"
        return "attention", str(value).lower()
    if key in ("sdxl", "sdxl_checkbox"):  # kohya_ss: true for SDXL configs; false leaves the family to detection
        if _bool(value) is not True and _get(out, "family") == "flux":
            out.not_applicable[label] = "false, and flux1_checkbox chose Flux (the family stays Flux)"
            return None
        return "family", "sdxl" if _bool(value) is True else "auto"
    if key == "flux1_checkbox":  # kohya_ss: true for Flux.1 configs (then "sdxl" is false)
        if _bool(value) is True:
            return "family", "flux"
        out.not_applicable[label] = "false: the family is left to the sdxl switch or to detection"
        return None
    if key == "mixed_precision" and isinstance(_bool(value), bool):
        return "mixed_precision", "fp16" if _bool(value) else "no"
    if key == "save_precision":
        text = str(value).lower()
        return "save_precision", {"16": "fp16", "32": "float", "fp32": "float", "float32": "float",
                                  "float16": "fp16", "half": "fp16"}.get(text, text)
    if key in ("train_resolution", "max_resolution", "resolution"):
        return "resolution", str(value).replace(" ", "")
    if key in ("max_token_length", "max_clip_token_length"):
        return "max_token_length", _number(value, int)
    if key in ("stop_text_encoder_training", "stop_text_encoder_training_pct"):
        return "stop_text_encoder_training", _percent_of_run(value, out, label)
    if key in ("use_wandb", "alpha_mask"):
        target = ALIASES[key]
        on = _bool(value) is True
        return (target, "wandb" if key == "use_wandb" else True) if on else (target, None)
    return None


def _percent_of_run(value: Any, out: ForeignImport, label: str) -> Any:
    """kohya_ss's LoRA tab gives 'stop text encoder training' in percent of the steps (lora_gui.py
    turns it into ceil(max_train_steps / 100 * pct) steps); ours takes a fraction below 1."""
    pct = _number(value, float)
    if not isinstance(pct, (int, float)) or isinstance(pct, bool):
        return value
    if pct >= 100:
        out.notes.append(f"{label} = {pct:g} % is the whole run: the text encoder trains to the end")
        return 0.0
    return pct / 100


def _checked(key: str, value: Any, out: ForeignImport, label: str) -> tuple[str, Any] | None:
    """Names that must be one of ours: returns (field, value), or None after rejecting."""
    if key in ("optimizer", "optimizer_type"):
        text = str(value).strip()
        name = _OPTIMIZER_NAMES.get(text.lower())
        if name is None and "." not in text:
            out.rejected[label] = f"optimizer {value!r} is not supported (choose one of " \
                                  f"{', '.join(OPTIMIZERS)}, or a dotted class path)"
            return None
        if name is not None and name.lower() != text.lower():
            out.notes.append(f"optimizer {value!r} imported as {name}")
        return "optimizer", name or text
    if key == "sample_sampler":
        field_, name = "sample_sampler", sampler_name(value)
        if name is None:
            out.rejected[label] = f"sampler {value!r} is not supported (choose one of " \
                                  f"{', '.join(SAMPLERS)})"
            return None
        return field_, name
    if key == "save_model_as" and str(value).lower() not in ("safetensors", "ckpt", "pt"):
        out.rejected[label] = f"save format {value!r} is not supported for LoRAs (safetensors is used)"
        return None
    if key in ("change_output_name", "load_previous_save_state", "resume") and isinstance(
            _bool(value), bool) and not (isinstance(value, str) and value.strip()):
        out.not_applicable[label] = f"is a yes/no switch in that file; {ALIASES.get(key, key)} " \
                                    "needs a name or a path"
        return None
    return _renamed(key, value, out, label)


def _is_unset(key: str, value: Any, target: str) -> bool:
    """kohya_ss writes "" (and for some keys 0) for a setting it leaves to sd-scripts' default."""
    if value is None or (value == "" and (_field_type(target) is not str or key in EMPTY_IS_UNSET)):
        return True
    if key in ZERO_IS_UNSET:
        number = _number(value, float)
        return isinstance(number, (int, float)) and number == 0
    return False


def _import_key(doc: dict[str, Any], key: str, value: Any, out: ForeignImport,
                label: str | None = None) -> None:
    """Route one foreign key (or one additional_parameters flag, ``label`` '--flag') to its group."""
    label = label or key
    if key in NOT_APPLICABLE:
        out.not_applicable[label] = NOT_APPLICABLE[key]
        return
    if key in LATER:
        out.later[label] = LATER[key]
        return
    if key in HELPERS:
        return
    winner = _LOSES_TO.get(key)
    if winner and not label.startswith("--") and winner in doc and \
            not _is_unset(winner, doc[winner], ALIASES.get(winner, winner)):
        out.not_applicable[label] = f"{winner} is also given and wins (as in sd-scripts)"
        return
    target = ALIASES.get(key, key)
    if target not in FIELD_GROUPS:
        out.rejected[label] = _UNKNOWN
        return
    if _is_unset(key, value, target):
        if _field_type(target) in (float | None, int | None):
            _set(out, target, None)
        out.mapped[label] = f"{FIELD_GROUPS[target]}.{target}"
        out.defaulted.append(label)
        return
    converted = _checked(key, value, out, label)
    if converted is None and (label in out.rejected or label in out.not_applicable):
        return
    target, value = converted if converted else (target, _coerce(target, value))
    if value is None:  # a switch that is off: the default stays
        out.defaulted.append(label)
    else:
        _override(out, target, label)
        _set(out, target, value)
    out.mapped[label] = f"{FIELD_GROUPS[target]}.{target}"


def _override(out: ForeignImport, target: str, label: str) -> None:
    """A flag from additional_parameters replaces what a file key set (it comes later on sd-scripts'
    command line): the file key is reported as overridden."""
    if not label.startswith("--"):
        return
    path = f"{FIELD_GROUPS[target]}.{target}"
    for key, where in list(out.mapped.items()):
        if where == path and not key.startswith("--"):
            del out.mapped[key]
            out.not_applicable[key] = f"additional_parameters {label} overrides it"


def command_line_flags(text: str) -> dict[str, Any]:
    """sd-scripts flags from a command-line fragment: '--a=1 --b 2 3 --c' -> {a: '1', b: '2 3',
    c: True}. Quotes are removed (backslashes kept, for Windows paths); nothing is executed."""
    tokens = [tok[1:-1] if len(tok) > 1 and tok[0] == tok[-1] and tok[0] in "\"'" else tok
              for tok in shlex.split(text, posix=False)]
    flags: dict[str, Any] = {}
    name = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            flags[name] = value if eq else True
            if eq:
                name = None
        elif name is not None:
            previous = flags[name]
            flags[name] = token if previous is True else f"{previous} {token}"
        else:
            raise ValueError(f"{token!r} does not belong to a --flag")
    return flags


def _import_flags(doc: dict[str, Any], out: ForeignImport) -> None:
    text = doc.get("additional_parameters")
    if "additional_parameters" not in doc:
        return
    if not isinstance(text, str) or not text.strip():
        out.mapped["additional_parameters"] = "(empty)"
        out.defaulted.append("additional_parameters")
        return
    try:
        flags = command_line_flags(text)
    except ValueError as exc:
        out.rejected["additional_parameters"] = f"cannot be split into flags ({exc}): give the " \
                                               "options as settings instead"
        return
    out.mapped["additional_parameters"] = "(its flags, listed as --flag)"
    for name, value in flags.items():
        if name == "network_args" and isinstance(value, str):
            for arg, arg_value in parse_optimizer_args(value).items():
                if arg == "algo":
                    _algo(arg_value, out)
                else:
                    _import_key(doc, arg, arg_value, out, f"--network_args {arg}")
        else:
            _import_key(doc, name, value, out, f"--{name}")


def _algo(value: Any, out: ForeignImport) -> None:
    """``--network_args algo=loha`` (lycoris.kohya): the network type."""
    name = _LYCORIS_TYPES.get(f"lycoris/{str(value).strip().lower()}")
    if name is None:
        out.rejected["--network_args algo"] = f"LyCORIS algorithm {value!r} is not one of lora-gui's " \
                                              "network types"
        return
    _override(out, "network_type", "--network_args algo")
    _set(out, "network_type", name)
    out.mapped["--network_args algo"] = "advanced.network_type"


def import_foreign(doc: dict[str, Any]) -> ForeignImport:
    """Map a flat foreign settings dict onto a nested document of ours (not validated yet)."""
    out = ForeignImport(document={})
    for key, value in doc.items():
        _import_key(doc, key, value, out)
    _import_flags(doc, out)
    _post(doc, out)
    return out


def _set(out: ForeignImport, name: str, value: Any) -> None:
    out.document.setdefault(FIELD_GROUPS[name], {})[name] = value


def _get(out: ForeignImport, name: str, default: Any = None) -> Any:
    return out.document.get(FIELD_GROUPS[name], {}).get(name, default)


def _post(doc: dict[str, Any], out: ForeignImport) -> None:
    """Rules that involve several foreign keys."""
    _eight_bit_adam(doc, out)
    _lora_type(doc, out)
    _warmup(doc, out)
    _noise_offset_type(doc, out)
    _launch_threads(doc, out)
    if _get(out, "unet_lr") == 0 and _get(out, "text_encoder_lr") == 0 \
            and not _get(out, "unet_only") and not _get(out, "text_only"):
        _set(out, "unet_lr", None)
        _set(out, "text_encoder_lr", None)
        out.notes.append("unet_lr and text_encoder_lr are both 0 (unset in that GUI): both use the "
                         "base learning rate")
    if _get(out, "max_steps", 0) and ("epoch" in doc or "num_epochs" in doc):
        out.notes.append(f"max steps = {_get(out, 'max_steps')} overrides the epoch count; set it to "
                         "0 to train by epochs")


def _launch_threads(doc: dict[str, Any], out: ForeignImport) -> None:
    """kohya_ss passes num_cpu_threads_per_process to accelerate launch (class_accelerate_launch.py);
    here it is an accelerate launch flag too, used when a run has several processes."""
    if "num_cpu_threads_per_process" not in doc:
        return
    key, threads = "num_cpu_threads_per_process", _number(doc["num_cpu_threads_per_process"], int)
    extra = str(_get(out, "extra_accelerate_launch_args", "") or "")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        out.rejected[key] = f"{doc[key]!r} is not a number of threads (1 or more)"
    elif "--num_cpu_threads_per_process" in extra:
        out.not_applicable[key] = "extra_accelerate_launch_args also gives it and wins"
    else:
        _set(out, "extra_accelerate_launch_args", f"{extra} --{key} {threads}".strip())
        out.mapped[key] = "launch.extra_accelerate_launch_args"


def _eight_bit_adam(doc: dict[str, Any], out: ForeignImport) -> None:
    if _bool(doc.get("use_8bit_adam")) is True:
        if _get(out, "optimizer", "AdamW") in ("AdamW", "AdamW8bit"):
            _set(out, "optimizer", "AdamW8bit")
            out.mapped["use_8bit_adam"] = "training.optimizer"
        else:
            out.not_applicable["use_8bit_adam"] = \
                f"the file also chose optimizer {_get(out, 'optimizer')}, which wins"
    elif "use_8bit_adam" in doc:
        out.mapped["use_8bit_adam"] = "training.optimizer"
        out.defaulted.append("use_8bit_adam")


def _lora_type(doc: dict[str, Any], out: ForeignImport) -> None:
    """kohya_ss's LoRA_type: kohya's LoRA (Standard; with conv_dim: Kohya LoCon), a LyCORIS algo
    (kohya_ss lora_gui.py passes algo=... to lycoris.kohya), or a Flux LoRA (kohya's LoRA)."""
    if "LoRA_type" not in doc:
        return
    kind = str(doc["LoRA_type"]).strip().lower()
    out.mapped["LoRA_type"] = "advanced.network_type"
    if kind.startswith("flux"):  # kohya_ss "Flux1": sd-scripts' lora_flux, kohya's LoRA for Flux
        _set(out, "network_type", "LoRA")
        return
    lycoris = _LYCORIS_TYPES.get(kind)
    _set(out, "network_type", lycoris or "LoRA")
    if lycoris is None:
        if kind not in _LOCON_TYPES:
            if kind != "standard":
                out.notes.append(f"LoRA_type {doc['LoRA_type']!r} is not one of lora-gui's network "
                                 "types: importing it as a standard LoRA")
            if _get(out, "conv_dim", 0):
                out.notes.append("conv_dim ignored: the file's LoRA_type has no convolution LoRA")
            _set(out, "conv_dim", 0)
        return
    _lycoris_dims(doc, out, lycoris)


def _lycoris_dims(doc: dict[str, Any], out: ForeignImport, lycoris: str) -> None:
    """lycoris.kohya's reading of kohya_ss's values: use_tucker = use_cp or use_tucker; a conv_dim
    that is absent or 0 means conv_dim = network_dim (conv layers on); LoKr above 1024 is full."""
    if any(_bool(doc.get(k)) is True for k in ("use_cp", "use_tucker")):
        _set(out, "use_tucker", True)
    dim = _get(out, "network_dim", TrainingSettings().training.network_dim)
    if lycoris == "Full" or not _get(out, "conv_dim", 0):
        _set(out, "conv_dim", dim)
        _set(out, "conv_alpha", _get(out, "network_alpha", TrainingSettings().training.network_alpha))
    if lycoris == "LoKr":
        for name in ("network_dim", "conv_dim"):
            value = _get(out, name, 0)
            if isinstance(value, int) and value > 1024:
                _set(out, name, 1024)
                out.notes.append(f"{name} {value} imported as 1024: LoKr at that rank already uses "
                                 "the full matrix (LyCORIS' full-matrix mode) for SD and SDXL layers")


def _warmup(doc: dict[str, Any], out: ForeignImport) -> None:
    warmup_pct = doc.get("lr_warmup")
    if warmup_pct not in (None, "") and not _get(out, "lr_warmup_steps"):
        pct = _number(warmup_pct, float)
        if isinstance(pct, (int, float)) and 0 <= pct < 100:
            _set(out, "lr_warmup_steps", pct / 100)
            out.mapped["lr_warmup"] = "training.lr_warmup_steps"
        else:
            out.rejected["lr_warmup"] = f"{warmup_pct!r} is not a percentage below 100"
    elif warmup_pct not in (None, ""):
        out.not_applicable["lr_warmup"] = "lr_warmup_steps is also given and wins"
    elif "lr_warmup" in doc:
        out.mapped["lr_warmup"] = "training.lr_warmup_steps"
        out.defaulted.append("lr_warmup")
    if _get(out, "lr_warmup_steps", 0) and _get(out, "lr_scheduler", "cosine") == "constant":
        _set(out, "lr_scheduler", "constant_with_warmup")
        out.notes.append("the file has warm-up with the 'constant' scheduler: switched to "
                         "constant_with_warmup")


# kohya_ss passes only one family of noise settings to sd-scripts, chosen by noise_offset_type
# (kohya_gui/lora_gui.py: noise_offset/adaptive/random strength only for "Original", the multires
# settings only for "Multires").
_NOISE_FAMILIES = {
    "original": ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale"),
    "multires": ("multires_noise_iterations", "multires_noise_discount"),
}


def _noise_offset_type(doc: dict[str, Any], out: ForeignImport) -> None:
    if "noise_offset_type" not in doc:
        return
    kind = str(doc["noise_offset_type"]).strip().lower()
    if kind not in _NOISE_FAMILIES:
        out.rejected["noise_offset_type"] = f"{doc['noise_offset_type']!r} is neither Original nor " \
                                            "Multires"
        return
    other = "multires" if kind == "original" else "original"
    for name in _NOISE_FAMILIES[other]:
        default = GROUPS["advanced"].model_fields[name].default
        if _get(out, name, default) != default:
            out.notes.append(f"{name} = {_get(out, name)} is not used with noise_offset_type "
                             f"{doc['noise_offset_type']!r} (kohya_ss does not pass it): set to "
                             f"{default}")
        if name in out.document.get("advanced", {}):
            del out.document["advanced"][name]
        for key, where in list(out.mapped.items()):
            if where == f"advanced.{name}":
                del out.mapped[key]
                out.not_applicable[key] = f"not used with noise_offset_type {doc['noise_offset_type']!r}"
    out.mapped["noise_offset_type"] = f"advanced.{_NOISE_FAMILIES[kind][0]}"


def convert(doc: dict[str, Any], current: TrainingSettings | None = None):
    """Import a foreign document into validated settings. Values that do not validate are moved to
    ``rejected`` with the reason, and the import goes on with the default for that setting."""
    from lora_gui.settings import io

    result = import_foreign(doc)
    for _ in range(len(FIELD_GROUPS) + 1):
        try:
            return io.load_document(result.document, current), result
        except SettingsError as exc:
            if not _drop_invalid(result, exc):
                raise
    raise AssertionError("unreachable")


def _drop_invalid(result: ForeignImport, exc: SettingsError) -> bool:
    """Move the keys whose values did not validate to ``rejected``; False when none could be."""
    reverse = {v: k for k, v in result.mapped.items()}
    removed = False
    for issue in exc.issues:
        group, _, name = issue.path.partition(".")
        if name and name in result.document.get(group, {}):
            del result.document[group][name]
            key = reverse.get(issue.path, name)
            result.mapped.pop(key, None)
            result.rejected[key] = f"invalid value: {issue.message}"
            removed = True
    return removed


def load_any(doc: dict[str, Any], current: TrainingSettings | None = None
             ) -> tuple[TrainingSettings, ForeignImport | None]:
    """THE rule for "ours or a foreign config?": settings from a document of ours (loaded over the
    defaults, honouring ``current``'s skip-list) or from a kohya_ss/older-script one (converted).
    Returns the settings and the import report (None for a document of ours); SettingsError if
    the document is ours and invalid. Used by the CLI, the queue and the page."""
    if looks_foreign(doc):
        return convert(doc, current)
    from lora_gui.settings import io

    return io.load_document(doc, current), None
