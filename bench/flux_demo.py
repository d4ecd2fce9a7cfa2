"""9. The Flux demo on the CPU: the engine's steps/s against a bare loop, and the engine's pre-run
memory estimate beside the measured peak RSS.

The loops train the tiny Flux demo model's transformer LoRA (sd-scripts' lora_flux targets) at one
resolution (buckets off, static captions, both text encoders frozen and their outputs cached,
latents cached, no gradient clipping):

* engine: ``run_training``;
* bare: the same model and objective through the Flux family's own calls (timestep sampling,
  rectified-flow noise and target, packed transformer forward), MSE loss, backward, optimizer step,
  nothing else: no events, no per-sample generators, no saving;
* diffusers-style: the loop of diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py``:
  every step reads its images, VAE-encodes (a latent sample, shifted and scaled), runs both text
  encoders, then the same forward, loss, backward, gradient clipping at 1.0, optimizer and
  learning-rate scheduler step.

Ratio: as ``bench/engine_overhead.py`` measures SD 1.x (its ``Interleave`` and ``paired``): one
``run_training`` per repeat whose command source runs one bare and one diffusers-style step (timed)
at every step boundary, so that the machine's drift hits all three alike; then the engine's
``Trainer`` step paired one for one with bare steps, with the CPU ms each spends outside the
transformer's forward, backward and the optimizer's step.

Memory: the engine and the bare loop each in a fresh process (their peak RSS their own); the
estimate covers what the engine keeps for training (weights, LoRA + gradients + optimizer state,
traced activations), the RSS also Python, torch and diffusers, so the growth after the imports is
shown too.

Run alone: ``python -m bench.flux_demo`` (``--smoke``: one short repeat, for the test suite).
"""

from __future__ import annotations

import argparse
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
SMOKE = {"repeats": 1, "window_s": 1.5, "paired_steps": 6, "with_clipping": False}


def flux_demo(work: Path):
    from lora_gui.engine.demo import DemoPaths, build_demo

    root = work / "demo-flux"
    if (root / "lora_gui_demo.json").is_file() and (root / "model").is_dir():
        return DemoPaths(root, root / "model", root / "model.safetensors", root / "dataset", root / "reg")
    return build_demo(root, seed=0, family="flux")


def settings_for(work: Path, out: Path, clip: bool = False):
    """The benchmark settings (common.bench_settings) on the Flux demo, with the Flux demo preset's
    T5 length; ``clip`` keeps the default gradient clipping (max_grad_norm 1.0)."""
    return common.bench_settings(flux_demo(work), out, resolution=RESOLUTION, batch_size=BATCH, extra=[
        "model.family=flux", "advanced.t5xxl_max_token_length=32", *([] if clip else ["training.max_grad_norm=0"])])


class FluxLoop:
    """The bare loop (``step("bare")``) and the diffusers-style loop (``step("diffusers")``) over the
    engine's own batches for ``settings``; both share one model, so they train alike. ``unet`` and
    ``optimizer`` are what ``engine_overhead.paired`` times."""

    def __init__(self, settings) -> None:
        import numpy as np
        import torch

        from lora_gui.dataset.images import load_image_array
        from lora_gui.dataset.scan import scan_dataset
        from lora_gui.engine.data import DataOptions, TrainDataset, latent_normalise
        from lora_gui.engine.families import FAMILIES
        from lora_gui.engine.network import NetworkSpec
        from lora_gui.engine.optim import build_optimizer, build_scheduler

        s, tr = settings, settings.training
        self.settings, self.family = s, FAMILIES["flux"]
        torch.manual_seed(tr.seed)
        self.model = model = self.family.load(s)
        for module in (model.unet, model.vae, *self.family.text_encoders(model)):
            module.requires_grad_(False)
        network = self.family.apply_network(model, NetworkSpec(rank=tr.network_dim, alpha=tr.network_alpha,
                                                               train_text_encoder=False))
        self.unet, self.params = model.unet, network.unet_parameters()
        self.unet.train()
        self.optimizer = build_optimizer(s, [{"params": self.params, "lr": s.effective_unet_lr}])
        self.lr_scheduler = build_scheduler(s, self.optimizer, 100000)
        info = scan_dataset(s.model.img_folder, repeats=s.images.repeats, trigger_words=s.triggers.trigger_words)
        dataset = TrainDataset(info, DataOptions.from_settings(s))  # buckets off (common.bench_settings)
        self.items = [[(i.path, i.bucket, dataset.fixed_caption(i)) for i in b] for b in dataset.epoch_batches(0)]
        self.load_image, self.normalise = load_image_array, latent_normalise
        self.pixels = lambda items: torch.from_numpy(np.stack([load_image_array(p, b) for p, b, _ in items]))
        self.cpu = torch.device("cpu")
        self.latents, self.text = [], []
        with torch.no_grad():
            for items in self.items:
                self.latents.append(latent_normalise(model.vae, model.vae.encode(self.pixels(items)).latent_dist.mean))
                self.text.append(self.family.encode_text(model, [c for _, _, c in items], s, self.cpu))
        self.generator = torch.Generator().manual_seed(tr.seed)
        self.index = 0
        for mode in ("bare", "diffusers"):
            for _ in range(3):
                self.step(mode)

    def step(self, mode: str) -> None:
        import torch
        import torch.nn.functional as F

        family, model = self.family, self.model
        i = self.index = (self.index + 1) % len(self.latents)
        if mode == "bare":
            latents, text = self.latents[i], self.text[i]
        else:
            items = self.items[i]
            with torch.no_grad():
                latents = self.normalise(model.vae, model.vae.encode(self.pixels(items)).latent_dist.sample())
                text = family.encode_text(model, [c for _, _, c in items], self.settings, self.cpu)
        noise = torch.randn_like(latents)
        timesteps = family.sample_timesteps(model, latents, self.generator, self.settings)
        noisy = family.add_noise(model, latents, noise, timesteps)
        pred = family.predict(model, noisy, timesteps, text, None, torch.float32)
        F.mse_loss(pred.float(), family.target(model, latents, noise, timesteps).float()).backward()
        if mode != "bare":
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if mode != "bare":
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def ratios(work: Path, repeats: int, window_s: float, paired_steps: int, with_clipping: bool = True) -> dict:
    """Interleaved engine/bare/diffusers-style rates (medians over ``repeats``) and the paired
    Trainer-vs-bare measurement, for the engine without gradient clipping (the bare loop's work)
    and with its default clipping."""
    loop = FluxLoop(settings_for(work, work / "flux-overhead" / "loop"))
    out: dict = {"raw": []}
    for clip in (False, True)[:2 if with_clipping else 1]:
        name = "clip 1.0" if clip else "no clipping"
        runs = [engine_overhead.interleaved_run(settings_for(work, work / "flux-overhead" / f"{name}-{r}", clip),
                                                loop, window_s) for r in range(repeats)]
        pair = engine_overhead.paired(settings_for(work, work / "flux-overhead" / f"paired-{name}", clip), loop,
                                      paired_steps)
        out[name] = {
            "engine": common.median(x["engine"].per_s for x in runs),
            "bare": common.median(x["bare"].per_s for x in runs),
            "diffusers": common.median(x["diffusers"].per_s for x in runs),
            "engine / bare": common.median(x["engine"].per_s / x["bare"].per_s for x in runs),
            "engine / bare, CPU": common.median(x["engine"].per_cpu_s / x["bare"].per_cpu_s for x in runs),
            "engine / diffusers": common.median(x["engine"].per_s / x["diffusers"].per_s for x in runs),
            "paired CPU": pair["cpu"], "engine outside model ms": pair["engine_overhead_ms"],
            "bare outside model ms": pair["bare_overhead_ms"]}
        out["raw"].append({name: [{k: (v.steps, round(v.wall_s, 3), round(v.cpu_s, 3)) for k, v in x.items()}
                                  for x in runs]})
    return out


# --- memory: each loop in its own process ----------------------------------------------------------

class RssGrowth:
    """The largest resident set size above the one at entry, sampled every 2 ms by a thread while
    the block runs (the process's own peak, ru_maxrss, is set by the imports when the model is a few
    MB, so it cannot show the model's growth)."""

    def __enter__(self) -> RssGrowth:
        import threading

        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _engine_run(work: Path, window_s: float) -> dict:
    from lora_gui.engine.train import Trainer

    recorder = common.Recorder()
    with RssGrowth() as rss:
        trainer = Trainer(settings_for(work, work / "runs" / f"flux-engine-{time.time_ns()}"), recorder,
                          common.StopAfter(recorder, window_s, min_steps=5))
        result = trainer.run()
    if result.status not in ("finished", "stopped"):
        raise RuntimeError(result.message)
    estimate = trainer.memory_estimate
    return {"per_s": common.steady_rate(recorder).per_s, "estimate_mb": estimate.total / 2**20,
            "estimate": estimate.sentence(), "growth_mb": rss.growth_mb}


def _bare_run(work: Path, window_s: float) -> dict:
    with RssGrowth() as rss:
        loop = FluxLoop(settings_for(work, work / "runs" / "flux-bare"))
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window_s:
            loop.step("bare")
            steps += 1
        per_s = steps / (time.perf_counter() - t0)
    return {"per_s": per_s, "growth_mb": rss.growth_mb}


def _twice(run_once, work: Path, window_s: float) -> dict:
    """Two runs in one process: the first one's growth includes what the first run of a process
    imports and sets up lazily (library modules, tables); the second one's is the training's own."""
    import gc

    first = run_once(work, window_s)
    gc.collect()
    second = run_once(work, window_s)
    return {**second, "first_growth_mb": first["growth_mb"]}


def engine_child(work: Path, window_s: float) -> dict:
    return _twice(_engine_run, work, window_s)


def bare_child(work: Path, window_s: float) -> dict:
    return _twice(_bare_run, work, window_s)


def _child(kind: str, work: Path, window_s: float) -> dict:
    code = ("import json, sys; from bench import common, flux_demo; common.setup(); "
            "import lora_gui.engine.train, diffusers; a = common.peak_rss_mb(); "
            f"r = flux_demo.{kind}_child(__import__('pathlib').Path(sys.argv[1]), float(sys.argv[2])); "
            "r.update(rss_imports_mb=a, peak_rss_mb=common.peak_rss_mb()); print('RESULT ' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(work), str(window_s)], capture_output=True, text=True,
                          timeout=900, env=common.child_env(), cwd=common.ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {kind} child failed: {proc.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- the section -----------------------------------------------------------------------------------

def run(work: Path | None = None, *, repeats: int = REPEATS, window_s: float = WINDOW_S,
        paired_steps: int = PAIRED_STEPS, with_clipping: bool = True) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    flux_demo(work)
    r = ratios(work, repeats, window_s, paired_steps, with_clipping)
    engine, bare = _child("engine", work, window_s), _child("bare", work, window_s)
    fmt = common.fmt
    speed = common.markdown_table(
        ("engine", "engine steps/s", "bare steps/s", "diffusers-style steps/s", "engine / bare (wall)",
         "engine / bare (CPU)", "engine / bare (paired CPU)", "CPU ms/step outside the model: engine vs bare",
         "engine / diffusers-style"),
        [(name, fmt(x["engine"]), fmt(x["bare"]), fmt(x["diffusers"]), fmt(x["engine / bare"], 3),
          fmt(x["engine / bare, CPU"], 3), fmt(x["paired CPU"], 3),
          f"{x['engine outside model ms']:.2f} vs {x['bare outside model ms']:.2f}", fmt(x["engine / diffusers"]))
         for name, x in ((n, r[n]) for n in ("no clipping", "clip 1.0") if n in r)])
    memory = common.markdown_table(
        ("process", "steps/s", "estimate (MB)", "peak RSS (MB)", "RSS growth: first run (MB)",
         "RSS growth: second run (MB)"),
        [("engine (Trainer: load, cache, train)", fmt(engine["per_s"]), fmt(engine["estimate_mb"], 1),
          fmt(engine["peak_rss_mb"], 0), fmt(engine["first_growth_mb"], 1), fmt(engine["growth_mb"], 1)),
         ("bare loop (load, cache, train)", fmt(bare["per_s"]), "-", fmt(bare["peak_rss_mb"], 0),
          fmt(bare["first_growth_mb"], 1), fmt(bare["growth_mb"], 1))])
    notes = [
        f"Tiny Flux demo model (FLUX.1-dev-shaped), transformer LoRA rank 4 alpha 2 on sd-scripts' lora_flux targets, "
        f"{RESOLUTION} px, batch {BATCH}, T5 32 tokens, AdamW lr 1e-3, latents and text outputs cached, one torch "
        f"thread. Interleaved step by step: {repeats} run_training runs per clipping setting of about {window_s:g} s; "
        f"paired: {paired_steps} Trainer steps one for one with bare steps. Target engine / bare >= 0.95.",
        "'no clipping' (max_grad_norm 0) does exactly the bare loop's work; 'clip 1.0' is the engine's default.",
        f"Memory (each loop in its own process, about {window_s:g} s of training): the engine's estimate: "
        f"{engine['estimate']} Peak RSS is the process's (Python, torch, diffusers and the imports' own peak "
        f"included: {engine['rss_imports_mb']:.0f} MB after the imports). Growth: the resident set's largest rise "
        "during a run (load, cache, train; sampled every 2 ms), for two runs one after the other in one process: "
        "the first includes what a process's first run imports and sets up lazily, the second is the run's own "
        "memory, which the estimate describes."]
    return common.Section("9. Flux demo", speed + "\n\n" + memory, notes, {"ratios": r, "engine": engine, "bare": bare},
                          seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flux_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short repeat (the test suite's check)")
    args = parser.parse_args(argv)
    common.setup()
    common.print_section(run(**(SMOKE if args.smoke else {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
