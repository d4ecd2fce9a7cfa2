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

import functools
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, gpu_common  # noqa: E402

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
    import torch
    import torch.nn.functional as F

    from lora_gui.engine.families.sdxl_condition import time_ids

    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    params = network.unet_parameters()
    optimizer, optimizer_name = gpu_common.optimizer_for(params, device)
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
        return gpu_common.optimizer_step(loss, params, optimizer)

    timing = gpu_common.timed_loop(step, device, batch=batch, warmup=args.warmup, steps=args.steps)
    return {"resolution": args.resolution, "batch": batch, "checkpointing": checkpointing,
            "storage": "fp8" if fp8 else ("bf16" if weight_dtype == torch.bfloat16 else "fp32"), **timing,
            "estimate_gib": estimate_gib(family, model, network, text, batch, args, checkpointing,
                                         optimizer_name, device)}


def table(results: list[dict]) -> str:
    """The table of gpu_sdxl.py and gpu_flux.py (which calls its storage column "base storage")."""
    return common.markdown_table(HEADERS, [
        (r["resolution"], r["batch"], "on" if r["checkpointing"] else "off", r["storage"], r["it_s"],
         r["images_s"], r["peak_vram_gib"], r["estimate_gib"], common.fmt(r["peak_rss_mb"], 0)) for r in results])


def parse(argv):
    parser = gpu_common.parser(__doc__.splitlines()[0], smoke="the tiny SDXL demo model at 64 px on a CPU (CI)",
                               resolution=1024, batches="1,2", steps=10, warmup=3, rank=32)
    parser.add_argument("--fp8", action="store_true", help="store the frozen U-Net in fp8")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32, no autocast")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    return gpu_common.parse(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = gpu_common.device_for(args.cpu)
    what = "tiny SDXL demo model (smoke)" if args.smoke else "SDXL base 1.0 shapes, random weights"
    name = gpu_common.device_name(device)
    print(f"gpu_sdxl: {what}, {args.resolution} px, LoRA rank {args.rank}, {'fp8' if args.fp8 else 'bf16'} "
          f"U-Net, {args.steps} timed steps after {args.warmup} warm-up; device {name}; torch {torch.__version__}",
          flush=True)
    t0 = time.perf_counter()
    model = build(args, device)
    family, network, text, weight_dtype = prepare(args, device, model, args.fp8)
    print(f"built the model in {time.perf_counter() - t0:.1f} s", flush=True)
    results = gpu_common.grid(args.batches, functools.partial(
        measure, args, device, family, model, network, text, weight_dtype, fp8=args.fp8), resolution=args.resolution, storage="fp8" if args.fp8 else "bf16")
    gpu_common.publish(f"7. SDXL LoRA on {name}", table(results),
                       [f"{what}, {args.resolution} px, rank {args.rank}, {args.steps} timed steps "
                        f"after {args.warmup} warm-up steps."], results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
