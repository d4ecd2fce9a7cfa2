"""5. Scale: how latent caching and one epoch grow with the dataset (10, 100, 1000 images in the
demo generator's style), and a bucket scan of 10,000 image headers that must not decode pixels.

Datasets: one ``1_shapes`` folder (1 repeat) of demo-style drawings (``lora_gui.engine.demo``'s
shapes on coloured backgrounds, sides 48-96 px, several aspect ratios, a caption each). Each size
is one ``run_training`` of one epoch on the tiny demo model (64 px training area with buckets
64-128, batch 4, static captions, text encoder frozen, flip_aug off, nothing saved on the way):
caching is timed from the first to the last "caching latents" Progress event, the epoch from the
Started event to the last training Progress.

Scan: 10,000 PNG and JPEG files (a tenth of the JPEGs carry an EXIF rotation) scanned with
``lora_gui.dataset.scan.scan_dataset`` and assigned to buckets with ``plan_buckets`` while
``PIL.ImageFile.ImageFile.load`` (every pixel decode goes through it) is patched to count calls.

Run alone: ``python -m bench.scale``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench import common

SIZES = tuple(int(n) for n in os.environ.get("BENCH_SCALE_SIZES", "10,100,1000").split(","))
SCAN_IMAGES = int(os.environ.get("BENCH_SCAN_IMAGES", "10000"))
SIDES = (48, 64, 80, 96)


def write_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` demo-style images with captions in ``folder/1_shapes`` (reused when complete)."""
    import numpy as np

    from lora_gui.engine.demo import SHAPES, _draw

    sub = folder / "1_shapes"
    if sub.is_dir() and len(list(sub.glob("*.png"))) == n:
        return folder
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fgs, bgs = ("red", "green", "blue", "yellow", "purple"), ("white", "black", "grey")
    for i in range(n):
        shape, fg, bg = SHAPES[i % 3], fgs[int(rng.integers(5))], bgs[int(rng.integers(3))]
        size = ("small", "medium", "large")[int(rng.integers(3))]
        w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
        _draw(rng, shape, fg, bg, size, w, h).save(sub / f"img_{i:05d}.png")
        (sub / f"img_{i:05d}.txt").write_text(f"{fg} {shape}, {bg} background, {size}\n")
    return folder


def epoch_run(work: Path, folder: Path, n: int) -> dict:
    from lora_gui.engine.train import run_training

    paths = common.demo(work)
    settings = common.bench_settings(
        paths, work / "scale" / f"out-{n}-{time.time_ns()}", resolution=64, batch_size=4,
        extra=[f"model.img_folder={folder}", "images.buckets=true", "images.max_steps=0",
               "images.epochs=1", "images.cache_latents=true"])
    recorder = common.Recorder()
    result = run_training(settings, recorder)
    if result.status == "failed":
        raise RuntimeError(result.message)
    caching = recorder.of("progress", "caching latents")
    started = recorder.of("started")[0]
    training = recorder.of("progress", "training")
    return {"images": n, "latents": caching[-1].event.step,
            "caching_s": caching[-1].wall - caching[0].wall,
            "epoch_s": training[-1].wall - started.wall, "steps": training[-1].event.step}


def write_scan_dataset(folder: Path, n: int) -> Path:
    """``n`` small PNG/JPEG files (solid colours, several aspect ratios) for the header scan."""
    from PIL import Image

    sub = folder / "1_many"
    if sub.is_dir() and len(os.listdir(sub)) == n:
        return folder
    sub.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: width and height swap
    for i in range(n):
        w, h = SIDES[i % 4] // 2, SIDES[(i // 4) % 4] // 2
        image = Image.new("RGB", (w, h), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
        if i % 2:
            extra = {"exif": exif} if i % 20 == 1 else {}
            image.save(sub / f"{i:05d}.jpg", quality=80, **extra)
        else:
            image.save(sub / f"{i:05d}.png")
    return folder


def scan(folder: Path) -> dict:
    from PIL import ImageFile

    from lora_gui.dataset.buckets import BucketOptions
    from lora_gui.dataset.scan import scan_dataset
    from lora_gui.dataset.summary import plan_buckets

    calls = {"load": 0}
    original = ImageFile.ImageFile.load

    def counting_load(self, *args, **kwargs):
        calls["load"] += 1
        return original(self, *args, **kwargs)

    ImageFile.ImageFile.load = counting_load
    try:
        t0 = time.perf_counter()
        info = scan_dataset(folder, repeats=1)
        t1 = time.perf_counter()
        buckets = plan_buckets(info, BucketOptions((512, 512), buckets=True, min_bucket_resolution=256,
                                                   max_bucket_resolution=1024, bucket_reso_steps=64,
                                                   bucket_no_upscale=False))
        t2 = time.perf_counter()
    finally:
        ImageFile.ImageFile.load = original
    return {"images": info.num_train_images, "scan_s": t1 - t0, "buckets_s": t2 - t1,
            "distinct_buckets": len(set(buckets.values())), "pixel_decodes": calls["load"]}


def run(work: Path | None = None) -> common.Section:
    work = work or common.workdir()
    t0 = time.perf_counter()
    common.demo(work)
    results = []
    for n in SIZES:
        folder = write_dataset(work / "scale" / f"data-{n}", n)
        results.append(epoch_run(work, folder, n))
    base = next((r for r in results if r["images"] == 100), results[0])
    rows = []
    for r in results:
        per_cache = 1000 * r["caching_s"] / r["latents"]
        per_epoch = 1000 * r["epoch_s"] / r["images"]
        rows.append((r["images"], r["latents"], r["caching_s"], per_cache, r["steps"], r["epoch_s"],
                     per_epoch, (r["caching_s"] / base["caching_s"]) / (r["images"] / base["images"]),
                     (r["epoch_s"] / base["epoch_s"]) / (r["images"] / base["images"])))
    table = common.markdown_table(
        ("images", "latents", "caching s", "caching ms/latent", "epoch steps", "epoch s",
         "epoch ms/image", f"caching vs linear from {base['images']}",
         f"epoch vs linear from {base['images']}"), rows)
    t_write = time.perf_counter()
    folder = write_scan_dataset(work / "scale" / f"scan-{SCAN_IMAGES}", SCAN_IMAGES)
    write_s = time.perf_counter() - t_write
    s = scan(folder)
    table += "\n\n" + common.markdown_table(
        ("header scan", "images", "scan_dataset s", "ms/image", "plan_buckets s", "buckets",
         "pixel decodes (ImageFile.load calls)"),
        [("10,000 PNG/JPEG", s["images"], s["scan_s"], 1000 * s["scan_s"] / s["images"],
          s["buckets_s"], s["distinct_buckets"], s["pixel_decodes"])])
    notes = [
        "One epoch of run_training per dataset (64 px area, buckets 64-128, batch 4, flip_aug off, "
        "one torch thread). 'vs linear' = (time / time at the reference size) / (images / images "
        "at the reference size): 1.00 is exactly linear; above 1 at 10 images is a fixed cost "
        "(the first VAE call, partly filled batches) spread over few images.",
        f"Scan: {'no pixels decoded' if s['pixel_decodes'] == 0 else 'PIXELS WERE DECODED'} "
        f"({s['pixel_decodes']} ImageFile.load calls); writing the {SCAN_IMAGES} files took "
        f"{write_s:.1f} s (not counted).",
    ]
    return common.Section("5. Scale", table, notes, {"epochs": results, "scan": s},
                          time.perf_counter() - t0)


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
