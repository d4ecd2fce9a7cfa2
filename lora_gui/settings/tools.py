"""The LoRA tools' jobs (resize, merge, extract, inspect): one declaration per option.

A job is what the page or the command line asks the worker to do; it is saved as ``tool.json`` in
a run folder (worker/protocol.py) and run by ``engine/lora_tools/runner.py``. Each field's
``description`` is its tooltip and its ``--help`` text. pydantic + standard library only (the
web process imports this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from lora_gui.settings.errors import Issue, SettingsError

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
MODEL_SUFFIXES = (".safetensors", ".ckpt")
PRECISIONS = ("float", "fp16", "bf16")
DynamicMethod = Literal["sv_ratio", "sv_cumulative", "sv_fro"]

_OUTPUT = ("Where to write the result. Empty: next to the input, with the tool's suffix. An existing "
           "file is never overwritten: a free name (-1, -2...) is used.")
_DYNAMIC = ("Choose the rank per module from its singular values S (kohya's resize_lora.py): sv_ratio keeps "
            "S_i > S_max / param; sv_cumulative keeps the smallest rank whose sum(S) fraction reaches "
            "param; sv_fro keeps the smallest rank whose Frobenius-norm fraction reaches param. The rank "
            "is then the maximum. Empty: the fixed rank.")


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def inputs(self) -> list[tuple[str, str]]:
        """(field, path) of every file the job reads."""
        return []

    def check_inputs(self) -> None:
        """Every input exists: one sentence per missing file, naming the field."""
        issues = [Issue(name, f"{path or '(empty)'} does not exist: choose an existing file")
                  for name, path in self.inputs() if not path or not Path(path).expanduser().exists()]
        if issues:
            raise SettingsError(issues)


class _Dynamic(BaseModel):
    dynamic_method: DynamicMethod | None = Field(None, description=_DYNAMIC)
    dynamic_param: float | None = Field(None, gt=0, description="The dynamic method's parameter: a ratio >= 1 "
                                        "for sv_ratio, a fraction in (0, 1] for sv_cumulative and sv_fro.")

    @model_validator(mode="after")
    def _dynamic_pair(self):
        if self.dynamic_method and self.dynamic_param is None:
            raise ValueError(f"dynamic_param is needed with dynamic_method {self.dynamic_method}")
        if self.dynamic_method == "sv_ratio" and self.dynamic_param < 1:
            raise ValueError("dynamic_param for sv_ratio is a ratio of at least 1")
        if self.dynamic_method in ("sv_cumulative", "sv_fro") and self.dynamic_param > 1:
            raise ValueError(f"dynamic_param for {self.dynamic_method} is a fraction in (0, 1]")
        return self


class ResizeJob(_Job, _Dynamic):
    """Resize a LoRA to a lower rank by SVD (fixed or dynamic rank)."""

    kind: Literal["resize"] = "resize"
    lora: str = Field(description="The LoRA file to resize (kohya LoRA / LoCon).")
    rank: int = Field(4, ge=1, description="The new rank (the maximum with a dynamic method).")
    conv_rank: int | None = Field(None, ge=1, description="The new rank of 3x3 conv (LoCon) modules; empty: the rank.")
    save_precision: Literal["float", "fp16", "bf16"] = Field("fp16", description="The result's tensor precision.")
    output: str = Field("", description=_OUTPUT)

    def inputs(self):
        return [("lora", self.lora)]


class MergeJob(_Job, _Dynamic):
    """Merge LoRAs into one LoRA, or into a base model saved as one file."""

    kind: Literal["merge"] = "merge"
    loras: list[str] = Field(min_length=1, description="The LoRA files to merge.")
    weights: list[float] = Field(default_factory=list, description="One strength per LoRA (empty: 1.0 each).")
    base: str = Field("", description="A base model (single file or diffusers folder) to merge the LoRAs "
                      "into, saved as one .safetensors file. Empty: merge the LoRAs into one LoRA.")
    config_dir: str = Field("", description="The base's diffusers config folder, when its single file "
                            "does not match a shipped config (rarely needed).")
    mode: Literal["concat", "svd"] = Field("concat", description="Into one LoRA: concat stacks the ranks "
                                           "(exact); svd factorises the sum back to the rank.")
    rank: int = Field(16, ge=1, description="The rank of an svd merge (the maximum with a dynamic method).")
    conv_rank: int | None = Field(None, ge=1, description="The rank of 3x3 conv modules in an svd merge; empty: the rank.")
    save_precision: Literal["float", "fp16", "bf16"] = Field("fp16", description="The result's tensor precision.")
    output: str = Field("", description=_OUTPUT)

    @model_validator(mode="after")
    def _weights(self):
        if self.weights and len(self.weights) != len(self.loras):
            raise ValueError(f"give one weight per LoRA ({len(self.loras)}), not {len(self.weights)}")
        return self

    def inputs(self):
        files = [(f"loras[{i}]", p) for i, p in enumerate(self.loras)]
        return files + ([("base", self.base)] if self.base else [])


class ExtractJob(_Job, _Dynamic):
    """Extract a LoRA from a fine-tuned model and its base."""

    kind: Literal["extract"] = "extract"
    base: str = Field(description="The base model the fine-tuned model was trained from.")
    tuned: str = Field(description="The fine-tuned model (single file or diffusers folder).")
    config_dir: str = Field("", description="The models' diffusers config folder, when a single file "
                            "does not match a shipped config (rarely needed).")
    rank: int = Field(32, ge=1, description="The rank of the LoRA (the maximum with a dynamic method).")
    conv: bool = Field(False, description="Also extract the ResNet convolutions (a LoCon).")
    conv_rank: int | None = Field(None, ge=1, description="The rank of 3x3 conv modules; empty: the rank.")
    min_diff: float = Field(0.0, ge=0, description="Skip modules whose largest weight change is at most this.")
    clamp_quantile: float = Field(1.0, gt=0, le=1, description="Clamp the factors at this quantile of their "
                                  "absolute values (sd-scripts uses 0.99); 1: no clamping.")
    save_precision: Literal["float", "fp16", "bf16"] = Field("fp16", description="The result's tensor precision.")
    output: str = Field("", description=_OUTPUT)

    def inputs(self):
        return [("base", self.base), ("tuned", self.tuned)]


class InspectJob(_Job):
    """Show a LoRA's type, ranks, base model, training settings and block weights."""

    kind: Literal["inspect"] = "inspect"
    lora: str = Field(description="The LoRA file to inspect.")

    def inputs(self):
        return [("lora", self.lora)]


ToolJob = Annotated[ResizeJob | MergeJob | ExtractJob | InspectJob, Field(discriminator="kind")]
TOOL_KINDS = ("resize", "merge", "extract", "inspect")
_ADAPTER = TypeAdapter(ToolJob)


def parse_job(data: dict) -> ResizeJob | MergeJob | ExtractJob | InspectJob:
    """A validated job; a SettingsError names each bad field and what to do."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        issues = [Issue(".".join(str(p) for p in e["loc"][1:]) or str(e["loc"][0]) if e["loc"] else "job",
                        e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        raise SettingsError(issues) from None


def field_order(model) -> list[str]:
    """A job's fields as forms and ``--help`` list them: inputs first, the dynamic-rank pair after the ranks."""
    names = [n for n in model.model_fields if n != "kind"]
    dynamic = [n for n in names if n.startswith("dynamic_")]
    rest = [n for n in names if n not in dynamic]
    required = [n for n in rest if model.model_fields[n].is_required()]
    others = [n for n in rest if n not in required]
    at = next((i + 1 for i, n in enumerate(others) if n == "conv_rank"), len(others))
    return required + others[:at] + dynamic + others[at:]


def job_document(job) -> dict:
    return job.model_dump(mode="json")


def default_output(job) -> Path:
    """The output the job writes when ``output`` is empty: next to its (first) input."""
    if job.kind == "resize":
        src = Path(job.lora)
        tag = f"{job.dynamic_method}-{job.dynamic_param:g}" if job.dynamic_method else f"r{job.rank}"
        return src.with_name(f"{src.stem}_{tag}.safetensors")
    if job.kind == "merge":
        src = Path(job.base or job.loras[0])
        return src.with_name(f"{src.stem if src.suffix else src.name}_merged.safetensors")
    if job.kind == "extract":
        src = Path(job.tuned)
        return src.with_name(f"{src.stem if src.suffix else src.name}_extracted_r{job.rank}.safetensors")
    raise ValueError(f"The {job.kind} tool writes no file.")


def free_path(path: str | Path) -> Path:
    """``path`` if nothing is there, else the first free ``name-1.ext``, ``name-2.ext``..."""
    path = Path(path).expanduser()
    if not path.suffix:
        path = path.with_name(path.name + ".safetensors")
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
