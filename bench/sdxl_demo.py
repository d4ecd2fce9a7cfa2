"""8. The SDXL demo on the CPU: the engine's steps/s against a bare loop, and the engine's
pre-run memory estimate beside the measured peak RSS.

Both loops train the tiny SDXL demo model's U-Net LoRA at one resolution (buckets off, static
captions, text encoders frozen and their conditioning cached, latents cached, no gradient
clipping), each in its own fresh process so that its peak RSS is its own:

* engine: ``run_training`` (through ``Trainer``, which also gives the run's memory estimate), stopped
  after a few seconds of steady state; steps/s from its own Progress events;
* bare: the same model through the SDXL family's ``predict`` (both encoders' states, pooled
  projection, six size/crop numbers), noise, loss, backward, optimizer step, nothing else.

The two alternate ``BENCH_REPEATS`` times; the ratio is the median of engine/bare. The estimate
covers what the engine keeps for training (weights, LoRA + gradients + optimizer state, traced
activations); the RSS also holds Python, torch and diffusers themselves, so the table shows the
RSS growth from after the imports to the peak as well.

Run alone: ``python -m bench.sdxl_demo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common

RESOLUTION, BATCH = 64, 4
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "5.0"))


def sdxl_demo(work: Path):
    from lora_gui.engine.demo import DemoPaths, build_demo

    root = work / "demo-sdxl"
    if (root / "lora_gui_demo.json").is_file() and (root / "model").is_dir():
        return DemoPaths(root, root / "model", root / "model.safetensors", root / "dataset", root / "reg")
    return build_demo(root, seed=0, family="sdxl")


def settings_for(work: Path, out: Path):
    from lora_gui.settings import io

    paths = sdxl_demo(work)
    base = common.bench_settings(paths, out, resolution=RESOLUTION, batch_size=BATCH,
                                 extra=["training.max_grad_norm=0", "model.family=sdxl"])
    return io.apply_overrides(base, ["training.learning_rate=0.001"])


def engine_child(work: Path) -> dict:
    from lora_gui.engine.train import Trainer

    settings = settings_for(work, work / "runs" / f"sdxl-engine-{time.time_ns()}")
    recorder = common.Recorder()
    trainer = Trainer(settings, recorder, common.StopAfter(recorder, WINDOW_S, min_steps=5))
    result = trainer.run()
    if result.status not in ("finished", "stopped"):
        raise RuntimeError(result.message)
    rate = common.steady_rate(recorder)
    return {"per_s": rate.per_s, "estimate_mb": trainer.memory_estimate.total / 2**20}


def bare_child(work: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from lora_gui.engine.families import FAMILIES
    from lora_gui.engine.families.sdxl_condition import time_ids
    from lora_gui.engine.network import NetworkSpec
    from lora_gui.engine.optim import build_optimizer

    settings = settings_for(work, work / "runs" / "sdxl-bare")
    family, tr = FAMILIES["sdxl"], settings.training
    torch.manual_seed(tr.seed)
    model = family.load(settings)
    for module in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        module.requires_grad_(False)
    network = family.apply_network(model, NetworkSpec(rank=tr.network_dim, alpha=tr.network_alpha,
                                                      train_text_encoder=False))
    optimizer = build_optimizer(settings, [{"params": network.unet_parameters(), "lr": settings.effective_unet_lr}])
    model.unet.train()
    side = RESOLUTION // 8
    with torch.no_grad():
        text = family.encode_text(model, ["demoshape, red circle"] * BATCH, settings, torch.device("cpu"))
    latents = torch.randn(BATCH, 4, side, side)
    extra = time_ids([(RESOLUTION, RESOLUTION)] * BATCH, [(0, 0)] * BATCH, (RESOLUTION, RESOLUTION))

    def step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (BATCH,))
        noisy = family.add_noise(model, latents, noise, timesteps)
        pred = family.predict(model, noisy, timesteps, text, extra, torch.float32)
        F.mse_loss(pred.float(), family.target(model, latents, noise, timesteps).float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < WINDOW_S:
        step()
        steps += 1
    return {"per_s": steps / (time.perf_counter() - t0)}


def _child(kind: str, work: Path) -> dict:
    code = ("import json, sys; from bench import common, sdxl_demo; common.setup(); "
            "import lora_gui.engine.train, diffusers; a = common.peak_rss_mb(); "
            f"r = sdxl_demo.{kind}_child(__import__('pathlib').Path(sys.argv[1])); "
            "r.update(rss_imports_mb=a, peak_rss_mb=common.peak_rss_mb()); print('RESULT ' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(work)], capture_output=True, text=True, timeout=900,
                          env=common.child_env(), cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {kind} child failed: {proc.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    sdxl_demo(work)
    engines, bares = [], []
    for _ in range(REPEATS):
        engines.append(_child("engine", work))
        bares.append(_child("bare", work))
    ratio = common.median(e["per_s"] / b["per_s"] for e, b in zip(engines, bares))
    engine = engines[-1]
    rows = [("engine (run_training)", common.fmt(common.median(e["per_s"] for e in engines)),
             common.fmt(ratio, 3), common.fmt(engine["estimate_mb"], 0), common.fmt(engine["peak_rss_mb"], 0),
             common.fmt(engine["peak_rss_mb"] - engine["rss_imports_mb"], 0)),
            ("bare loop", common.fmt(common.median(b["per_s"] for b in bares)), "1", "-",
             common.fmt(bares[-1]["peak_rss_mb"], 0), common.fmt(bares[-1]["peak_rss_mb"] - bares[-1]["rss_imports_mb"], 0))]
    table = common.markdown_table(("loop", "steps/s", "engine / bare", "estimate (MB)", "peak RSS (MB)",
                                   "RSS growth after imports (MB)"), rows)
    notes = [f"Tiny SDXL demo model, U-Net LoRA, {RESOLUTION} px, batch {BATCH}, {REPEATS} alternating repeats "
             f"of {WINDOW_S:.0f} s windows; target engine/bare >= 0.95 (as for SD 1.x)."]
    return common.Section("8. SDXL demo", table, notes, {"engine": engines, "bare": bares},
                          seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
