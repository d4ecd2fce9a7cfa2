"""1. Engine overhead: ``run_training``'s steady-state steps/s against the limit for the model.

Three loops train the same tiny demo model's U-Net LoRA (same rank, alpha, optimizer, learning
rate, resolution, batch size and images; text encoder frozen, static captions):

* engine: ``run_training`` itself, with its default gradient clipping (max_grad_norm 1.0) and
  without (max_grad_norm 0: exactly the bare loop's work);
* bare: forward, loss, backward, optimizer step over cached latents and cached text states,
  nothing else: the limit for this model on this machine;
* diffusers-style: the loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``:
  every step reads and transforms its images, tokenizes its captions, VAE-encodes (a latent sample)
  and text-encodes, then forward, loss, backward, gradient clipping at 1.0, optimizer and
  learning-rate scheduler step.

On a shared 2-core machine the speed of identical steps drifts by +-20 % over seconds (the other
core's work), so the loops are interleaved step by step: ``run_training`` runs with a command
source that, each time the engine polls it at a step boundary, runs one bare step and one
diffusers-style step (timed) and after a few seconds sends Stop. The engine's own time is the
window between two of its Progress events (set-up excluded: from the first report at least 0.4 s
after the first step to the last one) minus the interleaved steps in it. Ratios are medians over
repeats, on wall time and on process CPU time.

A second, paired measurement drives the engine's ``Trainer`` (its DataLoader + ``_step``) one step
for one with bare steps and reports the CPU ms per step each spends outside U-Net forward, backward
and the optimizer's own step: the loop's overhead itself.

Run alone: ``python -m bench.engine_overhead``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench import common

CONFIGS = ((64, 4), (128, 1))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
WINDOW_S = float(os.environ.get("BENCH_WINDOW_S", "5.0"))
PAIRED_STEPS = int(os.environ.get("BENCH_PAIRED_STEPS", "40"))
ENGINES = ("engine", "engine, no clipping")


class Loop:
    """The bare loop (``mode="bare"``) and the diffusers-example loop (``mode="diffusers"``) over
    the engine's own data for ``settings``; both modes share one model so they train alike."""

    def __init__(self, settings) -> None:
        import numpy as np
        import torch

        from lora_gui.dataset.images import load_image_array
        from lora_gui.dataset.scan import scan_dataset
        from lora_gui.engine.data import DataOptions, TrainDataset
        from lora_gui.engine.model_load import load_base_model
        from lora_gui.engine.network import LoraNetwork, NetworkSpec
        from lora_gui.engine.optim import build_optimizer
        from lora_gui.engine.text import encode_prompts

        s, tr, adv = settings, settings.training, settings.advanced
        torch.manual_seed(tr.seed)
        base = load_base_model(s.model.base_model)
        self.unet, self.vae, self.te, self.tok = base.unet, base.vae, base.text_encoder, base.tokenizer
        self.scheduler = base.noise_scheduler
        for module in (self.unet, self.vae, self.te):
            module.requires_grad_(False)
        spec = NetworkSpec(rank=tr.network_dim, alpha=tr.network_alpha, conv_rank=adv.conv_dim,
                           conv_alpha=adv.conv_alpha, dropout=adv.network_dropout,
                           train_unet=True, train_text_encoder=False)
        network = LoraNetwork.apply(self.unet, None, spec)
        self.unet.train()
        self.optimizer = build_optimizer(s, [{"params": network.unet_parameters(),
                                              "lr": s.effective_unet_lr}])
        img = s.images
        info = scan_dataset(s.model.img_folder, repeats=img.repeats,
                            trigger_words=s.triggers.trigger_words)
        dataset = TrainDataset(info, DataOptions.from_settings(s))  # buckets off (common.py)
        batches = dataset.epoch_batches(0)  # the engine's batches (an epoch may end short)
        self.items = [[(i.path, i.bucket, dataset.fixed_caption(i)) for i in b] for b in batches]
        self.load_image = load_image_array
        self.params = network.unet_parameters()
        from lora_gui.engine.optim import build_scheduler

        self.lr_scheduler = build_scheduler(s, self.optimizer, 100000)
        self.latents, self.states = [], []
        with torch.no_grad():
            for items in self.items:
                pixels = torch.from_numpy(np.stack([load_image_array(p, b) for p, b, _ in items]))
                self.latents.append(self.vae.encode(pixels).latent_dist.mean
                                    * self.vae.config.scaling_factor)
                self.states.append(encode_prompts(self.tok, self.te, [c for _, _, c in items]))
        self.index = 0
        for mode in ("bare", "diffusers"):
            for _ in range(3):
                self.step(mode)

    def step(self, mode: str) -> None:
        import numpy as np
        import torch
        import torch.nn.functional as F

        i = self.index = (self.index + 1) % len(self.latents)
        if mode == "bare":
            latents, states = self.latents[i], self.states[i]
        else:
            items = self.items[i]
            pixels = torch.from_numpy(np.stack([self.load_image(p, b) for p, b, _ in items]))
            ids = self.tok([c for _, _, c in items], max_length=self.tok.model_max_length,
                           padding="max_length", truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if mode != "bare":
            with torch.no_grad():
                states = self.te(ids, return_dict=False)[0]
        pred = self.unet(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        if mode != "bare":
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if mode != "bare":
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, mode: str, seconds: float) -> common.Rate:
        return timed_loop(lambda: self.step(mode), seconds)


def timed_loop(step, seconds: float) -> common.Rate:
    """``step()`` again and again for ``seconds``: its Rate (wall and process CPU time)."""
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    return common.Rate(steps, time.perf_counter() - t0, time.process_time() - c0)


class Interleave:
    """The command source of an interleaved run: at each step boundary one step of each of the
    loop's ``modes`` (timed, the order alternating); Stop after ``seconds`` of training. ``loop`` is
    anything with ``step(mode)`` (``Loop`` here, the SDXL bare loop in ``bench/sdxl_demo.py``)."""

    def __init__(self, recorder: common.Recorder, loop, seconds: float,
                 modes: tuple[str, ...] = ("bare", "diffusers")) -> None:
        self.recorder, self.loop, self.seconds, self.modes = recorder, loop, seconds, modes
        self.samples: list[tuple[str, float, float, float]] = []  # mode, start, wall, cpu
        self.stopped = False
        self.start = None

    def poll(self) -> list:
        from lora_gui import events as ev

        if self.stopped:
            return []
        # The first training Progress, found once: a search over all events at every poll would
        # be charged to the engine's time (it grows with the run's events).
        self.start = self.start or self.recorder.first("progress", "training")
        if self.start is None:
            return []
        if time.perf_counter() - self.start.wall >= self.seconds:
            self.stopped = True
            return [ev.Stop()]
        forward = (len(self.samples) // len(self.modes)) % 2 == 0
        for mode in self.modes if forward else self.modes[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            self.loop.step(mode)
            self.samples.append((mode, t0, time.perf_counter() - t0, time.process_time() - c0))
        return []


def interleaved_run(settings, loop, seconds: float, modes: tuple[str, ...] = ("bare", "diffusers"),
                    warmup_s: float = 0.4) -> dict[str, common.Rate]:
    """One ``run_training`` with a step of each of ``loop``'s ``modes`` after every engine step;
    a Rate per mode and one for the engine (its window minus the interleaved steps in it). The
    window starts ``warmup_s`` after the first step (a fresh run's first steps are slower; a
    model with slow steps needs more than the default to leave them out)."""
    from lora_gui.engine.train import run_training

    recorder = common.Recorder()
    source = Interleave(recorder, loop, seconds + warmup_s, modes)
    result = run_training(settings, recorder, source)
    if result.status == "failed":
        raise RuntimeError(result.message)
    window = common.steady_rate(recorder, warmup_s)
    training = recorder.of("progress", "training")
    end = training[-1].wall
    start = end - window.wall_s
    inside = [x for x in source.samples if start <= x[1] < end]
    rates = {}
    for mode in modes:
        mine = [x for x in inside if x[0] == mode]
        rates[mode] = common.Rate(len(mine), sum(x[2] for x in mine), sum(x[3] for x in mine))
    rates["engine"] = common.Rate(window.steps, window.wall_s - sum(x[2] for x in inside),
                                  window.cpu_s - sum(x[3] for x in inside))
    return rates


class _ModelClock:
    """CPU seconds spent inside U-Net forward, backward and the optimizer's own step (wrapped for
    the duration of a paired measurement), so that a step's remaining time is the loop's overhead."""

    def __init__(self, pairs) -> None:
        import torch

        self.spent, self.undo = 0.0, []
        for obj, name in pairs:
            self._wrap(obj, name)
        self._wrap(torch.Tensor, "backward")

    def _wrap(self, obj, name: str) -> None:
        original = getattr(obj, name)
        had_own = name in vars(obj)

        def timed(*args, **kwargs):
            c0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent += time.process_time() - c0

        setattr(obj, name, timed)
        self.undo.append((obj, name, original if had_own else None))

    def restore(self) -> None:
        for obj, name, original in reversed(self.undo):
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


def paired(settings, loop, steps: int) -> dict:
    """The engine's ``Trainer`` step (next batch from its DataLoader + ``_step``) and a bare step,
    alternated one for one. Returns the steps/s ratio engine / bare on wall and CPU time, and the
    median CPU ms per step each spends outside forward, backward and the optimizer's step."""
    import statistics

    from lora_gui import events as ev
    from lora_gui.engine.train import Trainer

    trainer = Trainer(settings, common.Recorder(), ev.CommandQueue())
    trainer._setup()
    clock = None
    try:
        p = trainer.progress
        trainer._t_loop, trainer._step_at_loop = time.time(), 0
        loader, sampler = trainer._loader()
        batches = iter(loader)

        def engine_step() -> None:
            nonlocal batches
            try:
                index, batch, global_size = next(batches)
            except StopIteration:
                p.epoch, p.batch = p.epoch + 1, 0
                sampler.epoch, sampler.skip = p.epoch, 0
                batches = iter(loader)
                index, batch, global_size = next(batches)
            trainer._step(batch, index, global_size)

        import warnings

        # The timing wrapper hides the LR scheduler's step marker from it: a harmless warning.
        warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden.*")
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        clock = _ModelClock([(trainer.unet, "forward"), (loop.unet, "forward"), (inner, "step"),
                             (loop.optimizer, "step")])
        totals = {"engine": [0.0, 0.0], "bare": [0.0, 0.0]}
        overhead: dict[str, list[float]] = {"engine": [], "bare": []}
        for k in range(steps + 3):
            for name in ("engine", "bare") if k % 2 else ("bare", "engine"):
                clock.spent = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                engine_step() if name == "engine" else loop.step("bare")
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if k >= 3:  # warm-up
                    totals[name][0] += wall
                    totals[name][1] += cpu
                    overhead[name].append(1000 * (cpu - clock.spent))
    finally:
        if clock is not None:
            clock.restore()
        trainer.close()
    return {"wall": totals["bare"][0] / totals["engine"][0], "cpu": totals["bare"][1] / totals["engine"][1],
            "engine_overhead_ms": statistics.median(overhead["engine"]),
            "bare_overhead_ms": statistics.median(overhead["bare"])}


def measure(work: Path, resolution: int, batch: int, repeats: int = REPEATS,
            window_s: float = WINDOW_S) -> dict:
    paths = common.demo(work)

    def settings_for(name: str, clip: bool):
        return common.bench_settings(
            paths, work / "overhead" / f"{resolution}-{batch}-{name}", resolution=resolution,
            batch_size=batch, extra=[] if clip else ["training.max_grad_norm=0"])

    loop = Loop(settings_for("loop", True))
    runs: dict[str, list[dict[str, common.Rate]]] = {name: [] for name in ENGINES}
    for r in range(repeats):
        for name in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            runs[name].append(interleaved_run(settings_for(f"{name}-{r}", name == "engine"), loop,
                                              window_s))
    pairs = {name: paired(settings_for(f"paired-{name}", name == "engine"), loop, PAIRED_STEPS)
             for name in ENGINES}

    def ratio(name: str, a: str, b: str, attr: str = "per_s") -> float:
        return common.median(getattr(x[a], attr) / getattr(x[b], attr) for x in runs[name])

    out = {"resolution": resolution, "batch": batch, "repeats": repeats, "window_s": window_s}
    everything = [x for name in ENGINES for x in runs[name]]
    for loop_name in ("bare", "diffusers"):
        out[loop_name] = common.median(x[loop_name].per_s for x in everything)
    for name in ENGINES:
        out[name] = common.median(x["engine"].per_s for x in runs[name])
        out[f"{name} / bare"] = ratio(name, "engine", "bare")
        out[f"{name} / bare, CPU"] = ratio(name, "engine", "bare", "per_cpu_s")
        out[f"{name}: outside model ms"] = pairs[name]["engine_overhead_ms"]
        out[f"bare (paired with {name}): outside model ms"] = pairs[name]["bare_overhead_ms"]
        out[f"{name} / bare, paired CPU"] = pairs[name]["cpu"]
    out["engine / diffusers"] = ratio("engine", "engine", "diffusers")
    out["engine / diffusers, CPU"] = ratio("engine", "engine", "diffusers", "per_cpu_s")
    out["bare / diffusers"] = common.median(x["bare"].per_s / x["diffusers"].per_s for x in everything)
    out["bare / diffusers, CPU"] = common.median(x["bare"].per_cpu_s / x["diffusers"].per_cpu_s
                                                 for x in everything)
    out["raw"] = {name: [{k: (v.steps, round(v.wall_s, 3), round(v.cpu_s, 3)) for k, v in x.items()}
                         for x in runs[name]] for name in ENGINES}
    return out


HEADERS = ("resolution", "batch", "engine steps/s (clip 1.0 / off)", "bare steps/s",
           "diffusers-style steps/s", "engine / bare, wall (clip 1.0 / off)",
           "engine / bare, CPU time (clip 1.0 / off)",
           "CPU ms/step outside fwd/bwd/optimizer: engine (clip 1.0 / off) vs bare",
           "engine / diffusers-style (wall / CPU)", "bare / diffusers-style (wall / CPU)")


def _pair(a: float, b: float, digits: int = 3) -> str:
    return f"{a:.{digits}f} / {b:.{digits}f}"


def rows(results: list[dict]) -> list[tuple]:
    e, n = ENGINES
    return [(r["resolution"], r["batch"], _pair(r[e], r[n], 2), r["bare"], r["diffusers"],
             _pair(r[f"{e} / bare"], r[f"{n} / bare"]),
             _pair(r[f"{e} / bare, CPU"], r[f"{n} / bare, CPU"]),
             f"{_pair(r[f'{e}: outside model ms'], r[f'{n}: outside model ms'], 2)} vs "
             f"{r[f'bare (paired with {e}): outside model ms']:.2f}",
             _pair(r["engine / diffusers"], r["engine / diffusers, CPU"], 2),
             _pair(r["bare / diffusers"], r["bare / diffusers, CPU"], 2)) for r in results]


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    results = [measure(work, res, batch) for res, batch in CONFIGS]
    notes = [
        f"Interleaved step by step: {REPEATS} run_training runs per clipping setting, each with "
        f"one bare and one diffusers-style step after every engine step, about {WINDOW_S:.0f} s of "
        "training; steps/s and ratios are medians over the runs (see bench/engine_overhead.py). "
        "Outside-model ms: median CPU ms per step outside U-Net forward, backward and the "
        f"optimizer's own step, from {PAIRED_STEPS} Trainer steps paired with bare steps.",
        "Tiny demo model, U-Net LoRA (rank 4, alpha 2), AdamW lr 1e-3, text encoder frozen with "
        "static captions (its outputs cached), latents cached, buckets off, one torch thread. "
        "'clip 1.0' is the engine's default max_grad_norm; 'off' (max_grad_norm=0) does exactly the "
        "bare loop's work. The diffusers-style loop reads and transforms its images, tokenizes, "
        "VAE-encodes and text-encodes every step and clips at 1.0, like diffusers' "
        "train_text_to_image_lora.py.",
        "Target: engine / bare >= 0.95 in both rows; the engine keeps the bare loop's lead over the "
        "diffusers-style loop.",
    ]
    return common.Section("1. Engine overhead (steady-state steps/s)",
                          common.markdown_table(HEADERS, rows(results)), notes,
                          {"results": results}, time.perf_counter() - t0)


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
