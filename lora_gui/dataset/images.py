"""Reading images upright and the training transform (cover, crop, flip, hue). Pillow + numpy only.

The scan reads sizes with :func:`read_image_size` (header only) and the loader decodes with
:func:`open_rgb`; both apply the EXIF orientation the same way, so the planned bucket always fits
the loaded pixels. See REFERENCE.md, "Image processing".
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from lora_gui.dataset.buckets import Bucket

# EXIF orientation -> the Pillow transpose that makes the pixels upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# color_aug: hue shifted by up to this many degrees (a "small hue jitter").
MAX_HUE_SHIFT_DEGREES = 10.0


# --- reading images -------------------------------------------------------------------------------


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1..8) from the bytes Pillow read with the header; never decodes pixels.

    Only ``image.info["exif"]`` is used (``Image.getexif`` would decode a PNG), and the loader uses
    this same function, so the scanned size and the loaded pixels always agree.
    """
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block must not make the image unusable
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the file header only."""
    with Image.open(path) as image:
        width, height = image.size
        if exif_orientation(image) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def _upright(image: Image.Image) -> Image.Image:
    """The decoded image turned upright by its EXIF orientation."""
    orientation = exif_orientation(image)
    image.load()
    return image.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image upright and as RGB; transparency is composited onto white."""
    with Image.open(path) as image:
        image = _upright(image)
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


# --- the transform --------------------------------------------------------------------------------


def cover_and_crop(
    image: Image.Image, bucket: Bucket, *, crop_position: tuple[float, float] | None = None
) -> Image.Image:
    """Scale ``image`` to cover ``bucket`` (LANCZOS) and crop it to exactly the bucket size.

    ``crop_position`` = (x, y) in [0, 1] picks the crop window (random crop); None = centre crop.
    """
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop_position is None:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        fx, fy = crop_position
        left = min(nw - bw, int(fx * (nw - bw + 1)))
        top = min(nh - bh, int(fy * (nh - bh + 1)))
    return image.crop((left, top, left + bw, top + bh))


def shift_hue(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of an HWC float RGB array in [0, 1] by ``shift`` turns (HSV, numpy)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(
        maxc == r, ((g - b) / safe) % 6.0, np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    hue = np.where(delta > 0, hue / 6.0, 0.0)
    sat = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    hue = (hue + shift) % 1.0
    # HSV -> RGB: each channel is v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6.
    out = np.empty_like(rgb)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = (n + hue * 6.0) % 6.0
        out[..., channel] = maxc - maxc * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return out


def image_to_array(
    image: Image.Image,
    bucket: Bucket,
    *,
    flip: bool = False,
    crop_position: tuple[float, float] | None = None,
    hue_shift: float = 0.0,
) -> np.ndarray:
    """Cover + crop to ``bucket``, optionally flip and shift the hue; float32 CHW in [-1, 1]."""
    image = cover_and_crop(image, bucket, crop_position=crop_position)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if hue_shift:
        array = shift_hue(array, hue_shift)
    return np.ascontiguousarray((array * 2.0 - 1.0).transpose(2, 0, 1))


def load_image_array(
    path: str | Path,
    bucket: Bucket,
    *,
    flip: bool = False,
    crop_position: tuple[float, float] | None = None,
    hue_shift: float = 0.0,
) -> np.ndarray:
    """Read ``path`` and return the training pixels for ``bucket`` (see :func:`image_to_array`)."""
    return image_to_array(open_rgb(path), bucket, flip=flip, crop_position=crop_position, hue_shift=hue_shift)


def random_hue_shift(rng: random.Random) -> float:
    """A hue shift in turns, uniform in +-MAX_HUE_SHIFT_DEGREES."""
    return rng.uniform(-MAX_HUE_SHIFT_DEGREES, MAX_HUE_SHIFT_DEGREES) / 360.0


# --- loss masks (masked_loss) ---------------------------------------------------------------------


def open_mask(path: str | Path, *, alpha: bool) -> Image.Image:
    """The loss mask of an image as an 8-bit greyscale image: the image's own alpha channel
    (``alpha``; fully opaque when it has none), or the red channel of a mask file, as sd-scripts
    reads ``alpha_mask`` and conditioning images (white = trained, black = ignored)."""
    with Image.open(path) as image:
        image = _upright(image)
        if not alpha:
            return image.convert("RGB").getchannel("R")
        return image.convert("RGBA").getchannel("A") if _has_alpha(image) else Image.new("L", image.size, 255)


def load_mask_array(path: str | Path, bucket: Bucket, *, alpha: bool, flip: bool = False,
                    crop_position: tuple[float, float] | None = None) -> np.ndarray:
    """The mask for ``bucket`` with the same cover, crop and flip as the image: float32 [1, H, W]
    in [0, 1]."""
    mask = cover_and_crop(open_mask(path, alpha=alpha), bucket, crop_position=crop_position)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(mask, dtype=np.float32) / 255.0)[None]


def find_mask(mask_folder: Path, relative: Path, extensions: tuple[str, ...]) -> Path | None:
    """The mask of the image at ``relative`` (its path below the image folder): the same path below
    ``mask_folder``, with the image's own or any other image extension."""
    folder = mask_folder / relative.parent
    for candidate in [folder / relative.name] + [folder / (relative.stem + e) for e in extensions]:
        if candidate.is_file():
            return candidate
    return None
