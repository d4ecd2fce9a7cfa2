"""The dataset workbench on 1,000 generated images: what the Dataset tab's server does for a grid
page load, a filter, a bulk rename (and its undo), the checks, and captioning throughput.

Images: drawings of a shape on a background, sides 256-768 px in several aspect ratios, JPEG, a
caption file each except every 10th. Times are the server side of each action (the handler's work
without gradio's transfer): ``ui.dataset_tab.grid`` scans the folder (image headers), plans the
buckets, makes the 24 thumbnails of a page and the tag chart. Captioning runs the worker's job
loop in process with a tiny tagger whose input is 448 px like the released WD14 taggers, so it
measures the pipeline (decode, pad, resize, write captions), not a real ViT's inference.

Run alone: ``python -m bench.dataset_workbench`` (``BENCH_WORKBENCH_IMAGES`` to change 1000).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench import common

N_IMAGES = int(os.environ.get("BENCH_WORKBENCH_IMAGES", "1000"))
SIDES = (256, 384, 512, 640, 768)


def make_images(root: Path, n: int) -> Path:
    folder = root / f"workbench-{n}" / "5_things"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder.parent
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
        image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        box = sorted(rng.integers(0, w, 2)), sorted(rng.integers(0, h, 2))
        ImageDraw.Draw(image).ellipse((box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1),
                                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(folder / f"img{i:04d}.jpg", quality=90)
        if i % 10:
            (folder / f"img{i:04d}.txt").write_text(f"thing, colour{i % 7}, sitting, size{w}x{h}\n")
    return folder.parent


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return common.median(times), result


def run() -> common.Section:
    from lora_gui.dataset.browse import RowFilter
    from lora_gui.dataset.buckets import BucketOptions
    from lora_gui.dataset.workbench import Workbench
    from lora_gui.ui.dataset_tab import grid

    started = time.perf_counter()
    work = common.workdir()
    root = make_images(work, N_IMAGES)
    bench = Workbench(root, None, 1, ".txt", BucketOptions((512, 512), True, 256, 1024, 64, False))
    rows = []
    seconds, shown = timed(lambda: grid(bench, RowFilter(), 1))
    rows.append(("grid page 1 (scan, buckets, 24 thumbnails, chart)", seconds, len(shown["gallery"])))
    seconds, shown = timed(lambda: grid(bench, RowFilter(no_caption=True), 2))
    rows.append(("filter 'no caption', page 2", seconds, len(shown["gallery"])))
    seconds, result = timed(lambda: bench.bulk("rename tag everywhere", RowFilter(), "sitting", "seated"), 1)
    rows.append(("bulk rename over every caption", seconds, len(result.changed)))
    seconds, result = timed(lambda: bench.editor().undo(), 1)
    rows.append(("undo of the rename", seconds, len(result.changed)))
    seconds, report = timed(bench.check, 1)
    rows.append(("checks (decode, hashes, duplicates, captions)", seconds, report.images_checked))
    notes = [f"{N_IMAGES} images of 256-768 px (JPEG); times are medians of 3 for the grid, single runs "
             "otherwise; the last column counts thumbnails, files or images."]
    rate = caption_rate(root, work)
    if rate is not None:
        rows.append(("auto-caption, images per second (tiny 448 px tagger, in process)", rate, N_IMAGES))
    else:
        notes.append("Captioning was not measured: torch's ONNX exporter needs the onnx package.")
    table = common.markdown_table(["action", "seconds", "count"], rows)
    return common.Section("Dataset workbench", table, notes, {"rows": rows},
                          time.perf_counter() - started)


def caption_rate(root: Path, work: Path) -> float | None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return None
    sys.path.insert(0, str(common.ROOT / "tests" / "support"))
    from tiny_tagger import export_tiny_tagger

    from lora_gui.dataset.autocaption import CaptionJob
    from lora_gui.events import CommandQueue
    from lora_gui.worker.caption_job import caption_images

    tagger = export_tiny_tagger(work / "tagger-448", side=448)
    images = sorted(str(p) for p in root.rglob("*.jpg"))
    job = CaptionJob(images=images, tagger_dir=str(tagger), rule="append", batch_size=8,
                     undo_root=str(root))
    start = time.perf_counter()
    caption_images(job.check(), lambda event: None, CommandQueue())
    rate = len(images) / (time.perf_counter() - start)
    from lora_gui.dataset.edit import CaptionEditor

    CaptionEditor(root).undo()  # the dataset stays as generated for the next run
    return rate


if __name__ == "__main__":
    common.setup()
    common.print_section(run())
