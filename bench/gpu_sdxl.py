"""7. SDXL LoRA training on a GPU at 1024 px: it/s, peak VRAM, and the pre-run estimate beside it.

An SDXL-base-1.0-shaped model with random weights, built from the shipped configs in
``lora_gui/engine/configs/sdxl`` (nothing is downloaded), trained the way the engine trains SDXL
on CUDA: the SDXL family's conditioning (``lora_gui.engine.families.sdxl``: both text encoders'
penultimate states + bigG's pooled projection, the six size/crop numbers) and LoRA naming, frozen
weights in bf16 (or the U-Net in fp8 storage with ``--fp8``), LoRA rank 32 in fp32, bf16 autocast,
SDPA, AdamW8bit when bitsandbytes has CUDA kernels (else AdamW), gradient clipping at 1.0, cached
latents (random, 4x128x128 at 1024 px) and cached text conditioning (text encoders frozen and moved
off the GPU, the usual SDXL LoRA setting). Batch 1 and 2, gradient checkpointing off and on; it/s
between ``torch.cuda.synchronize()`` calls after warm-up, ``torch.cuda.max_memory_allocated()``,
and the engine's estimate (``lora_gui.engine.memory``) for the same configuration.

    python bench/gpu_sdxl.py                  # on a CUDA machine; --report appends to BENCHMARKS.md
    python bench/gpu_sdxl.py --smoke          # CPU: the tiny SDXL demo model at 64 px (CI)

Not part of ``python -m bench`` (the CPU suite); ``tests/test_bench_smoke.py`` runs --smoke.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ("resolution", "batch", "grad. checkpointing", "U-Net storage", "it/s", "images/s",
           "peak VRAM (GiB)", "estimate (GiB)", "peak RSS (MB)")


def build(args, device):
    """The SDXL model object the family works on (random weights), and its training schedule."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_gui.engine.families.sdxl import SHIPPED, SDXLModel, _tokenizers
    from lora_gui.engine.families.sdxl_demo import tiny_sdxl_pipeline

    torch.manual_seed(0)
    if args.smoke:
        pipe = tiny_sdxl_pipeline(0)
        parts = (pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.unet)
    else:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SHIPPED), subfolder="unet"))
            te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(SHIPPED / "text_encoder")))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(SHIPPED / "text_encoder_2")))
        parts = (*_tokenizers(SHIPPED), te1, te2, unet)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    model = SDXLModel(*parts, vae=None, noise_scheduler=scheduler, prediction_type="epsilon")
    for module in (model.unet, model.text_encoder, model.text_encoder_2):
        module.requires_grad_(False).to(device)
    return model


def prepare(args, device, model, fp8: bool):
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lora_gui.engine.families.sdxl import StableDiffusionXL
    from lora_gui.engine.fp8 import store_in_fp8
    from lora_gui.engine.network import NetworkSpec

    family = StableDiffusionXL()
    weight_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    settings = SimpleNamespace(labels=SimpleNamespace(max_token_length=75))
    with torch.no_grad():  # frozen encoders, static captions: encoded once, then off the GPU
        text = family.encode_text(model, ["a photo of a cat"], settings, device)
    model.text_encoder.to("cpu")
    model.text_encoder_2.to("cpu")
    if weight_dtype != torch.float32:
        model.unet.to(dtype=weight_dtype)
    if fp8:
        store_in_fp8(model.unet, weight_dtype)
    model.unet.set_attn_processor(AttnProcessor2_0())
    spec = NetworkSpec(rank=args.rank, alpha=args.rank / 2, train_text_encoder=False)
    network = family.apply_network(model, spec)
    model.unet.train()
    return family, network, text, weight_dtype


def optimizer_for(params, device):
    import torch

    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-4), "AdamW8bit"
        except Exception:  # noqa: BLE001 - no CUDA kernels: plain AdamW
            pass
    return torch.optim.AdamW(params, lr=1e-4), "AdamW"


def estimate_gib(family, model, network, text, batch, args, checkpointing, optimizer_name, device) -> float:
    from lora_gui.dataset.memory import GIB
    from lora_gui.engine.memory import run_estimate, unet_activation_bytes

    activations = unet_activation_bytes(family, model, network.spec, text, batch=batch, width=args.resolution,
                                        height=args.resolution, checkpointing=checkpointing)
    lora = sum(p.numel() for p in network.unet_parameters())
    est = run_estimate(frozen=[model.unet], lora_params=lora, optimizer=optimizer_name, activations=activations,
                       gpu=device.type == "cuda")
    return est.total / GIB


def measure(args, device, family, model, network, text, weight_dtype, batch, checkpointing, fp8) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from lora_gui.engine.families.sdxl_condition import time_ids

    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    params = network.unet_parameters()
    optimizer, optimizer_name = optimizer_for(params, device)
    side = args.resolution // 8
    gen = torch.Generator(device).manual_seed(batch)
    latents = torch.randn((batch, 4, side, side), generator=gen, device=device)  # "cached latents"
    cond = tuple(t.expand(batch, *t.shape[1:]).to(device) for t in text)
    extra = time_ids([(args.resolution, args.resolution)] * batch, [(0, 0)] * batch,
                     (args.resolution, args.resolution)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")

    def step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = family.add_noise(model, latents, noise, timesteps)
        with autocast:
            pred = family.predict(model, noisy, timesteps, cond, extra, weight_dtype)
        loss = F.mse_loss(pred.float(), family.target(model, latents, noise, timesteps).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {float(loss)}")
    return {"resolution": args.resolution, "batch": batch, "checkpointing": checkpointing,
            "storage": "fp8" if fp8 else ("bf16" if weight_dtype == torch.bfloat16 else "fp32"),
            "it_s": args.steps / seconds, "images_s": args.steps * batch / seconds,
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "estimate_gib": estimate_gib(family, model, network, text, batch, args, checkpointing,
                                         optimizer_name, device),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def table(results: list[dict]) -> str:
    def cell(v):
        return "-" if isinstance(v, float) and v != v else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    for r in results:
        row = (r["resolution"], r["batch"], "on" if r["checkpointing"] else "off", r["storage"], r["it_s"],
               r["images_s"], r["peak_vram_gib"], r["estimate_gib"], f"{r['peak_rss_mb']:.0f}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny SDXL demo model at 64 px on a CPU (CI)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; smoke 64)")
    parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes (default 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--fp8", action="store_true", help="store the frozen U-Net in fp8")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32, no autocast")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    parser.add_argument("--report", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.smoke else 1024)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    what = "tiny SDXL demo model (smoke)" if args.smoke else "SDXL base 1.0 shapes, random weights"
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"gpu_sdxl: {what}, {args.resolution} px, LoRA rank {args.rank}, {'fp8' if args.fp8 else 'bf16'} "
          f"U-Net, {args.steps} timed steps after {args.warmup} warm-up; device {name}; torch {torch.__version__}",
          flush=True)
    t0 = time.perf_counter()
    model = build(args, device)
    family, network, text, weight_dtype = prepare(args, device, model, args.fp8)
    print(f"built the model in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for checkpointing in (False, True):
            try:
                results.append(measure(args, device, family, model, network, text, weight_dtype, batch,
                                       checkpointing, args.fp8))
            except torch.cuda.OutOfMemoryError:
                results.append({"resolution": args.resolution, "batch": batch, "checkpointing": checkpointing,
                                "storage": "fp8" if args.fp8 else "bf16", "it_s": float("nan"),
                                "images_s": float("nan"), "peak_vram_gib": float("nan"),
                                "estimate_gib": float("nan"), "peak_rss_mb": float("nan")})
                torch.cuda.empty_cache()
    text_table = table(results)
    print(text_table, flush=True)
    if args.report:
        from bench import common

        section = common.Section(f"7. SDXL LoRA on {name}", text_table,
                                 [f"{what}, {args.resolution} px, rank {args.rank}, {args.steps} timed steps "
                                  f"after {args.warmup} warm-up steps."], {"results": results})
        common.append_report([section])
    return 0


if __name__ == "__main__":
    sys.exit(main())
