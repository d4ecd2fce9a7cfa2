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


class ImageReadError(ValueError):
    """An image that cannot be decoded, as a sentence that names the file."""


def inspect_image(path: str | Path) -> tuple[int, int, bool]:
    """(width, height) as displayed (EXIF rotation applied) and whether it is animated (only its
    first frame would be trained on), from the file header only."""
    with Image.open(path) as image:
        width, height = image.size
        if exif_orientation(image) in (5, 6, 7, 8):
            width, height = height, width
        animated = bool(getattr(image, "is_animated", False))
    return width, height, animated


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the file header only."""
    width, height, _ = inspect_image(path)
    return width, height


def _upright(image: Image.Image) -> Image.Image:
    """The decoded image turned upright by its EXIF orientation."""
    orientation = exif_orientation(image)
    image.load()
    return image.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


# Where each format ends (the last bytes of a complete file hold the marker; a cut-short file does
# not): JPEG EOI (ITU T.81 B.2.1), PNG IEND (PNG spec 11.2.5), GIF trailer 0x3B (GIF89a 27).
_END_MARKERS = {b"\xff\xd8\xff": b"\xff\xd9", b"\x89PNG\r\n\x1a\n": b"IEND", b"GIF8": b"\x3b"}
_TAIL_BYTES = 4096


def image_problem(path: str | Path) -> str | None:
    """Why the image cannot be trained on (cut short, damaged), or None.

    Cheap for the usual file: its last bytes are checked for the format's end marker (and the
    declared length of WebP and BMP against the file's). Only a file that fails this is decoded, to
    tell a truncated file from one with data after the image (phone "motion photos")."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if _looks_complete(head, tail, size):
        return None
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
        return f"it is cut short or damaged ({exc})"
    return None


def _looks_complete(head: bytes, tail: bytes, size: int) -> bool:
    for magic, end in _END_MARKERS.items():
        if head.startswith(magic):
            return end in tail
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":  # RIFF size counts the bytes after 8
        return size >= int.from_bytes(head[4:8], "little") + 8
    if head[:2] == b"BM":  # BITMAPFILEHEADER bfSize (0 is allowed by some writers)
        return size >= int.from_bytes(head[2:6], "little")
    return True


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image upright and as RGB; transparency is composited onto white. An image that
    cannot be decoded (it changed after the scan, or is damaged past its end marker) raises an
    ``ImageReadError`` that names it."""
    try:
        return _open_rgb(path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"The image {path} cannot be read ({exc}): replace or remove it and "
                             "start again.") from None


def _open_rgb(path: str | Path) -> Image.Image:
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
    nw, nh, left, top = crop_window(image.size, bucket, crop_position)
    if (nw, nh) != image.size:
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    return image.crop((left, top, left + bw, top + bh))


def crop_window(
    size: tuple[int, int], bucket: Bucket, crop_position: tuple[float, float] | None = None
) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) of :func:`cover_and_crop` for an image
    of ``size`` (width, height): the image is scaled to cover the bucket, then cut to it."""
    bw, bh = bucket
    w, h = size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if crop_position is None:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        fx, fy = crop_position
        left = min(nw - bw, int(fx * (nw - bw + 1)))
        top = min(nh - bh, int(fy * (nh - bh + 1)))
    return nw, nh, left, top


def crop_top_left(
    size: tuple[int, int], bucket: Bucket, crop_position: tuple[float, float] | None = None, flip: bool = False
) -> tuple[int, int]:
    """(top, left): the pixels cut from the top and the left of the resized image, as the training
    pixels show it. A flip mirrors the crop window, so the cut on the left is what was cut on the
    right: ``resized width - left - bucket width`` (SDXL's crop conditioning c_top, c_left, Podell
    et al. 2023, section 2.2, is measured on the image the model sees)."""
    nw, _, left, top = crop_window(size, bucket, crop_position)
    return top, (nw - left - bucket[0]) if flip else left


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
    names = [relative.name] + [relative.stem + e for ext in sorted(extensions) for e in (ext, ext.upper())]
    for candidate in (folder / name for name in names):
        if candidate.is_file():
            return candidate
    return None


def has_alpha(path: str | Path) -> bool:
    """Whether the image has an alpha channel (its own loss mask with masked_loss)."""
    with Image.open(path) as image:
        return _has_alpha(image)
