"""A tiny offline demo: a random SD-1.x-shaped model and a procedurally drawn dataset.

``build_demo(out_dir, seed)`` writes, with no download and bit-identically for a given seed::

    out_dir/
      lora_gui_demo.json    marker (lets a rebuild replace what an earlier build wrote)
      model/                diffusers folder (StableDiffusionPipeline.save_pretrained)
      model.safetensors     the same weights as one A1111/CompVis-layout file
      dataset/5_shapes/     12 images with .txt captions
      dataset/3_circles/    6 circle images, one of them deliberately without a caption
      reg/1_shape/          4 regularisation images (no captions: the class token "shape" is used)

The model is randomly initialised, so its images are noise; it exists to exercise loading,
training, saving and sampling end to end in seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_gui.engine.families.sd_demo import DEMO_MERGES, _tiny_components  # noqa: F401 (re-exported)

DEMO_PROMPTS = (
    "red circle, blue background, large",
    "green square, white background, small --w 64 --h 64 --d 1 --s 4",
    "yellow triangle, black background --n blurry --w 64 --h 96 --d 2 --l 5 --s 4",
)

_MARKER = "lora_gui_demo.json"

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIDES = (48, 64, 80, 96, 128, 160)


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    model_dir: Path
    single_file: Path
    dataset_dir: Path
    reg_dir: Path


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _draw(rng: np.random.Generator, shape: str, fg: str, bg: str, size: str, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    frac = {"small": 0.35, "medium": 0.55, "large": 0.8}[size]
    r = frac * min(w, h) / 2
    cx = w / 2 + rng.uniform(-0.5, 0.5) * (w / 2 - r)
    cy = h / 2 + rng.uniform(-0.5, 0.5) * (h / 2 - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[fg])
    # A little deterministic pixel noise so images are not flat colour fields.
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    w, h = int(rng.choice(SIDES)), int(rng.choice(SIDES))
    return w, h


def _write_images(
    folder: Path, rng: np.random.Generator, n: int, shapes, *, captions=True, skip_caption=-1
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fg_names = ("red", "green", "blue", "yellow", "purple")
    bg_names = ("white", "black", "grey", "blue", "yellow")
    for i in range(n):
        shape = shapes[i % len(shapes)]
        fg = fg_names[int(rng.integers(len(fg_names)))]
        bg = bg_names[int(rng.integers(len(bg_names)))]
        if bg == fg:
            bg = "white"
        size = ("small", "medium", "large")[int(rng.integers(3))]
        w, h = _image_size(rng)
        stem = f"{folder.name.split('_', 1)[1]}_{i:02d}"
        # Pillow writes no timestamp into PNGs, so the bytes depend on the pixels only.
        _draw(rng, shape, fg, bg, size, w, h).save(folder / f"{stem}.png", format="PNG")
        if captions and i != skip_caption:
            (folder / f"{stem}.txt").write_text(f"{fg} {shape}, {bg} background, {size}\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def build_demo(out_dir: str | Path, seed: int = 0, family: str = "sd") -> DemoPaths:
    """Write the demo model, its single-file twin, a dataset and regularisation images.

    Deterministic: two builds with the same seed give bit-identical files. ``out_dir`` must be
    empty, missing, or an earlier demo build (recognised by its marker file), which is replaced.
    """
    root = Path(out_dir)
    paths = DemoPaths(
        root=root,
        model_dir=root / "model",
        single_file=root / "model.safetensors",
        dataset_dir=root / "dataset",
        reg_dir=root / "reg",
    )
    if root.exists() and any(root.iterdir()) and not (root / _MARKER).is_file():
        raise ValueError(
            f"{root} is not empty and is not a demo folder: choose an empty or new folder for the demo."
        )
    root.mkdir(parents=True, exist_ok=True)
    for old in (paths.model_dir, paths.dataset_dir, paths.reg_dir):
        if old.exists():
            shutil.rmtree(old)
    paths.single_file.unlink(missing_ok=True)

    from lora_gui.engine.families import FAMILIES

    FAMILIES[family].write_demo_model(paths.model_dir, paths.single_file, seed)
    rng = np.random.default_rng(seed)
    _write_images(paths.dataset_dir / "5_shapes", rng, 12, SHAPES)
    _write_images(paths.dataset_dir / "3_circles", rng, 6, ("circle",), skip_caption=5)
    _write_images(paths.reg_dir / "1_shape", rng, 4, SHAPES, captions=False)
    (root / _MARKER).write_text(json.dumps({"seed": seed, "family": family, "prompts": list(DEMO_PROMPTS)}, indent=1) + "\n")
    return paths
