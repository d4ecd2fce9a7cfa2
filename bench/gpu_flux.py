"""9. FLUX.1-dev LoRA training on a GPU at 1024 px: it/s, peak VRAM and the engine's estimate, for
the frozen transformer stored in fp8 (bf16 compute) and in 4-bit NF4.

A FLUX.1-dev-shaped transformer with random weights, built from the shipped configs in
``lora_gui/engine/configs/flux-dev`` (nothing is downloaded), trained the way the engine trains
Flux: the Flux family's objective (``lora_gui.engine.families.flux``: rectified flow on 2x2-packed
16-channel latents, shifted sigmoid timesteps, guidance 1.0) and sd-scripts' LoRA targets (rank
16, fp32), cached text conditioning (T5 states 512 x 4096 and CLIP-L's pooled 768, as the usual
setting keeps both encoders off the GPU), cached latents (16 x 128 x 128 at 1024 px), bf16
autocast, AdamW8bit when bitsandbytes has CUDA kernels, gradient checkpointing off and on.

    python bench/gpu_flux.py --storage fp8,nf4     # on a CUDA machine; --report appends to BENCHMARKS.md
    python bench/gpu_flux.py --smoke               # CPU: the tiny Flux demo model at 64 px (CI)

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

from bench import gpu_common  # noqa: E402
from bench.gpu_sdxl import table  # noqa: E402  (the same table)

ADV = SimpleNamespace(timestep_sampling="shift", discrete_flow_shift=3.1582, sigmoid_scale=1.0, weighting_scheme="none",
                      logit_mean=0.0, logit_std=1.0, mode_scale=1.29, flux_train_blocks="all",
                      flux_train_modulation=True, flux_block_indices="")


def build(args, device, storage: str):
    """The Flux model object the family works on (random weights, frozen, stored as ``storage``)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from lora_gui.engine.families.flux_demo import tiny_flux_pipeline
    from lora_gui.engine.families.flux_load import SHIPPED, FluxModel

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        transformer = tiny_flux_pipeline(0).transformer.to(device)
    else:
        config = FluxTransformer2DModel.load_config(str(SHIPPED["dev"]), subfolder="transformer")
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(config).to(dtype)
    transformer.requires_grad_(False)
    if storage == "fp8":
        from lora_gui.engine.fp8 import store_in_fp8

        store_in_fp8(transformer, dtype)
    elif storage == "nf4":
        from lora_gui.engine.nf4 import store_in_nf4

        store_in_nf4(transformer, dtype, device)
    vae = SimpleNamespace(config=SimpleNamespace(latent_channels=16))
    return FluxModel(None, None, None, None, transformer, vae, None, "dev", lora_options=ADV), dtype


def measure(args, device, family, model, network, text, dtype, batch: int, checkpointing: bool, storage: str):
    import torch
    import torch.nn.functional as F

    from lora_gui.dataset.memory import GIB
    from lora_gui.engine.memory import run_estimate, unet_activation_bytes

    transformer = model.unet
    transformer.enable_gradient_checkpointing() if checkpointing else transformer.disable_gradient_checkpointing()
    params = network.unet_parameters()
    optimizer, optimizer_name = gpu_common.optimizer_for(params, device)
    side = args.resolution // 8
    gen = torch.Generator(device).manual_seed(batch)
    latents = torch.randn((batch, 16, side, side), generator=gen, device=device)  # "cached latents"
    cond = tuple(t.expand(batch, *t.shape[1:]) for t in text)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    settings = SimpleNamespace(advanced=ADV)
    cpu_gen = torch.Generator().manual_seed(0)

    def step():
        noise = torch.randn_like(latents)
        timesteps = family.sample_timesteps(model, latents, cpu_gen, settings).to(device)
        noisy = family.add_noise(model, latents, noise, timesteps)
        with autocast:
            pred = family.predict(model, noisy, timesteps, cond, None, dtype)
        loss = F.mse_loss(pred.float(), family.target(model, latents, noise, timesteps).float())
        return gpu_common.optimizer_step(loss, params, optimizer)

    timing = gpu_common.timed_loop(step, device, batch=batch, warmup=args.warmup, steps=args.steps)
    activations = unet_activation_bytes(family, model, network.spec, text, batch=batch, width=args.resolution,
                                        height=args.resolution, checkpointing=checkpointing)
    est = run_estimate(frozen=[transformer], lora_params=sum(p.numel() for p in params), optimizer=optimizer_name,
                       activations=activations, gpu=device.type == "cuda")
    return {"resolution": args.resolution, "batch": batch, "checkpointing": checkpointing, "storage": storage,
            **timing, "estimate_gib": est.total / GIB}


def parse(argv):
    parser = gpu_common.parser(__doc__.splitlines()[0], smoke="the tiny Flux demo model at 64 px on a CPU (CI)",
                               resolution=1024, batches="1", steps=10, warmup=3, rank=16)
    parser.add_argument("--storage", default=None, help="comma-separated: fp8, nf4, bf16 (default fp8,nf4; smoke fp8)")
    args = gpu_common.parse(parser, argv)
    args.storage = args.storage or ("fp8" if args.smoke else "fp8,nf4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lora_gui.engine.families.flux import Flux
    from lora_gui.engine.network import NetworkSpec

    device = gpu_common.device_for()
    name = gpu_common.device_name(device)
    what = "tiny Flux demo model (smoke)" if args.smoke else "FLUX.1-dev shapes, random weights"
    print(f"gpu_flux: {what}, {args.resolution} px, LoRA rank {args.rank}; device {name}; torch {torch.__version__}",
          flush=True)
    family, results = Flux(), []
    for storage in args.storage.split(","):
        t0 = time.perf_counter()
        model, dtype = build(args, device, storage)
        network = family.apply_network(model, NetworkSpec(rank=args.rank, alpha=args.rank, train_text_encoder=False))
        width = model.unet.config.joint_attention_dim
        text = (torch.randn(1, 32 if args.smoke else 512, width, device=device),
                torch.randn(1, model.unet.config.pooled_projection_dim, device=device))
        print(f"built the {storage} model in {time.perf_counter() - t0:.1f} s", flush=True)
        results += gpu_common.grid(args.batches, functools.partial(
            measure, args, device, family, model, network, text, dtype, storage=storage), resolution=args.resolution, storage=storage)
        del model, network
    gpu_common.publish(f"9. FLUX.1-dev LoRA on {name}", table(results).replace("U-Net storage", "base storage"),
                       [f"{what}, {args.resolution} px, rank {args.rank}."], results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
