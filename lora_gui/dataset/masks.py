"""Loss masks for ``masked_loss``, shown: an image with the parts its mask leaves out tinted.

The mask is read as the trainer reads it (kohya-ss/sd-scripts ``--masked_loss``: the image's own
alpha channel, or with a mask folder the red channel of the file at the same path below it,
any image format): white = trained, black = ignored, grey = partly. Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lora_gui.dataset.images import find_mask, has_alpha, open_mask, open_rgb
from lora_gui.dataset.scan import IMAGE_EXTENSIONS, DatasetError

TINT = (255, 0, 64)  # the colour laid over what the loss ignores
TINT_STRENGTH = 0.6


@dataclass(frozen=True)
class MaskPreview:
    image: Image.Image  # RGB, upright: ignored parts tinted
    mask: Image.Image | None  # "L", upright, the image's size; None = no mask (all trained)
    message: str


def find_mask_file(mask_folder: Path, image: Path, image_root: Path) -> Path | None:
    """The mask of ``image``: the same path below ``mask_folder`` as below ``image_root``, with the
    image's own extension or any other image extension (as training finds it: images.find_mask)."""
    try:
        relative = image.resolve().relative_to(image_root.resolve())
    except ValueError:
        relative = Path(image.name)
    return find_mask(mask_folder, relative, tuple(IMAGE_EXTENSIONS))


def read_mask(image: Path, mask_file: Path | None = None) -> Image.Image | None:
    """The mask as an upright "L" image, read as training reads it (images.open_mask): the red
    channel of ``mask_file``, else the image's alpha channel (None when it has none: the whole
    image is trained)."""
    try:
        if mask_file is not None:
            return open_mask(mask_file, alpha=False)
        return open_mask(image, alpha=True) if has_alpha(image) else None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"The mask of {image.name} cannot be read ({exc}): replace the file.") from None


def tint_ignored(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` where the mask is white, tinted where it is black, in between where grey."""
    tinted = Image.blend(image, Image.new("RGB", image.size, TINT), TINT_STRENGTH)
    return Image.composite(image, tinted, mask)


def mask_preview(image: Path, mask_folder: Path | None = None, image_root: Path | None = None,
                 size: int = 0) -> MaskPreview:
    """The image with its loss mask shown, and a sentence: how much of it is trained (or why
    there is no mask). ``size`` > 0 shrinks the preview to fit a square of that side."""
    picture = open_rgb(image)
    mask_file = None
    if mask_folder is not None:
        mask_file = find_mask_file(mask_folder, image, image_root or image.parent)
        if mask_file is None:
            return MaskPreview(picture, None, f"No mask for {image.name} in {mask_folder} (same sub-folder and "
                                              "name, any image format): masked_loss would stop on it.")
    mask = read_mask(image, mask_file)
    if mask is None:
        return MaskPreview(picture, None, f"{image.name} has no alpha channel: with masked_loss the whole "
                                          "image is trained.")
    note = ""
    if mask.size != picture.size:
        note = f" The mask is {mask.width}x{mask.height}, the image {picture.width}x{picture.height}: it is stretched."
        mask = mask.resize(picture.size, Image.Resampling.BILINEAR)
    histogram = mask.histogram()
    trained = sum(value * count for value, count in enumerate(histogram)) / (255 * mask.width * mask.height)
    source = f"mask {mask_file.name}" if mask_file else "alpha channel"
    shown = tint_ignored(picture, mask)
    if size:
        shown.thumbnail((size, size))
    return MaskPreview(shown, mask, f"{image.name}: {source}, {trained:.0%} of the image is trained "
                                    f"(tinted = ignored by the loss).{note}")
