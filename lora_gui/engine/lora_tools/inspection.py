"""Inspect a LoRA: its type, rank/alpha per block, base model, training settings, block weights.

The card reads the kohya metadata (``ss_*``, ``sshs_*``, ``modelspec.*``) as A1111's metadata view
does; every field is formatted defensively: a value that does not parse is shown as written, and
fields it does not know are listed as they are, so no file makes it fail.

Blocks are named as the LoRA Block Weight extension (A1111) names them: ``TE``, ``IN00``..,
``M00``, ``OUT00``.. (the LDM U-Net's input/middle/output block index); the chart's value per block
is sqrt(sum over its modules of ||scale * up @ down||_F^2).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping

import torch

from .modules import LoraModule, network_kind, split_modules

_UNET_PART = re.compile(r"^lora_unet_(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")


def _layers_per_block(names) -> int:
    """Down blocks hold ``layers`` resnets/attentions, up blocks one more (LDM numbering needs it)."""
    seen = [2]
    for n in names:
        if (m := _UNET_PART.match(n)) and m[3] in ("attentions", "resnets"):
            seen.append(int(m[4]) + 1 if m[1] == "down_blocks" else int(m[4]))
    return max(seen)


def block_of(name: str, layers: int = 2) -> str:
    """A module's block label: TE, IN01.., M00, OUT00.., or OTHER (conv_in, time embedding...)."""
    if name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        return "TE"
    if name.startswith("lora_unet_mid_block_"):
        return "M00"
    m = _UNET_PART.match(name)
    if not m:
        return "OTHER"
    block, kind, layer, per = int(m[2]), m[3], int(m[4]), layers + 1
    if m[1] == "down_blocks":
        index = 1 + block * per + (per - 1 if kind == "downsamplers" else layer)
        return f"IN{index:02d}"
    index = block * per + (per - 1 if kind == "upsamplers" else layer)
    return f"OUT{index:02d}"


def _block_order(label: str) -> tuple[int, int]:
    prefix = re.match(r"[A-Z]+", label)[0]
    rank = {"TE": 0, "IN": 1, "M": 2, "OUT": 3}.get(prefix, 4)
    digits = label[len(prefix):]
    return rank, int(digits) if digits.isdigit() else 0


def update_norm(m: LoraModule) -> float:
    """||scale * up @ down||_F without forming the product: sqrt(tr((U^T U)(D D^T))) * |scale|."""
    up = m.up.reshape(m.up.shape[0], -1).double()
    down = m.down.reshape(m.rank, -1).double()
    value = torch.trace((up.T @ up) @ (down @ down.T)).clamp(min=0).sqrt().item()
    return abs(m.scale) * value


def block_weights(modules: Mapping[str, LoraModule]) -> list[tuple[str, float]]:
    """[(block label, norm)] in U-Net order (TE first)."""
    layers = _layers_per_block(modules)
    squares: dict[str, float] = {}
    for name, m in modules.items():
        label = block_of(name, layers)
        squares[label] = squares.get(label, 0.0) + update_norm(m) ** 2
    return [(label, squares[label] ** 0.5) for label in sorted(squares, key=_block_order)]


def guess_base(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The base model version: from the metadata, else from the text encoder's / cross-attention's width."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        if metadata.get(key):
            return str(metadata[key])
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd):
        return "sdxl (from the key names)"
    widths = {int(v.shape[1]) for k, v in sd.items()
              if v.ndim >= 2 and (k.endswith("attn2_to_k.lora_down.weight") or
                                  ("lora_te_" in k and k.endswith("q_proj.lora_down.weight")))}
    if 1024 in widths:
        return "sd_v2 (from the tensor shapes)"
    if 768 in widths:
        return "sd_v1 (from the tensor shapes)"
    return f"unknown (text width {sorted(widths) or '?'})"


def inspect_lora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    """A JSON-ready summary: kind, base, per-block ranks/alphas and norms, module count, metadata card."""
    kind = network_kind(sd)
    info: dict = {"kind": kind, "base_model": guess_base(sd, metadata), "tensors": len(sd),
                  "parameters": int(sum(v.numel() for v in sd.values())), "blocks": [], "modules": 0}
    try:
        modules = split_modules(sd)
    except ValueError as exc:  # another network type: the card still shows what is known
        info["note"] = str(exc)
        modules = {}
    info["modules"] = len(modules)
    layers = _layers_per_block(modules)
    per_block: dict[str, dict] = {}
    for name, m in modules.items():
        b = per_block.setdefault(block_of(name, layers), {"ranks": set(), "alphas": set(), "modules": 0, "conv": 0})
        b["ranks"].add(m.rank)
        b["alphas"].add(round(m.alpha, 4))
        b["modules"] += 1
        b["conv"] += int(m.is_conv)
    norms = dict(block_weights(modules))
    for label in sorted(per_block, key=_block_order):
        b = per_block[label]
        info["blocks"].append({"block": label, "modules": b["modules"], "conv_modules": b["conv"],
                               "ranks": sorted(b["ranks"]), "alphas": sorted(b["alphas"]),
                               "norm": norms.get(label, 0.0)})
    info["card"] = metadata_card(metadata)
    return info


# --- the metadata card -------------------------------------------------------------------------

_SECTIONS = (
    ("Network", ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_network_dropout", "ss_lora_type")),
    ("Base model", ("ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_vae_name",
                    "modelspec.architecture", "modelspec.resolution")),
    ("Training", ("ss_output_name", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                  "ss_lr_scheduler", "ss_lr_warmup_steps", "ss_optimizer", "ss_num_epochs", "ss_epoch",
                  "ss_steps", "ss_max_train_steps", "ss_batch_size_per_device", "ss_total_batch_size",
                  "ss_gradient_accumulation_steps", "ss_mixed_precision", "ss_full_fp16", "ss_clip_skip",
                  "ss_noise_offset", "ss_min_snr_gamma", "ss_seed", "ss_training_started_at",
                  "ss_training_finished_at", "ss_training_comment")),
    ("Dataset", ("ss_num_train_images", "ss_num_reg_images", "ss_resolution", "ss_enable_bucket",
                 "ss_caption_dropout_rate", "ss_shuffle_caption", "ss_keep_tokens", "ss_dataset_dirs",
                 "ss_tag_frequency")),
    ("Hashes", ("sshs_model_hash", "sshs_legacy_hash", "ss_new_sd_model_hash", "ss_sd_model_hash")),
)


def _format(key: str, value: str) -> str:
    """A readable value; the raw text when it does not parse as expected."""
    try:
        if key.endswith(("_started_at", "_finished_at")):
            return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if key == "ss_tag_frequency":
            counts: dict[str, int] = {}
            for tags in json.loads(value).values():
                for tag, n in tags.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:20]
            return ", ".join(f"{t} ({n})" for t, n in top) + (f" ... ({len(counts)} tags)" if len(counts) > 20 else "")
        if key == "ss_dataset_dirs":
            dirs = json.loads(value)
            return "; ".join(f"{d}: {v.get('img_count', '?')} images x {v.get('n_repeats', '?')} repeats"
                             for d, v in dirs.items())
        if key == "ss_network_args":
            args = json.loads(value)
            return ", ".join(f"{k}={v}" for k, v in args.items()) if isinstance(args, dict) else value
    except Exception:  # noqa: BLE001 - a card never fails on a value it cannot read
        pass
    text = str(value)
    return text if len(text) <= 300 else text[:300] + f"... ({len(text)} characters)"


def metadata_card(metadata: Mapping[str, str]) -> list[dict]:
    """[{"section", "rows": [[key, readable value], ...]}]; unknown keys go to "Other"."""
    sections, seen = [], set()
    for title, keys in _SECTIONS:
        rows = [[k, _format(k, metadata[k])] for k in keys if k in metadata and str(metadata[k]) not in ("", "None")]
        seen.update(keys)
        if rows:
            sections.append({"section": title, "rows": rows})
    other = [[k, _format(k, v)] for k, v in sorted(metadata.items()) if k not in seen]
    if other:
        sections.append({"section": "Other", "rows": other})
    return sections


def card_text(info: Mapping) -> str:
    """The summary and card as Markdown (the page) or plain text (the terminal reads it too)."""
    lines = [f"**Type:** {info.get('kind')}  ", f"**Base model:** {info.get('base_model')}  ",
             f"**Modules:** {info.get('modules')}, tensors: {info.get('tensors')}, "
             f"parameters: {info.get('parameters'):,}  " if isinstance(info.get("parameters"), int) else ""]
    if info.get("note"):
        lines.append(f"_{info['note']}_")
    lines += ["", "| block | modules | rank | alpha | norm |", "|---|---|---|---|---|"]
    for b in info.get("blocks", []):
        ranks = "/".join(map(str, b["ranks"]))
        alphas = "/".join(f"{a:g}" for a in b["alphas"])
        lines.append(f"| {b['block']} | {b['modules']} | {ranks} | {alphas} | {b['norm']:.4g} |")
    for section in info.get("card", []):
        lines += ["", f"### {section['section']}"]
        lines += [f"- **{k}**: {v}" for k, v in section["rows"]]
    return "\n".join(lines) + "\n"
