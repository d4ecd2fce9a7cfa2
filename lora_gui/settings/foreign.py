"""Import flat settings files from other trainers: kohya_ss GUI configs and seed 001's script JSON.

Every key is either mapped onto one of our settings (reported as ``mapped``) or listed back as
``ignored`` with the reason: nothing is dropped silently, and a key we do not understand never aborts
the import. Values stored as strings ("0.0001", "True") are converted by the target's type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_gui.settings.errors import SettingsError
from lora_gui.settings.schema import FIELD_GROUPS, GROUPS, OPTIMIZERS, SAMPLERS, TrainingSettings

# foreign key -> our field name (canonical names map to themselves).
ALIASES: dict[str, str] = {
    "pretrained_model_name_or_path": "base_model", "train_data_dir": "img_folder",
    "reg_data_dir": "reg_img_folder", "output_dir": "output_folder", "change_output_name": "output_name",
    "save_model_as": "save_as", "no_metadata": "no_meta", "logging_dir": "log_dir",
    "network_weights": "lora_model_for_resume", "resume": "load_previous_save_state",
    "train_resolution": "resolution", "max_resolution": "resolution", "enable_bucket": "buckets",
    "min_bucket_reso": "min_bucket_resolution", "max_bucket_reso": "max_bucket_resolution",
    "num_epochs": "epochs", "epoch": "epochs", "max_train_steps": "max_steps",
    "v_param": "v_parameterization", "network_train_unet_only": "unet_only",
    "network_train_text_encoder_only": "text_only", "scheduler": "lr_scheduler",
    "cosine_restarts": "lr_scheduler_num_cycles", "scheduler_power": "lr_scheduler_power",
    "warmup_lr_ratio": "lr_warmup_steps", "optimizer_type": "optimizer", "net_dim": "network_dim",
    "alpha": "network_alpha", "train_batch_size": "batch_size",
    "gradient_acc_steps": "gradient_accumulation_steps", "max_data_loader_n_workers": "num_workers",
    "persistent_data_loader_workers": "persistent_workers", "shuffle_captions": "shuffle_caption",
    "max_clip_token_length": "max_token_length", "xformers": "attention", "sample_every_n_epoch":
    "sample_every_n_epochs", "LyCORIS_preset": "lycoris_preset", "use_cp": "use_tucker",
    "constraint": "constrain", "sdxl": "family", "flux1_checkbox": "family", "train_blocks": "flux_train_blocks",
    "t5xxl_max_token_len": "t5xxl_max_token_length",
}
# Keys whose value we read while converting others (not settings of their own).
_HELPERS = {"use_8bit_adam", "LoRA_type", "lr_warmup"}
_NEVER = {"json_load_skip_list": "the skip-list is never loaded from a file (your current one is kept)",
          "train_on_input": "lycoris.kohya does not pass it on (only its ia3 preset sets it per layer)",
          "sdxl_no_half_vae": "the VAE always computes in float32 here (the SDXL VAE overflows in fp16)",
          "sdxl_cache_text_encoder_outputs": "text-encoder outputs are cached whenever the text encoders "
          "are not trained and the captions do not change"}

_OPTIMIZER_NAMES = {o.lower(): o for o in OPTIMIZERS} | {
    "dadaptation": "DAdaptAdam", "adamw_8bit": "AdamW8bit", "pagedadamw8bit": "AdamW8bit",
    "lion8bit": "Lion", "pagedlion8bit": "Lion", "sgdnesterov8bit": "SGDNesterov",
    "adamw8bit": "AdamW8bit", "dadaptadam": "DAdaptAdam",
}
_LOCON_TYPES = {"kohya locon", "lora-c3lier", "kohya lora-c3lier"}  # kohya's LoRA with conv_dim
# kohya_ss LoRA_type (lowercase) -> our network_type (kohya_ss/lora_gui.py: algo=... of lycoris.kohya)
_LYCORIS_TYPES = {"locon": "LoCon", "lycoris/locon": "LoCon", "lycoris/loha": "LoHa",
                  "lycoris/lokr": "LoKr", "lycoris/ia3": "IA3", "lycoris/glora": "GLoRA",
                  "lycoris/native fine-tuning": "Full", "lycoris/diag-oft": "Diag-OFT",
                  "lycoris/boft": "BOFT"}


@dataclass
class ForeignImport:
    document: dict[str, dict[str, Any]]  # nested, ours
    mapped: dict[str, str] = field(default_factory=dict)  # foreign key -> "group.field"
    ignored: dict[str, str] = field(default_factory=dict)  # foreign key -> reason
    notes: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)  # mapped keys left empty: default kept

    def report(self) -> str:
        lines = [f"Mapped {len(self.mapped)} keys:"]
        lines += [f"  {k} -> {v}" + (" (empty: default kept)" if k in self.defaulted else "")
                  for k, v in sorted(self.mapped.items())]
        lines.append(f"Ignored {len(self.ignored)} keys:")
        lines += [f"  {k}: {v}" for k, v in sorted(self.ignored.items())]
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
    if kind in (int, float) or kind == (float | None):
        return _number(value, int if kind is int else float)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _special(key: str, value: Any, out: ForeignImport) -> tuple[str, Any] | None:
    """Conversions that are more than renaming. Returns (field, value) or None when handled."""
    if key in ("xformers",):
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return "attention", "xformers" if _bool(value) else "sdpa"
        if str(value).lower() == "none":
            out.notes.append("xformers='none': using sdpa attention (PyTorch's own kernel)")
            return "attention", "sdpa"
        return "attention", str(value).lower()
    if key == "sdxl":  # kohya_ss: true for SDXL configs; false leaves the family to detection
        if _bool(value) is not True and _get(out, "family") == "flux":
            out.ignored[key] = "false, and flux1_checkbox chose Flux"
            return None
        return "family", "sdxl" if _bool(value) is True else "auto"
    if key == "flux1_checkbox":  # kohya_ss: true for Flux.1 configs (then "sdxl" is false)
        if _bool(value) is True:
            return "family", "flux"
        out.ignored[key] = "false: the family is left to the sdxl switch or detection"
        return None
    if key in ("optimizer", "optimizer_type"):
        name = _OPTIMIZER_NAMES.get(str(value).lower())
        if name is None:
            out.ignored[key] = f"optimizer {value!r} is not supported (choose one of {', '.join(OPTIMIZERS)})"
            return None
        if name.lower() != str(value).lower():
            out.notes.append(f"optimizer {value!r} imported as {name}")
        return "optimizer", name
    if key == "sample_sampler":
        name = str(value).lower().removeprefix("k_")
        name = {"dpmsingle": "dpmsolver"}.get(name, name)
        if name not in SAMPLERS:
            out.ignored[key] = f"sampler {value!r} is not supported"
            return None
        return "sample_sampler", name
    if key == "mixed_precision" and isinstance(_bool(value), bool):
        return "mixed_precision", "fp16" if _bool(value) else "no"
    if key == "save_precision":
        text = str(value).lower()
        return "save_precision", {"16": "fp16", "32": "float", "fp32": "float", "float32": "float",
                                  "float16": "fp16", "half": "fp16"}.get(text, text)
    if key == "save_model_as" and str(value).lower() not in ("safetensors", "ckpt", "pt"):
        out.ignored[key] = f"save format {value!r} is not supported for LoRAs (safetensors is used)"
        return None
    if key in ("change_output_name", "load_previous_save_state", "resume") and isinstance(
            _bool(value), bool) and not (isinstance(value, str) and value.strip()):
        target = ALIASES.get(key, key)
        out.ignored[key] = f"is a yes/no switch in that file; {target} needs a name or a path"
        return None
    if key in ("train_resolution", "max_resolution", "resolution"):
        return "resolution", str(value).replace(" ", "")
    if key == "max_token_length" or key == "max_clip_token_length":
        return "max_token_length", _number(value, int) if value not in (None, "") else 75
    return None


def import_foreign(doc: dict[str, Any]) -> ForeignImport:
    """Map a flat foreign settings dict onto a nested document of ours (not validated yet)."""
    out = ForeignImport(document={})
    warmup_pct = doc.get("lr_warmup")
    for key, value in doc.items():
        if key in _NEVER:
            out.ignored[key] = _NEVER[key]
            continue
        if key in _HELPERS:
            continue
        target = ALIASES.get(key, key)
        if target not in FIELD_GROUPS:
            out.ignored[key] = "not a setting lora-gui knows"
            continue
        if value is None or (value == "" and _field_type(target) is not str):
            # An empty value means "not set" in those files: the setting keeps its default.
            if _field_type(target) == (float | None):
                out.document.setdefault(FIELD_GROUPS[target], {})[target] = None
            out.mapped[key] = f"{FIELD_GROUPS[target]}.{target}"
            out.defaulted.append(key)
            continue
        special = _special(key, value, out)
        if special is None and key in out.ignored:
            continue
        target, value = special if special else (target, _coerce(target, value))
        out.document.setdefault(FIELD_GROUPS[target], {})[target] = value
        out.mapped[key] = f"{FIELD_GROUPS[target]}.{target}"
    _post(doc, out, warmup_pct)
    return out


def _set(out: ForeignImport, name: str, value: Any) -> None:
    out.document.setdefault(FIELD_GROUPS[name], {})[name] = value


def _get(out: ForeignImport, name: str, default: Any = None) -> Any:
    return out.document.get(FIELD_GROUPS[name], {}).get(name, default)


def _post(doc: dict[str, Any], out: ForeignImport, warmup_pct: Any) -> None:
    """Rules that involve several foreign keys."""
    if _bool(doc.get("use_8bit_adam")) is True:
        if _get(out, "optimizer", "AdamW") in ("AdamW", "AdamW8bit"):
            _set(out, "optimizer", "AdamW8bit")
            out.mapped["use_8bit_adam"] = "training.optimizer"
        else:
            out.ignored["use_8bit_adam"] = f"the file also chose optimizer {_get(out, 'optimizer')}"
    elif "use_8bit_adam" in doc:
        out.mapped["use_8bit_adam"] = "training.optimizer"
    if "LoRA_type" in doc:
        _network_type(doc, out)
    if warmup_pct not in (None, "") and not _get(out, "lr_warmup_steps"):
        pct = _number(warmup_pct, float)
        if isinstance(pct, (int, float)) and 0 <= pct < 100:
            _set(out, "lr_warmup_steps", pct / 100)
            out.mapped["lr_warmup"] = "training.lr_warmup_steps"
        else:
            out.ignored["lr_warmup"] = f"{warmup_pct!r} is not a percentage below 100"
    elif warmup_pct not in (None, ""):
        out.ignored["lr_warmup"] = "lr_warmup_steps is also given and wins"
    if _get(out, "lr_warmup_steps", 0) and _get(out, "lr_scheduler", "cosine") == "constant":
        _set(out, "lr_scheduler", "constant_with_warmup")
        out.notes.append("the file has warm-up with the 'constant' scheduler: switched to "
                         "constant_with_warmup")
    if _get(out, "unet_lr") == 0 and _get(out, "text_encoder_lr") == 0 \
            and not _get(out, "unet_only") and not _get(out, "text_only"):
        _set(out, "unet_lr", None)
        _set(out, "text_encoder_lr", None)
        out.notes.append("unet_lr and text_encoder_lr are both 0 (unset in that GUI): both use the "
                         "base learning rate")
    if _get(out, "max_steps", 0) and ("epoch" in doc or "num_epochs" in doc):
        out.notes.append(f"max steps = {_get(out, 'max_steps')} overrides the epoch count; set it to "
                         "0 to train by epochs")


def _network_type(doc: dict[str, Any], out: ForeignImport) -> None:
    """kohya_ss's LoRA_type: kohya's LoRA (Standard; with conv_dim: Kohya LoCon) or a LyCORIS algo."""
    kind = str(doc["LoRA_type"]).strip().lower()
    out.mapped["LoRA_type"] = "advanced.network_type"
    lycoris = _LYCORIS_TYPES.get(kind)
    _set(out, "network_type", lycoris or "LoRA")
    if lycoris is None:
        if kind not in _LOCON_TYPES:
            if kind != "standard":
                out.notes.append(f"LoRA_type {doc['LoRA_type']!r} is not supported: importing it as "
                                 "a standard LoRA")
            if _get(out, "conv_dim", 0):
                out.notes.append("conv_dim ignored: the file's LoRA_type has no convolution LoRA")
            _set(out, "conv_dim", 0)
        return
    if any(_bool(doc.get(k)) is True for k in ("use_cp", "use_tucker")):
        _set(out, "use_tucker", True)  # lycoris.kohya: use_tucker = use_cp or use_tucker
    dim = _get(out, "network_dim", TrainingSettings().training.network_dim)
    if lycoris == "Full" or not _get(out, "conv_dim", 0):
        # lycoris.kohya: a conv_dim that is absent or 0 means conv_dim = network_dim (conv layers on).
        _set(out, "conv_dim", dim)
        _set(out, "conv_alpha", _get(out, "network_alpha", TrainingSettings().training.network_alpha))
    if lycoris == "LoKr":
        for name in ("network_dim", "conv_dim"):
            value = _get(out, name, 0)
            if isinstance(value, int) and value > 1024:
                _set(out, name, 1024)
                out.notes.append(f"{name} {value} imported as 1024: LoKr at that rank already uses "
                                 "the full matrix (LyCORIS' full-matrix mode) for SD and SDXL layers")


def convert(doc: dict[str, Any], current: TrainingSettings | None = None):
    """Import a foreign document into validated settings. Values that do not validate are moved to
    ``ignored`` with the reason, and the import goes on with the default for that setting."""
    from lora_gui.settings import io

    result = import_foreign(doc)
    reverse = {v: k for k, v in result.mapped.items()}
    for _ in range(len(FIELD_GROUPS) + 1):
        try:
            return io.load_document(result.document, current), result
        except SettingsError as exc:
            removed = False
            for issue in exc.issues:
                group, _, name = issue.path.partition(".")
                if name and name in result.document.get(group, {}):
                    del result.document[group][name]
                    key = reverse.get(issue.path, name)
                    result.mapped.pop(key, None)
                    result.ignored[key] = f"invalid value: {issue.message}"
                    removed = True
            if not removed:
                raise
    raise AssertionError("unreachable")


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
