"""Aspect-ratio buckets: the bucket sizes, the bucket of each image, and the bucket options.

Buckets follow kohya-ss/sd-scripts (see REFERENCE.md, "Image processing"): a set of (width, height)
sizes whose area is at most the training area, both orientations, sides multiples of a step. Each
image goes to the bucket with the nearest aspect ratio, is scaled to COVER it and then cropped
(:mod:`lora_gui.dataset.images`), so a batch (which never mixes buckets) is one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_gui.settings import TrainingSettings

Bucket = tuple[int, int]


@dataclass(frozen=True)
class BucketOptions:
    """The bucket settings, read from the settings in one place: each field is the ``ImageSettings``
    setting of the same name (``resolution`` as (width, height)).

    No defaults and no checks of its own: the schema declares and checks them.
    """

    resolution: tuple[int, int]
    buckets: bool
    min_bucket_resolution: int
    max_bucket_resolution: int
    bucket_reso_steps: int
    bucket_no_upscale: bool

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> BucketOptions:
        img = settings.images
        same = {f.name: getattr(img, f.name) for f in fields(cls) if f.name != "resolution"}
        return cls(resolution=img.resolution_wh, **same)

    def sizes(self) -> list[Bucket]:
        """The bucket sizes (none when bucketing is off: every image goes to the resolution)."""
        if not self.buckets:
            return []
        return make_buckets(self.resolution, self.min_bucket_resolution, self.max_bucket_resolution,
                            self.bucket_reso_steps)


def _floor_to(value: float, step: int) -> int:
    # The epsilon keeps 511.9999999 (float noise of an exact 512) from flooring to 448.
    return int(math.floor(value / step + 1e-9)) * step


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """All bucket sizes for a training area, sorted. kohya's algorithm:

    max_area = W*H; the square floor(sqrt(area)/step)*step; then for widths from ``min_reso`` to
    ``max_reso`` in ``step``s, height = min(max_reso, floor(area/width/step)*step), kept (in both
    orientations) when height >= min_reso. 512x512, 256..1024, step 64 gives 17 buckets.
    """
    width, height = resolution
    if step <= 0 or min_reso <= 0 or max_reso < min_reso:
        raise ValueError(
            f"bucket limits must satisfy 0 < min ({min_reso}) <= max ({max_reso}) and step ({step}) > 0"
        )
    max_area = width * height
    side = _floor_to(math.sqrt(max_area), step)
    buckets: set[Bucket] = {(side, side)}
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (max_area // w // step) * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's.

    Distance is |log(ar_bucket) - log(ar_image)| so that portrait and landscape are treated alike;
    ties go to the first bucket in sorted order.
    """
    log_ar = math.log(width / height)
    return min(sorted(buckets), key=lambda b: abs(math.log(b[0] / b[1]) - log_ar))


def no_upscale_bucket(width: int, height: int, max_area: int, step: int) -> Bucket:
    """bucket_no_upscale: a per-image bucket that never enlarges the image.

    Larger than ``max_area``: scaled down to the area keeping the aspect ratio, then both sides
    floored to ``step``. Otherwise the image's own size floored to ``step``. A side is never below
    one ``step`` (an image smaller than a step is the one case that is enlarged, to a single step).
    """
    w, h = float(width), float(height)
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        w, h = w * scale, h * scale
    return max(step, _floor_to(w, step)), max(step, _floor_to(h, step))


def choose_bucket(
    width: int,
    height: int,
    *,
    resolution: tuple[int, int],
    enable_buckets: bool = True,
    no_upscale: bool = False,
    step: int = 64,
    buckets: Iterable[Bucket] = (),
) -> Bucket:
    """The bucket for one image under the bucket settings (``buckets`` from :func:`make_buckets`).

    Buckets off: every image goes to the resolution itself.
    """
    if not enable_buckets:
        return tuple(resolution)  # type: ignore[return-value]
    if no_upscale:
        return no_upscale_bucket(width, height, resolution[0] * resolution[1], step)
    return assign_bucket(width, height, buckets)
