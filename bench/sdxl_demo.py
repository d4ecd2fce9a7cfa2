"""8. The SDXL demo on the CPU: the engine's steps/s against a bare loop, and the engine's
pre-run memory estimate beside the measured peak RSS.

Both loops train the tiny SDXL demo model's U-Net LoRA at one resolution (buckets off, static
captions, text encoders frozen and their conditioning cached, latents cached, no gradient
clipping):

* engine: ``run_training`` (through ``Trainer``, which also gives the run's memory estimate);
* bare: the same model through the SDXL family's ``predict`` (both encoders' states, pooled
  projection, six size/crop numbers), noise, loss, backward, optimizer step, nothing else.

Speed is measured as for SD 1.x in ``bench/engine_overhead.py`` and with its code: the two loops
are interleaved step by step in one process (``interleaved_run``: after every engine step one
timed bare step), so the drift of a shared machine hits both alike; ``BENCH_REPEATS`` runs, the
ratio is the median over them, on wall and on process CPU time. Then ``paired`` alternates the
engine's ``Trainer`` step and a bare step one for one and gives the CPU ms each spends outside
U-Net forward, backward and the optimizer's step (the loop's own overhead).

Memory: each loop once more in its own fresh process, so that its peak RSS is its own; the peak
is taken after the imports (``common.reset_peak_rss``: an import's transient peak is not
training's). The estimate covers what the engine keeps for training (weights, LoRA + gradients +
optimizer state, traced activations); the RSS also holds Python, torch and diffusers themselves, so
the table shows the RSS growth from after the imports to the peak as well.

Run alone: ``python -m bench.sdxl_demo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common, engine_overhead

RESOLUTION, BATCH = 64, 4
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "5.0"))
PAIRED_STEPS = int(os.environ.get("BENCH_PAIRED_STEPS", "40"))
# A step of the SDXL demo takes 0.15-0.3 s here: the default 0.4 s of warm-up would keep a fresh
# run's slower first steps in the window (bench 1's steps take a tenth of that).
WARMUP_S = float(os.environ.get("BENCH_WARMUP_S", "2.0"))


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


class BareSDXL:
    """The bare loop on the SDXL demo model (``step("bare")``, as ``engine_overhead.Loop``): its
    own copy of the model, the engine's LoRA on the U-Net, cached text conditioning and latents."""

    def __init__(self, settings) -> None:
        import torch

        from lora_gui.engine.families import FAMILIES
        from lora_gui.engine.families.sdxl_condition import time_ids
        from lora_gui.engine.network import NetworkSpec
        from lora_gui.engine.optim import build_optimizer

        self.family, tr = FAMILIES["sdxl"], settings.training
        torch.manual_seed(tr.seed)
        self.model = self.family.load(settings)
        for module in (self.model.unet, self.model.vae, self.model.text_encoder, self.model.text_encoder_2):
            module.requires_grad_(False)
        network = self.family.apply_network(self.model, NetworkSpec(rank=tr.network_dim, alpha=tr.network_alpha,
                                                                    train_text_encoder=False))
        self.unet = self.model.unet
        self.optimizer = build_optimizer(settings, [{"params": network.unet_parameters(),
                                                     "lr": settings.effective_unet_lr}])
        self.unet.train()
        side = RESOLUTION // 8
        with torch.no_grad():
            self.text = self.family.encode_text(self.model, ["demoshape, red circle"] * BATCH, settings,
                                                torch.device("cpu"))
        self.latents = torch.randn(BATCH, 4, side, side)
        self.extra = time_ids([(RESOLUTION, RESOLUTION)] * BATCH, [(0, 0)] * BATCH, (RESOLUTION, RESOLUTION))
        for _ in range(3):
            self.step()

    def step(self, mode: str = "bare") -> None:
        import torch
        import torch.nn.functional as F

        family, model, latents = self.family, self.model, self.latents
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (BATCH,))
        noisy = family.add_noise(model, latents, noise, timesteps)
        pred = family.predict(model, noisy, timesteps, self.text, self.extra, torch.float32)
        F.mse_loss(pred.float(), family.target(model, latents, noise, timesteps).float()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bare_child(work: Path) -> dict:
    loop = BareSDXL(settings_for(work, work / "runs" / "sdxl-bare"))
    return {"per_s": engine_overhead.timed_loop(loop.step, WINDOW_S).per_s}


def interleaved(work: Path, repeats: int = REPEATS, window_s: float = WINDOW_S) -> dict:
    """The engine and the bare loop interleaved step by step (``engine_overhead.interleaved_run``),
    ``repeats`` times, then paired one for one (``engine_overhead.paired``)."""
    loop = BareSDXL(settings_for(work, work / "runs" / "sdxl-loop"))
    runs = [engine_overhead.interleaved_run(settings_for(work, work / "runs" / f"sdxl-interleaved-{r}"), loop,
                                            window_s, modes=("bare",), warmup_s=WARMUP_S) for r in range(repeats)]
    pair = engine_overhead.paired(settings_for(work, work / "runs" / "sdxl-paired"), loop, PAIRED_STEPS)
    return {"engine": common.median(x["engine"].per_s for x in runs),
            "bare": common.median(x["bare"].per_s for x in runs),
            "wall": common.median(x["engine"].per_s / x["bare"].per_s for x in runs),
            "cpu": common.median(x["engine"].per_cpu_s / x["bare"].per_cpu_s for x in runs),
            "paired_cpu": pair["cpu"], "engine_ms": pair["engine_overhead_ms"], "bare_ms": pair["bare_overhead_ms"],
            "raw": [{k: (v.steps, round(v.wall_s, 3), round(v.cpu_s, 3)) for k, v in x.items()} for x in runs]}


def _child(kind: str, work: Path) -> dict:
    code = ("import json, sys; from bench import common, sdxl_demo; common.setup(); "
            "import lora_gui.engine.train, diffusers; a = common.reset_peak_rss(); "
            f"r = sdxl_demo.{kind}_child(__import__('pathlib').Path(sys.argv[1])); "
            "r.update(rss_imports_mb=a, peak_rss_mb=common.peak_rss_mb()); print('RESULT ' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(work)], capture_output=True, text=True, timeout=900,
                          env=common.child_env(), cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {kind} child failed: {proc.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


HEADERS = ("loop", "steps/s (interleaved)", "engine / bare, wall", "engine / bare, CPU time",
           "engine / bare, paired CPU", "CPU ms/step outside fwd/bwd/optimizer", "estimate (MB)",
           "peak RSS (MB)", "RSS growth after imports (MB)")


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    sdxl_demo(work)
    speed = interleaved(work)
    engine, bare = _child("engine", work), _child("bare", work)
    f = common.fmt
    rows = [("engine (run_training)", f(speed["engine"]), f(speed["wall"], 3), f(speed["cpu"], 3),
             f(speed["paired_cpu"], 3), f(speed["engine_ms"]), f(engine["estimate_mb"], 0),
             f(engine["peak_rss_mb"], 0), f(engine["peak_rss_mb"] - engine["rss_imports_mb"], 0)),
            ("bare loop", f(speed["bare"]), "1", "1", "1", f(speed["bare_ms"]), "-", f(bare["peak_rss_mb"], 0),
             f(bare["peak_rss_mb"] - bare["rss_imports_mb"], 0))]
    notes = [f"Tiny SDXL demo model, U-Net LoRA, {RESOLUTION} px, batch {BATCH}, one torch thread. Interleaved "
             f"step by step as in benchmark 1 (bench/engine_overhead.py): {REPEATS} run_training runs of about "
             f"{WINDOW_S:.0f} s, each with one bare step after every engine step; steps/s and ratios are medians "
             f"over the runs; paired: {PAIRED_STEPS} Trainer steps alternated with bare steps. Target engine/bare "
             ">= 0.95 (as for SD 1.x). Under the load of a shared machine the wall-time ratio moves by several "
             "per cent from run to run; the CPU-time ratios are the steadier figures.",
             "Memory: each loop alone in a fresh process; peak RSS from after the imports (the high-water "
             "mark reset then), growth = that peak minus the RSS after the imports (it includes the modules that loading the model "
             "imports on the way, the same in both loops)."]
    return common.Section("8. SDXL demo", common.markdown_table(HEADERS, rows), notes,
                          {"speed": speed, "engine": engine, "bare": bare}, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
