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
# NF4 (bitsandbytes, double quantization as its Linear4bit default): 4 bits per weight, an 8-bit absmax per
# 64 weights and a float32 scale per 256 of those. Every parameter counts as stored so (the biases
# and norms that stay 16-bit are < 0.1% of a U-Net's or Flux's parameters), as every one does for fp8.
WEIGHT_BYTES = {"float32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
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
    with and without gradient checkpointing (from a meta-device trace; see the test).
    A transformer's activations grow with its text tokens too: ``px_per_text_token`` latent pixels
    each (Flux: one token per 2x2 latent pixels, so a text token costs what 4 latent pixels do).
    ``blocks``: (how many, parameters of one) per kind of swappable block (Flux: double, single)."""

    unet_params: int
    te_params: int
    vae_params: int
    lora_per_rank_unet: int
    lora_per_rank_te: int
    act_checkpointed: float
    act_full: float
    px_per_text_token: int = 0
    blocks: tuple[tuple[int, int], ...] = ()


def swap_split(n: int) -> tuple[int, int]:
    """sd-scripts' split of ``blocks_to_swap`` N for Flux (a single block is about half a double
    block): N // 2 double blocks and 2 (N - N // 2) single blocks."""
    return n // 2, 2 * (n - n // 2)


def most_swappable(num_double: int, num_single: int) -> int:
    """The largest ``blocks_to_swap`` whose split a transformer with these blocks has."""
    fits = lambda n: swap_split(n)[0] <= num_double and swap_split(n)[1] <= num_single  # noqa: E731
    return max(n for n in range(2 * num_double + 2) if fits(n))


def swapped_bytes(fp: Footprint, n: int, bytes_per_param: float) -> int:
    """Weights that ``blocks_to_swap`` = n keeps off the device: the swapped blocks' minus the one
    block that is on the device while it computes."""
    if not n or not fp.blocks:
        return 0
    counts = swap_split(n)
    swapped = [(min(k, total), params) for k, (total, params) in zip(counts, fp.blocks, strict=True)]
    away = sum(k * params for k, params in swapped) - max(params for k, params in swapped if k)
    return int(away * bytes_per_param)


def estimate(fp: Footprint, *, width: int, height: int, batch: int, rank: int, optimizer: str,
             precision: str, unet_precision: str | None = None, checkpointing: bool,
             train_te: bool, te_cached: bool, fixed_vae: bool = True, text_tokens: int = 0,
             blocks_to_swap: int = 0) -> MemoryEstimate:
    """The page's estimate for a family at a resolution (the largest bucket) and batch size
    (``text_tokens``: the transformer's text length; ``blocks_to_swap``: Flux's block swap)."""
    wb = WEIGHT_BYTES[precision]
    te_on_device = train_te or not te_cached
    unet_bytes = WEIGHT_BYTES[unet_precision or precision]
    weights = int(fp.unet_params * unet_bytes) - swapped_bytes(fp, blocks_to_swap, unet_bytes)
    weights += (fp.te_params * wb if te_on_device else 0) + fp.vae_params * (4 if not fixed_vae else wb)
    lora = rank * (fp.lora_per_rank_unet + (fp.lora_per_rank_te if train_te else 0))
    per_px = fp.act_checkpointed if checkpointing else fp.act_full
    pixels = (width // 8) * (height // 8) + fp.px_per_text_token * text_tokens
    activations = int(per_px * pixels * batch * (wb / 2))
    return MemoryEstimate(weights, trainable_bytes(lora, optimizer), activations)


# Measured on the shipped configs (tests/test_memory_estimate.py re-traces them): SD 1.5, SD 2.x
# 768-v, SDXL base 1.0, FLUX.1-dev; activations in bf16 per latent pixel at 512 px (SD), 768 px
# (SD 2.x) and 1024 px (SDXL; Flux with 512 T5 tokens, each counted as 4 latent pixels). Flux: the
# text encoders are CLIP-L + T5-XXL, the LoRA sd-scripts' lora_flux default (all blocks, with the
# modulation linears), the blocks 19 double and 38 single; schnell lacks only the guidance embedder
# (0.1% of the parameters) and uses the same footprint.
FOOTPRINTS = {
    "sd1": Footprint(859_520_964, 123_060_480, 83_653_863, 423_936, 165_888, 87_561, 266_336),
    "sd2": Footprint(865_910_724, 340_387_840, 83_653_863, 432_128, 423_936, 75_373, 255_935),
    "sdxl": Footprint(2_567_463_684, 817_720_320, 83_653_863, 2_659_840, 903_168, 111_087, 471_877),
    "flux": Footprint(11_901_408_320, 123_060_480 + 4_762_310_656, 83_819_683, 5_369_856, 0, 225_005, 2_575_266,
                      px_per_text_token=4, blocks=((19, 339_831_296), (38, 141_591_808))),
}


def guess_family(base_model: str) -> str | None:
    """"sd", "sdxl" or "flux" from a diffusers folder's ``model_index.json`` or a safetensors file's header
    (JSON, read without torch); None when it cannot be told this cheaply (a .ckpt, a missing path)."""
    path = Path(base_model.strip()).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            if "Flux" in str(index.get("_class_name", "")):
                return "flux"
            return "sdxl" if "text_encoder_2" in index else "sd"
        if path.is_file() and path.suffix.lower() in (".safetensors", ".sft"):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                keys = json.loads(f.read(min(size, 100_000_000)).decode("utf-8")) if size < 2**27 else {}
            if any(k.startswith("conditioner.embedders.") for k in keys):
                return "sdxl"
            if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
                return "flux"
            if any(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in keys):
                return "sd"
    except (OSError, ValueError):
        return None
    return None


def effective_family(family: str, base_model: str) -> str | None:
    """The family a run will use: the explicit choice, or with "auto" the guessed one."""
    return family if family != "auto" else guess_family(base_model)


def _form_estimate(settings, largest_bucket: tuple[int, int]) -> tuple[Footprint, dict] | None:
    """The footprint and the estimate's arguments for the form's settings (None: family unknown)."""
    m, tr, adv = settings.model, settings.training, settings.advanced
    family = effective_family(m.family, m.base_model)
    if family is None:
        return None
    fp = FOOTPRINTS["flux" if family == "flux" else "sdxl" if family == "sdxl" else ("sd2" if m.v2 else "sd1")]
    lab = settings.labels
    static = not (lab.shuffle_caption or lab.caption_dropout_rate or lab.caption_tag_dropout_rate
                  or lab.caption_dropout_every_n_epochs)
    flux = family == "flux"
    return fp, dict(
        width=largest_bucket[0], height=largest_bucket[1], batch=tr.batch_size, rank=tr.network_dim,
        optimizer=tr.optimizer, precision={"no": "float32", "bf16": "bf16", "fp16": "fp16"}[tr.mixed_precision],
        unet_precision="nf4" if adv.nf4_base else "fp8" if adv.fp8_base else None,
        checkpointing=tr.gradient_checkpointing, train_te=settings.train_text_encoder and not flux, te_cached=static,
        text_tokens=(adv.t5xxl_max_token_length or 512) if flux else 0,  # 512: dev's (the page cannot tell schnell)
        blocks_to_swap=adv.blocks_to_swap if flux else 0)


def preview_estimate(settings, largest_bucket: tuple[int, int]) -> MemoryEstimate | None:
    """The page's estimate for the form's settings (None when the family cannot be told)."""
    found = _form_estimate(settings, largest_bucket)
    return None if found is None else estimate(found[0], **found[1])


USABLE = 0.95  # of a GPU's memory a recommendation fills at most (allocator fragmentation, the display)


def _candidates(fp: Footprint, kw: dict) -> list[tuple[str, dict]]:
    """Configurations from the fastest and most precise to the most frugal: 16-bit base without and
    with gradient checkpointing, fp8 storage, fp8 + the fewest swapped blocks that fit (Flux), NF4."""
    base = f"{kw['precision']} base"
    out = [(f"{base}, no gradient checkpointing", {"unet_precision": None, "checkpointing": False}),
           (f"{base}, gradient checkpointing", {"unet_precision": None, "checkpointing": True}),
           ("fp8 base storage, gradient checkpointing", {"unet_precision": "fp8", "checkpointing": True})]
    if fp.blocks:
        most = most_swappable(fp.blocks[0][0], fp.blocks[1][0])
        out += [(f"fp8 base storage, gradient checkpointing, blocks_to_swap {n}",
                 {"unet_precision": "fp8", "checkpointing": True, "blocks_to_swap": n}) for n in range(1, most + 1)]
    out.append(("NF4 base storage, gradient checkpointing", {"unet_precision": "nf4", "checkpointing": True}))
    return out


def recommend(settings, largest_bucket: tuple[int, int], gpu_bytes: int) -> str | None:
    """A configuration for a GPU of ``gpu_bytes``: the first of ``_candidates`` whose estimate (at the
    form's resolution, batch, rank and optimizer, text-encoder outputs cached) fits in USABLE of it."""
    found = _form_estimate(settings, largest_bucket)
    if found is None:
        return None
    fp, kw = found
    kw = {**kw, "te_cached": True, "blocks_to_swap": 0}
    limit = USABLE * gpu_bytes
    sized = [(name, change, estimate(fp, **{**kw, **change})) for name, change in _candidates(fp, kw)]
    gpu = f"For a {gpu_bytes / GIB:.0f} GB GPU at {largest_bucket[0]}x{largest_bucket[1]}"
    chosen = next(((name, change, est) for name, change, est in sized if est.total <= limit), None)
    nf4_name, _, nf4 = sized[-1]
    if chosen is None:
        return (f"{gpu}: even {nf4_name} needs about {nf4.total / GIB:.1f} GB; lower the resolution, the batch "
                "size or the rank.")
    name, change, est = chosen
    cached = "" if kw["train_te"] else ", cached text-encoder outputs (captions without shuffling or dropout)"
    line = f"{gpu}: {name}{cached} (estimated {est.total / GIB:.1f} GB)."
    if "blocks_to_swap" in change and nf4.total <= limit:
        line += f" Or, without swapping, {nf4_name} ({nf4.total / GIB:.1f} GB): faster, at some quality cost."
    return line
