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

from .ldm_keys import to_single_file_state_dict

DEMO_PROMPTS = (
    "red circle, blue background, large",
    "green square, white background, small --w 64 --h 64 --d 1 --s 4",
    "yellow triangle, black background --n blurry --w 64 --h 96 --d 2 --l 5 --s 4",
)

DEMO_MERGES = 2000  # BPE merges of the demo tokenizer: 512 + 2000 + 2 = 2514 tokens
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
# model
# --------------------------------------------------------------------------------------------


def _tiny_components(seed: int):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import MAX_LENGTH, clip_tokenizer

    tokenizer = clip_tokenizer(DEMO_MERGES)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.5's training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return tokenizer, text_encoder, unet, vae, scheduler


def write_tiny_sd(model_dir: Path, single_file: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    tokenizer, text_encoder, unet, vae, scheduler = _tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    state = to_single_file_state_dict(unet, vae, text_encoder)
    save_file(state, str(single_file), metadata={"format": "pt"})


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
