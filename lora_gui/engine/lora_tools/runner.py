"""A tool job as a worker run: progress events per module, Stop between modules, a free output name.

``run_tool(job, emit, commands, run_dir)`` is what ``worker/child.py`` calls for a run folder that
holds a ``tool.json``. The result's numbers (kept energy per module, file sizes, the inspect card)
go to ``run_dir/result.json`` (``tool``: the job's kind, ``output``: the file written, or "" for
inspect); the Finished event's ``output_path`` is the file written (inspect: result.json).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lora_gui.atomic import atomic_path, write_json
from lora_gui.engine.metadata import base_model_name, with_hashes
from lora_gui.engine.model_files import ModelLoadError, read_state_dict
from lora_gui.engine.network import load_lora_file, save_lora
from lora_gui.events import Failed, Finished, Progress, Started, Stop
from lora_gui.settings.tools import default_output, free_path

from .checkpoint import read_base
from .extract import extract_lora
from .inspection import card_text, inspect_lora
from .merge import apply_deltas, lora_deltas, merge_loras
from .modules import LoraFormatError
from .resize import resize_lora, resize_metadata

RESULT_FILE = "result.json"
DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ToolStopped(Exception):
    """Stop arrived between two modules: nothing is written."""

    def __init__(self, done: int):
        super().__init__(f"stopped after {done} modules")
        self.done = done


class Ticker:
    """The tools' progress callback: a Progress event per module, and the Stop check."""

    def __init__(self, phase: str, emit: Callable, commands):
        self.phase, self.emit, self.commands = phase, emit, commands
        self.start = time.monotonic()
        self.done = 0

    def __call__(self, done: int, total: int, name: str = "") -> None:
        self.done = done
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        self.emit(Progress(step=done, total_steps=total, epoch=0, epochs=0, elapsed_s=elapsed,
                           steps_per_s=rate, eta_s=(total - done) / rate if rate > 0 else 0.0,
                           phase=self.phase))
        if any(isinstance(c, Stop) for c in self.commands.poll()):
            raise ToolStopped(done)


def _write_lora(job, tensors: dict, metadata: dict[str, str]) -> Path:
    path = free_path(job.output or default_output(job))
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("safetensors", "ckpt", "pt"):
        raise ValueError(f"output: {path.name} must end in .safetensors, .ckpt or .pt.")
    return save_lora(path, tensors, with_hashes(tensors, metadata) if fmt == "safetensors" else None, fmt)


def _resize(job, tick: Ticker) -> tuple[Path, dict]:
    sd, metadata = load_lora_file(job.lora)
    tensors, reports = resize_lora(sd, job.rank, conv_rank=job.conv_rank, dynamic_method=job.dynamic_method,
                                   dynamic_param=job.dynamic_param, dtype=DTYPES[job.save_precision], progress=tick)
    meta = resize_metadata(metadata, reports, job.rank, job.conv_rank, job.dynamic_method, job.dynamic_param)
    path = _write_lora(job, tensors, meta)
    fro = [r.fro_retained for r in reports]
    return path, {
        "input_size": Path(job.lora).stat().st_size, "output_size": path.stat().st_size,
        "mean_fro_retained": sum(fro) / len(fro), "min_fro_retained": min(fro),
        "modules": [r.__dict__ for r in reports],
    }


def _merge(job, tick: Ticker) -> tuple[Path, dict]:
    weights = job.weights or [1.0] * len(job.loras)
    files = [load_lora_file(p) for p in job.loras]
    if job.base:
        return _merge_into_base(job, files, weights, tick)
    tensors = merge_loras([(sd, w) for (sd, _), w in zip(files, weights)], job.mode, rank=job.rank,
                          conv_rank=job.conv_rank, dynamic_method=job.dynamic_method,
                          dynamic_param=job.dynamic_param, dtype=DTYPES[job.save_precision], progress=tick)
    first = files[0][1]
    ranks = {int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_down.weight")}
    meta = {k: first[k] for k in ("ss_base_model_version", "ss_sd_model_name", "ss_v2") if k in first}
    meta.update({"ss_network_module": "networks.lora",
                 "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                 "ss_network_alpha": "Dynamic",
                 "ss_training_comment": "merged by lora-gui from " + ", ".join(
                     f"{Path(p).name} ({w:g})" for p, w in zip(job.loras, weights)) + f", {job.mode}"})
    path = _write_lora(job, tensors, meta)
    return path, {"output_size": path.stat().st_size, "loras": job.loras, "weights": weights, "mode": job.mode}


def _merge_into_base(job, files, weights, tick: Ticker) -> tuple[Path, dict]:
    base = read_base(job.base, job.config_dir or None)
    total: dict[str, torch.Tensor] = {}
    for i, ((sd, _), w) in enumerate(zip(files, weights)):
        for name, delta in lora_deltas(sd, w, what=Path(job.loras[i]).name).items():
            total[name] = total[name] + delta if name in total else delta
        tick(i + 1, len(files) + 1, Path(job.loras[i]).name)
    merged, missing = apply_deltas(base.state, base.key_map, total)
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules have no layer in the base model (e.g. {missing[0]}): "
                         "the LoRA was made for another kind of model.")
    path = free_path(job.output or default_output(job))
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"output: a merged model is written as .safetensors, not {path.suffix}.")
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp), metadata={"format": "pt"})
    tick(len(files) + 1, len(files) + 1, path.name)
    return path, {"output_size": path.stat().st_size, "modules_merged": len(total), "family": base.family}


def _extract(job, tick: Ticker) -> tuple[Path, dict]:
    base = read_base(job.base, job.config_dir or None)
    tuned_path = Path(job.tuned).expanduser()
    tuned = read_base(tuned_path, job.config_dir or None).state if tuned_path.is_dir() else read_state_dict(tuned_path)
    tensors, kept = extract_lora(base, tuned, job.rank, conv_rank=job.conv_rank, conv=job.conv,
                                 dynamic_method=job.dynamic_method, dynamic_param=job.dynamic_param,
                                 min_diff=job.min_diff, clamp_quantile=job.clamp_quantile,
                                 dtype=DTYPES[job.save_precision], progress=tick)
    if not tensors:
        raise ValueError("The two models have the same weights in every LoRA layer: nothing to extract "
                         "(check tuned and base, or lower min_diff).")
    dim = "Dynamic" if job.dynamic_method else str(job.rank)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
            "ss_base_model_version": "sd_v2" if base.family == "sd2" else "sd_v1",
            "ss_v2": str(base.family == "sd2"), "ss_sd_model_name": base_model_name(job.base),
            "ss_training_comment": f"extracted by lora-gui from {Path(job.tuned).name} - {Path(job.base).name}"}
    if job.conv:
        conv = str(job.conv_rank or job.rank)
        meta["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": conv})
    path = _write_lora(job, tensors, meta)
    values = list(kept.values())
    return path, {"output_size": path.stat().st_size, "modules": len(kept),
                  "mean_fro_retained": sum(values) / len(values), "kept_energy": kept}


def _inspect(job, tick: Ticker) -> tuple[None, dict]:
    sd, metadata = load_lora_file(job.lora)
    info = inspect_lora(sd, metadata)
    info["file_size"] = Path(job.lora).stat().st_size
    info["card_text"] = card_text(info)
    tick(1, 1, Path(job.lora).name)
    return None, info


RUNNERS = {"resize": _resize, "merge": _merge, "extract": _extract, "inspect": _inspect}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ModelLoadError, LoraFormatError)


def run_tool(job, emit: Callable, commands, run_dir: str | Path) -> None:
    """Run one job; always ends with Finished (done or stopped) or Failed with a sentence."""
    run_dir = Path(run_dir)
    emit(Started(total_steps=0, steps_per_epoch=0, epochs=0, num_train_images=0, num_reg_images=0,
                 device="cpu", output_dir=str(run_dir)))
    tick = Ticker(job.kind, emit, commands)
    try:
        with torch.no_grad():
            output, result = RUNNERS[job.kind](job, tick)
    except ToolStopped as stop:
        emit(Finished(step=stop.done, output_path="", stopped=True))
        return
    except USER_ERRORS as exc:
        emit(Failed(message=str(exc), step=tick.done))
        return
    result = {**result, "tool": job.kind, "output": str(output) if output else ""}
    report = write_json(run_dir / RESULT_FILE, result, indent=1)
    emit(Finished(step=tick.done, output_path=str(output or report), files=(str(report),)))
