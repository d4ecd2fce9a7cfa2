"""Planning shared by the preview and the training dataset (validation split, regularisation
cycling, batches per epoch) and the dataset summary the GUI shows. Never imports torch.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lora_gui.dataset.buckets import Bucket, BucketOptions, choose_bucket
from lora_gui.dataset.captions import sorted_tags, tag_frequency
from lora_gui.dataset.scan import DatasetInfo

T = TypeVar("T")


# --- planning shared by the summary and the training dataset -------------------------------------


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def validation_count(fraction: float, n_images: int) -> int:
    """Held-out images: round(fraction * n), at least 1 when fraction > 0 and n >= 2, at most n - 1."""
    if fraction <= 0 or n_images < 2:
        return 0
    return min(n_images - 1, max(1, round(fraction * n_images)))


def split_validation(paths: Sequence[Path], fraction: float, seed: int) -> set[Path]:
    """The seeded set of held-out image paths (a stable choice for a seed and a set of images)."""
    ordered = sorted(paths)
    rng = random.Random(derive_seed(seed, "validation"))
    return set(rng.sample(ordered, validation_count(fraction, len(ordered))))


def reg_repeats(repeats: Sequence[int], num_train: int) -> list[int]:
    """How many times each regularisation image appears per epoch, as sd-scripts
    ``DreamBoothDataset.__init__`` decides it. The images are taken in folder order (folders sorted by
    name, images sorted by file name, as sd-scripts' ``glob_images`` sorts them), each first with its
    folder's repeats until the count reaches ``num_train`` (the training images x repeats; the last
    image may overshoot it, later images are then left out); while the count is still short, every
    image gets one more repeat in turn until it reaches ``num_train``."""
    counts = [0] * len(repeats)
    total = 0
    for i, r in enumerate(repeats):
        if total >= num_train:
            return counts
        counts[i], total = r, total + r
    while counts and total < num_train:
        for i in range(len(counts)):
            counts[i], total = counts[i] + 1, total + 1
            if total >= num_train:
                break
    return counts


def reg_schedule(reg_images: Sequence[tuple[T, int]], num_train: int) -> list[T]:
    """The regularisation samples of every epoch: each (image, folder repeats) of ``reg_images``, in
    that order, as many times as :func:`reg_repeats` says."""
    counts = reg_repeats([r for _, r in reg_images], num_train)
    return [image for (image, _), n in zip(reg_images, counts) for _ in range(n)]


def count_batches(bucket_counts: dict[Bucket, int], batch_size: int) -> int:
    """Batches per epoch: batches never mix buckets, so each bucket rounds up on its own."""
    return sum(math.ceil(n / batch_size) for n in bucket_counts.values() if n)


def plan_buckets(info: DatasetInfo, options: BucketOptions) -> dict[Path, Bucket]:
    """The bucket of every image in ``info`` (the same plan for the preview and for training)."""
    sizes = options.sizes()
    return {
        image.path: choose_bucket(
            image.width,
            image.height,
            resolution=options.resolution,
            enable_buckets=options.buckets,
            no_upscale=options.bucket_no_upscale,
            step=options.bucket_reso_steps,
            buckets=sizes,
        )
        for subset in info.subsets
        for image in subset.images
    }


# --- summary for the GUI --------------------------------------------------------------------------


@dataclass
class FolderSummary:
    name: str
    folder: Path
    is_reg: bool
    repeats: int
    images: int
    captions: int
    without_captions: list[Path]
    buckets: dict[Bucket, int]
    top_tags: list[tuple[str, int]]


@dataclass
class DatasetSummary:
    folders: list[FolderSummary]
    train_images: int
    reg_images: int
    validation_images: int
    samples_per_epoch: int
    epoch_buckets: dict[Bucket, int]
    steps_per_epoch: int
    batch_size: int
    warnings: list[str]

    def to_markdown(self) -> str:
        """A table per folder and the totals, for the GUI's preview."""
        lines = [
            "| folder | kind | repeats | images | captions | no caption | buckets | top tags |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in self.folders:
            buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(f.buckets.items()))
            tags = ", ".join(f"{t} ({n})" for t, n in f.top_tags)
            lines.append(
                f"| {f.name} | {'reg' if f.is_reg else 'train'} | {f.repeats} | {f.images} | "
                f"{f.captions} | {len(f.without_captions)} | {buckets} | {tags} |"
            )
        lines.append("")
        lines.append(
            f"{self.train_images} training images ({self.validation_images} held out for validation), "
            f"{self.reg_images} regularisation images, {self.samples_per_epoch} samples per epoch, "
            f"{self.steps_per_epoch} steps per epoch at batch size {self.batch_size}."
        )
        lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines)


def dataset_summary(
    info: DatasetInfo,
    buckets: BucketOptions,
    *,
    batch_size: int,
    validation_split: float,
    seed: int,
    top_tags: int = 10,
) -> DatasetSummary:
    """Per-folder counts, buckets and top tags, and steps per epoch (same plan as training)."""
    bucket_of = plan_buckets(info, buckets)
    frequency = tag_frequency(info)
    folders = [
        FolderSummary(
            name=s.name,
            folder=s.folder,
            is_reg=s.is_reg,
            repeats=s.repeats,
            images=len(s.images),
            captions=sum(1 for i in s.images if i.caption is not None),
            without_captions=s.missing_captions,
            buckets=dict(Counter(bucket_of[i.path] for i in s.images)),
            top_tags=sorted_tags(frequency.get(s.name, {}))[:top_tags],
        )
        for s in info.subsets
    ]
    held_out = split_validation(
        [i.path for s in info.train_subsets for i in s.images], validation_split, seed
    )
    train = [
        bucket_of[i.path]
        for s in info.train_subsets
        for i in s.images
        if i.path not in held_out
        for _ in range(s.repeats)
    ]
    reg = [(bucket_of[i.path], s.repeats) for s in info.reg_subsets for i in s.images]
    epoch = Counter(train) + Counter(reg_schedule(reg, len(train)))
    return DatasetSummary(
        folders=folders,
        train_images=info.num_train_images,
        reg_images=info.num_reg_images,
        validation_images=len(held_out),
        samples_per_epoch=sum(epoch.values()),
        epoch_buckets=dict(epoch),
        steps_per_epoch=count_batches(epoch, batch_size),
        batch_size=batch_size,
        warnings=list(info.warnings),
    )
