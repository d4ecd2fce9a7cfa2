"""6. SD-1.5-shaped LoRA training on a GPU: it/s and peak VRAM.

An SD-1.5-shaped U-Net (block_out_channels 320/640/1280/1280, cross_attention_dim 768,
attention_head_dim 8, layers_per_block 2) and a CLIP-L-shaped text encoder (hidden 768, 12 layers,
12 heads, intermediate 3072), both with random weights built from the shipped configs in
``lora_gui/engine/configs/sd15`` (nothing is downloaded). As the engine does on CUDA: frozen weights
in bf16, LoRA rank 32 in fp32 via ``lora_gui.engine.network.LoraNetwork``, bf16 autocast, SDPA
attention, AdamW, gradient clipping at 1.0; cached latents (random, 4x64x64 for 512 px) and cached
text-encoder states (text encoder frozen), or the text encoder trained with ``--train-text-encoder``.
Batch 1 and 4, gradient checkpointing off and on; it/s after warm-up steps between
``torch.cuda.synchronize()`` calls, and ``torch.cuda.max_memory_allocated()`` (weights included).

    python bench/gpu_sd15.py                  # on a CUDA machine; --report appends to BENCHMARKS.md
    python bench/gpu_sd15.py --smoke          # CPU: a few steps, tiny widths, 64 px (CI)

Not part of ``python -m bench`` (that is the CPU suite); ``tests/test_bench_smoke.py`` runs --smoke.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common, gpu_common  # noqa: E402

CONFIGS = ROOT / "lora_gui" / "engine" / "configs" / "sd15"
HEADERS = ("resolution", "batch", "grad. checkpointing", "text encoder", "it/s", "images/s",
           "peak VRAM (GiB)", "peak RSS (MB)")


def unet_config(smoke: bool) -> dict:
    config = json.loads((CONFIGS / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if smoke:  # the same block structure, tiny widths
        config.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, sample_size=8)
    return config


def text_config(smoke: bool):
    from transformers import CLIPTextConfig

    config = json.loads((CONFIGS / "text_encoder" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    if smoke:
        config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32, vocab_size=1000)
    return CLIPTextConfig(**config)


def build(args, device):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel

    from lora_gui.engine.network import LoraNetwork, NetworkSpec

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(args.smoke))
        text_encoder = CLIPTextModel(text_config(args.smoke))
    weight_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else torch.float32
    for module in (unet, text_encoder):
        module.requires_grad_(False)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    unet.set_attn_processor(AttnProcessor2_0())  # torch scaled_dot_product_attention
    network = LoraNetwork.apply(unet, text_encoder if args.train_text_encoder else None,
                                NetworkSpec(rank=args.rank, alpha=args.rank / 2,
                                            train_text_encoder=args.train_text_encoder))
    params = network.unet_parameters() + (network.text_encoder_parameters()
                                          if args.train_text_encoder else [])
    for p in params:  # LoRA weights train in fp32 (peft keeps them so; make sure)
        p.data = p.data.float()
    unet.train()
    text_encoder.train(args.train_text_encoder)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    return unet, text_encoder, params, optimizer, scheduler, weight_dtype


def measure(args, device, models, batch: int, checkpointing: bool) -> dict:
    import torch
    import torch.nn.functional as F

    unet, text_encoder, params, optimizer, scheduler, weight_dtype = models
    if checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        unet.disable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_disable()
    side = args.resolution // 8
    gen = torch.Generator(device).manual_seed(batch)
    latents = torch.randn((batch, 4, side, side), generator=gen, device=device)  # "cached latents"
    ids = torch.randint(0, text_encoder.config.vocab_size, (batch, 77), generator=gen, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    states = None
    if not args.train_text_encoder:  # frozen text encoder, static captions: encoded once
        with torch.no_grad(), autocast:
            states = text_encoder(ids).last_hidden_state

    def step() -> torch.Tensor:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            hidden = states if states is not None else text_encoder(ids).last_hidden_state
            pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
        return gpu_common.optimizer_step(F.mse_loss(pred.float(), noise.float()), params, optimizer)

    timing = gpu_common.timed_loop(step, device, batch=batch, warmup=args.warmup, steps=args.steps)
    return {"resolution": args.resolution, "batch": batch, "checkpointing": checkpointing,
            "train_te": args.train_text_encoder, **timing}


def table(results: list[dict]) -> str:
    return common.markdown_table(HEADERS, [
        (r["resolution"], r["batch"], "on" if r["checkpointing"] else "off",
         "trained" if r["train_te"] else "frozen, cached", r["it_s"], r["images_s"], r["peak_vram_gib"],
         common.fmt(r["peak_rss_mb"], 0)) for r in results])


def main(argv: list[str] | None = None) -> int:
    parser = gpu_common.parser(__doc__.splitlines()[0], smoke="a few steps at 64 px with tiny widths (runs on a "
                               "CPU; for CI)", resolution=512, batches="1,4", steps=20, warmup=5, rank=32)
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="also train a text-encoder LoRA (no cached text states)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32, no autocast")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    args = gpu_common.parse(parser, argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = gpu_common.device_for(args.cpu)
    if device.type != "cuda" and not args.smoke:
        print("No CUDA GPU: running the full-size model on the CPU (slow); use --smoke for CI.", file=sys.stderr)
    what = "tiny widths (smoke)" if args.smoke else "SD-1.5 U-Net + CLIP-L text encoder"
    name = gpu_common.device_name(device)
    print(f"gpu_sd15: {what}, {args.resolution} px, LoRA rank {args.rank}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, SDPA, {args.steps} timed steps after "
          f"{args.warmup} warm-up; device {name}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    models = build(args, device)
    print(f"built the models in {time.perf_counter() - t0:.1f} s", flush=True)
    results = gpu_common.grid(args.batches, functools.partial(measure, args, device, models),
                              resolution=args.resolution, train_te=args.train_text_encoder)
    gpu_common.publish(f"6. SD-1.5-shaped LoRA on {name}", table(results),
                       [f"{what}, {args.resolution} px, rank {args.rank}, {args.steps} timed steps after "
                        f"{args.warmup} warm-up steps."], results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
