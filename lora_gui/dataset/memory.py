"""Peak accelerator memory of a LoRA run, estimated before it starts. Arithmetic only (no torch),
so the page's preview can show it; the engine fills in exact parameter counts and a traced
activation size (``lora_gui.engine.memory``).

peak = frozen weights (in their storage precision)
     + LoRA weights, their gradients and the optimizer's state (float32)
     + activations kept for the backward pass at the largest bucket and the batch size
     + the framework's own working memory (CUDA context, allocator slack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30

# Optimizer state in bytes per trainable float32 parameter: Adam keeps two moments (8 bytes),
# bitsandbytes' 8-bit Adam two 1-byte moments (+ block scales, ~2), Lion one moment, SGD with
# momentum one; Prodigy keeps exp_avg, exp_avg_sq, s and the initial weights (16); D-Adapt Adam
# three (12); Adafactor without momentum keeps factored row/column second moments (~1).
OPTIMIZER_STATE_BYTES = {
    "AdamW": 8, "AdamW8bit": 2, "Lion": 4, "SGDNesterov": 4, "Prodigy": 16, "DAdaptAdam": 12, "Adafactor": 1,
}  # fmt: skip
WEIGHT_BYTES = {"float32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FRAMEWORK_BYTES = int(0.75 * GIB)  # CUDA context + allocator reserve seen beside a training loop (GPU only)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of the peak."""

    weights: int
    trainable: int  # LoRA weights + gradients + optimizer state
    activations: int
    framework: int = FRAMEWORK_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.framework

    def sentence(self) -> str:
        def gib(b: int) -> str:
            return f"{b / GIB:.1f} GB" if b >= GIB / 10 else f"{b / 2**20:.1f} MB"

        return (
            f"Estimated peak memory: {gib(self.total)} (frozen weights {gib(self.weights)}, LoRA with gradients "
            f"and optimizer state {gib(self.trainable)}, activations {gib(self.activations)}, "
            f"framework {gib(self.framework)})."
        )


def trainable_bytes(lora_params: int, optimizer: str) -> int:
    """LoRA weights (fp32) + their fp32 gradients + the optimizer's state."""
    return lora_params * (4 + 4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8))


@dataclass(frozen=True)
class Footprint:
    """A family's sizes at full scale, for the page's estimate (the engine measures the real model).

    ``*_params``: parameter counts; ``lora_per_rank``: LoRA parameters per unit of rank (U-Net,
    text encoders); ``act_*``: activation bytes per latent pixel per sample in 16-bit precision,
    with and without gradient checkpointing (from a meta-device trace; see the test)."""

    unet_params: int
    te_params: int
    vae_params: int
    lora_per_rank_unet: int
    lora_per_rank_te: int
    act_checkpointed: float
    act_full: float


def estimate(fp: Footprint, *, width: int, height: int, batch: int, rank: int, optimizer: str,
             precision: str, unet_precision: str | None = None, checkpointing: bool,
             train_te: bool, te_cached: bool, fixed_vae: bool = True) -> MemoryEstimate:
    """The page's estimate for a family at a resolution (the largest bucket) and batch size."""
    wb = WEIGHT_BYTES[precision]
    te_on_device = train_te or not te_cached
    weights = fp.unet_params * WEIGHT_BYTES[unet_precision or precision]
    weights += (fp.te_params * wb if te_on_device else 0) + fp.vae_params * (4 if not fixed_vae else wb)
    lora = rank * (fp.lora_per_rank_unet + (fp.lora_per_rank_te if train_te else 0))
    per_px = fp.act_checkpointed if checkpointing else fp.act_full
    activations = int(per_px * (width // 8) * (height // 8) * batch * (wb / 2))
    return MemoryEstimate(weights, trainable_bytes(lora, optimizer), activations)


# Measured on the shipped configs (tests/test_memory_estimate.py re-traces them): SD 1.5, SD 2.x
# 768-v, SDXL base 1.0; activations in bf16 per latent pixel at 512 px (SD) and 1024 px (SDXL).
FOOTPRINTS = {
    "sd1": Footprint(859_520_964, 123_060_480, 83_653_863, 423_936, 165_888, 107_291, 266_336),
    "sd2": Footprint(865_910_724, 340_387_840, 83_653_863, 432_128, 423_936, 95_452, 255_935),
    "sdxl": Footprint(2_567_463_684, 817_720_320, 83_653_863, 2_659_840, 903_168, 167_832, 471_877),
}


def guess_family(base_model: str) -> str | None:
    """"sd" or "sdxl" from a diffusers folder's ``model_index.json`` or a safetensors file's header
    (JSON, read without torch); None when it cannot be told this cheaply (a .ckpt, a missing path)."""
    path = Path(base_model.strip()).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            return "sdxl" if "text_encoder_2" in index else "sd"
        if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                keys = json.loads(f.read(min(size, 100_000_000)).decode("utf-8")) if size < 2**27 else {}
            if any(k.startswith("conditioner.embedders.") for k in keys):
                return "sdxl"
            if any(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in keys):
                return "sd"
    except (OSError, ValueError):
        return None
    return None


def effective_family(family: str, base_model: str) -> str | None:
    """The family a run will use: the explicit choice, or with "auto" the guessed one."""
    return family if family != "auto" else guess_family(base_model)


def preview_estimate(settings, largest_bucket: tuple[int, int]) -> MemoryEstimate | None:
    """The page's estimate for the form's settings (None when the family cannot be told)."""
    m, tr, adv = settings.model, settings.training, settings.advanced
    family = effective_family(m.family, m.base_model)
    if family is None:
        return None
    fp = FOOTPRINTS["sdxl" if family == "sdxl" else ("sd2" if m.v2 else "sd1")]
    lab = settings.labels
    static = not (lab.shuffle_caption or lab.caption_dropout_rate or lab.caption_tag_dropout_rate
                  or lab.caption_dropout_every_n_epochs)
    precision = {"no": "float32", "bf16": "bf16", "fp16": "fp16"}[tr.mixed_precision]
    return estimate(fp, width=largest_bucket[0], height=largest_bucket[1], batch=tr.batch_size,
                    rank=tr.network_dim, optimizer=tr.optimizer, precision=precision,
                    unet_precision="fp8" if adv.fp8_base else None, checkpointing=tr.gradient_checkpointing,
                    train_te=settings.train_text_encoder, te_cached=static)
