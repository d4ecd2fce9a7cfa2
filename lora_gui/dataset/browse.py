"""The dataset as rows for browsing: every image with its folder, repeats, caption, size and bucket,
filters (tag, no caption, bucket, folder, text) and pages, and the tag counts of a set of rows.

Built from a scan (:func:`lora_gui.dataset.scan.scan_dataset`) and the bucket plan shared with
training (:func:`lora_gui.dataset.summary.plan_buckets`), so the bucket shown is the one trained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_gui.dataset.buckets import Bucket, BucketOptions
from lora_gui.dataset.captions import split_tags
from lora_gui.dataset.scan import DatasetInfo
from lora_gui.dataset.summary import plan_buckets


@dataclass(frozen=True)
class Row:
    path: Path
    folder: str
    is_reg: bool
    repeats: int
    caption: str | None
    width: int
    height: int
    bucket: Bucket

    @property
    def tags(self) -> list[str]:
        return split_tags(self.caption or "")

    @property
    def bucket_label(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"

    def label(self) -> str:
        kind = "reg " if self.is_reg else ""
        caption = self.caption if self.caption is not None else "(no caption)"
        return (f"{self.path.name} · {kind}{self.folder} ×{self.repeats} · {self.width}x{self.height} → "
                f"{self.bucket_label}\n{caption}")


def dataset_rows(info: DatasetInfo, options: BucketOptions) -> list[Row]:
    bucket_of = plan_buckets(info, options)
    return [
        Row(image.path, subset.name, subset.is_reg, subset.repeats, image.caption, image.width,
            image.height, bucket_of[image.path])
        for subset in info.subsets
        for image in subset.images
    ]


@dataclass(frozen=True)
class RowFilter:
    """Which rows to show (and to edit in bulk). Empty fields match everything."""

    tag: str = ""
    no_caption: bool = False
    bucket: str = ""
    folder: str = ""
    text: str = ""

    def matches(self, row: Row) -> bool:
        if self.no_caption and row.caption is not None:
            return False
        if self.tag and " ".join(self.tag.split()) not in row.tags:
            return False
        if self.bucket and row.bucket_label != self.bucket.replace(" ", ""):
            return False
        if self.folder and row.folder != self.folder:
            return False
        return not self.text or self.text.lower() in f"{row.path.name} {row.caption or ''}".lower()


def filter_rows(rows: Iterable[Row], row_filter: RowFilter) -> list[Row]:
    return [row for row in rows if row_filter.matches(row)]


def page_of(rows: Sequence[Row], page: int, per_page: int) -> tuple[list[Row], int, int]:
    """The rows of ``page`` (1-based, clamped), that page number and the number of pages."""
    pages = max(1, math.ceil(len(rows) / per_page))
    page = min(max(1, page), pages)
    return list(rows[(page - 1) * per_page: page * per_page]), page, pages


def tag_counts(rows: Iterable[Row]) -> Counter[str]:
    """How many of ``rows`` carry each tag in their caption file (each image once)."""
    counts: Counter[str] = Counter()
    for row in rows:
        counts.update(dict.fromkeys(row.tags, 1))
    return counts


def bucket_labels(rows: Iterable[Row]) -> list[str]:
    return sorted({row.bucket_label for row in rows}, key=lambda s: tuple(int(x) for x in s.split("x")))
