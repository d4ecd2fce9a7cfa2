"""Dataset folders, captions, tag counts and the GUI's dataset summary. Never imports torch.

The web process imports this module (folder preview), so it uses only the standard library,
Pillow (header reads, never pixel decoding) and :mod:`lora_gui.dataset.buckets`.

Folder layouts (REFERENCE.md, "img_folder"): a parent of ``N_name`` folders (N = repeats, the rest
of the name = class tokens), or one plain folder of images that uses the ``repeats`` setting.
Caption order (REFERENCE.md, "Labels"): trigger words, whole-caption dropout, split on commas, keep
the first ``keep_tokens``, shuffle the rest, drop tags, join with ", ".
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import UnidentifiedImageError

from lora_gui.dataset.buckets import Bucket, choose_bucket, make_buckets, read_image_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
T = TypeVar("T")


class DatasetError(ValueError):
    """A dataset folder problem, as one sentence that names the folder and says what to do."""


@dataclass(frozen=True)
class ImageEntry:
    """One image: its path, the caption file's text (None: no caption file), its upright size."""

    path: Path
    caption: str | None
    width: int
    height: int


@dataclass
class Subset:
    """One folder of images with its repeats and class tokens."""

    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: list[ImageEntry] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    def caption_for(self, image: ImageEntry) -> str:
        """The caption trained with: the caption file, or the class tokens when there is none."""
        return image.caption if image.caption is not None else self.class_tokens

    @property
    def missing_captions(self) -> list[Path]:
        return [image.path for image in self.images if image.caption is None]


@dataclass
class DatasetInfo:
    """The result of :func:`scan_dataset`: folders, warnings (sentences) and counts."""

    subsets: list[Subset]
    warnings: list[str] = field(default_factory=list)
    trigger_words: str = ""
    caption_extension: str = ".txt"

    @property
    def train_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if not s.is_reg]

    @property
    def reg_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg]

    @property
    def num_train_images(self) -> int:
        return sum(len(s.images) for s in self.train_subsets)

    @property
    def num_reg_images(self) -> int:
        return sum(len(s.images) for s in self.reg_subsets)

    @property
    def num_train_items(self) -> int:
        """Training samples per epoch before regularisation: images x repeats."""
        return sum(len(s.images) * s.repeats for s in self.train_subsets)

    @property
    def num_epoch_samples(self) -> int:
        """Samples per epoch: twice the train items when there are regularisation images."""
        return self.num_train_items * (2 if self.num_reg_images else 1)

    @property
    def images_without_captions(self) -> list[Path]:
        return [path for s in self.subsets for path in s.missing_captions]

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``ss_dataset_dirs`` metadata: {folder: {n_repeats, img_count}}."""
        return {s.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in self.subsets}


# --- scanning -------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    # Hidden files (macOS "._name.png" forks, our temporary files) are never images.
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _read_caption(image: Path, extension: str) -> str | None:
    """The first non-empty line of ``<stem><extension>``; None when missing or empty."""
    caption_path = image.with_name(image.stem + extension)
    if not caption_path.is_file():
        return None
    text = caption_path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def _scan_subset(
    folder: Path, repeats: int, class_tokens: str, is_reg: bool, extension: str, warnings: list[str]
) -> Subset:
    subset = Subset(folder=folder, repeats=repeats, class_tokens=class_tokens, is_reg=is_reg)
    for path in _image_files(folder):
        try:
            width, height = read_image_size(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            warnings.append(f"Skipped {path}: it could not be read as an image ({exc}).")
            continue
        subset.images.append(ImageEntry(path, _read_caption(path, extension), width, height))
    return subset


def _scan_root(
    root: Path, *, repeats: int, is_reg: bool, extension: str, warnings: list[str]
) -> list[Subset]:
    kind = "regularisation folder" if is_reg else "image folder"
    setting = "reg_img_folder" if is_reg else "img_folder"
    if not root.exists():
        raise DatasetError(f"The {kind} {root} does not exist: check the {setting} setting.")
    if not root.is_dir():
        raise DatasetError(f"The {kind} {root} is a file, not a folder: choose its parent folder.")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    numbered = [(p, _REPEATS_FOLDER.match(p.name)) for p in subfolders]
    numbered = [(p, m) for p, m in numbered if m]
    loose = _image_files(root)
    subsets: list[Subset] = []
    if numbered:
        for folder, match in numbered:
            n, name = int(match.group(1)), match.group(2)
            if n == 0:
                warnings.append(f"Skipped {folder}: 0 repeats means it is never used.")
                continue
            subset = _scan_subset(folder, n, name, is_reg, extension, warnings)
            if not subset.images:
                warnings.append(f"Skipped {folder}: it contains no images.")
                continue
            subsets.append(subset)
        others = [p.name for p in subfolders if not _REPEATS_FOLDER.match(p.name)]
        if others:
            warnings.append(
                f"Ignored folders in {root} without an N_ prefix ({', '.join(others)}): "
                "rename them like 10_name to use them."
            )
        if loose:
            warnings.append(
                f"Ignored {len(loose)} images directly inside {root}: move them into an N_name folder "
                "to use them."
            )
    elif loose:
        match = _REPEATS_FOLDER.match(root.name)
        if match and int(match.group(1)) > 0:
            n, name = int(match.group(1)), match.group(2)
            warnings.append(
                f"The {kind} {root} is itself named N_name: using repeats = {n} and class tokens "
                f"'{name}' from its name."
            )
        else:
            n = 1 if is_reg else repeats
            name = root.name
            warnings.append(f"The {kind} {root} has no N_ prefix: using repeats = {n}.")
        subsets.append(_scan_subset(root, n, name, is_reg, extension, warnings))
    if not any(s.images for s in subsets):
        raise DatasetError(
            f"The {kind} {root} has no usable images: it must contain images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or N_name folders of images (for example 10_mychar)."
        )
    return subsets


def scan_dataset(
    img_folder: str | Path,
    reg_folder: str | Path | None = None,
    *,
    repeats: int,
    caption_extension: str = ".txt",
    trigger_words: str = "",
) -> DatasetInfo:
    """Scan the training (and regularisation) folders. Reads image headers only, never pixels.

    Raises :class:`DatasetError` when a folder is missing or holds no images.
    """
    if repeats < 1:
        raise DatasetError(f"repeats must be at least 1 (got {repeats}): set repeats to 1 or more.")
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    warnings: list[str] = []
    subsets = _scan_root(
        Path(img_folder), repeats=repeats, is_reg=False, extension=caption_extension, warnings=warnings
    )
    if reg_folder:
        subsets += _scan_root(
            Path(reg_folder), repeats=repeats, is_reg=True, extension=caption_extension, warnings=warnings
        )
    info = DatasetInfo(subsets, warnings, trigger_words.strip(), caption_extension)
    missing = len(info.images_without_captions)
    if missing:
        warnings.append(
            f"{missing} images have no {caption_extension} caption: their folder's class tokens are "
            "used instead."
        )
    return info


# --- captions -------------------------------------------------------------------------------------


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones removed."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def process_caption(
    caption: str,
    *,
    trigger_words: str = "",
    keep_tokens: int = 0,
    shuffle: bool = False,
    tag_dropout_rate: float = 0.0,
    dropout_rate: float = 0.0,
    drop_all: bool = False,
    rng: random.Random,
) -> str:
    """The caption a sample is trained with (REFERENCE.md order).

    Trigger words come first and are never shuffled or dropped (only whole-caption dropout removes
    them); a trigger word already in the caption is not repeated. ``keep_tokens`` counts tags from
    the start of trigger words + caption, as kohya does with its caption prefix, so keep_tokens = 1
    keeps "mychar" first whether it is a trigger word or the caption's first tag.
    Whole-caption dropout (``dropout_rate``, or ``drop_all``) returns "" (unconditional).
    """
    if drop_all or (dropout_rate > 0 and rng.random() < dropout_rate):
        return ""
    triggers = split_tags(trigger_words)
    trigger_set = {t.lower() for t in triggers}
    tags = triggers + [t for t in split_tags(caption) if t.lower() not in trigger_set]
    n_keep = max(keep_tokens, len(triggers))
    kept, rest = tags[:n_keep], tags[n_keep:]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    return ", ".join(kept + rest)


def drop_all_captions(epoch: int, every_n_epochs: int) -> bool:
    """caption_dropout_every_n_epochs: True in every N-th epoch (``epoch`` counts from 0)."""
    return every_n_epochs > 0 and (epoch + 1) % every_n_epochs == 0


# --- tags -----------------------------------------------------------------------------------------


def tag_frequency(info: DatasetInfo) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: {folder name: {tag: count}} over the captions trained with.

    Counts each image once (not multiplied by repeats); images without a caption file count their
    class tokens; trigger words are not added.
    """
    result: dict[str, dict[str, int]] = {}
    for subset in info.subsets:
        counts = Counter(result.get(subset.name, {}))
        for image in subset.images:
            counts.update(split_tags(subset.caption_for(image)))
        result[subset.name] = dict(counts)
    return result


def _total_tags(info: DatasetInfo) -> Counter[str]:
    total: Counter[str] = Counter()
    for counts in tag_frequency(info).values():
        total.update(counts)
    return total


def sorted_tags(counts: dict[str, int], alphabetical: bool = False) -> list[tuple[str, int]]:
    """By count descending then name, or by name."""
    if alphabetical:
        return sorted(counts.items(), key=lambda kv: (kv[0].lower(), kv[0]))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].lower(), kv[0]))


def write_tag_report(path: str | Path, info: DatasetInfo, alphabetical: bool = False) -> Path:
    """Write one ``tag: count`` line per tag (all folders together); atomic. Returns the path."""
    path = Path(path)
    lines = [f"{tag}: {count}\n" for tag, count in sorted_tags(_total_tags(info), alphabetical)]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


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


def cycle_to_length(pool: Sequence[T], length: int, seed: int) -> list[T]:
    """Regularisation samples: ``pool`` in a seeded order, cycled to exactly ``length`` items.

    The choice is fixed for a seed (not per epoch) so every epoch has the same buckets and thus the
    same number of steps.
    """
    if not pool or length <= 0:
        return []
    order = list(pool)
    random.Random(derive_seed(seed, "reg")).shuffle(order)
    return [order[i % len(order)] for i in range(length)]


def count_batches(bucket_counts: dict[Bucket, int], batch_size: int) -> int:
    """Batches per epoch: batches never mix buckets, so each bucket rounds up on its own."""
    return sum(math.ceil(n / batch_size) for n in bucket_counts.values() if n)


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


def plan_buckets(
    info: DatasetInfo,
    *,
    resolution: tuple[int, int],
    enable_buckets: bool,
    min_reso: int,
    max_reso: int,
    step: int,
    no_upscale: bool,
) -> dict[Path, Bucket]:
    """The bucket of every image in ``info``."""
    buckets = make_buckets(resolution, min_reso, max_reso, step) if enable_buckets else []
    return {
        image.path: choose_bucket(
            image.width,
            image.height,
            resolution=resolution,
            enable_buckets=enable_buckets,
            no_upscale=no_upscale,
            step=step,
            buckets=buckets,
        )
        for subset in info.subsets
        for image in subset.images
    }


def dataset_summary(
    info: DatasetInfo,
    *,
    batch_size: int = 1,
    resolution: tuple[int, int] = (512, 512),
    enable_buckets: bool = True,
    min_reso: int = 256,
    max_reso: int = 1024,
    step: int = 64,
    no_upscale: bool = False,
    validation_split: float = 0.0,
    seed: int = 0,
    top_tags: int = 10,
) -> DatasetSummary:
    """Per-folder counts, buckets and top tags, and steps per epoch (same plan as training)."""
    bucket_of = plan_buckets(
        info,
        resolution=resolution,
        enable_buckets=enable_buckets,
        min_reso=min_reso,
        max_reso=max_reso,
        step=step,
        no_upscale=no_upscale,
    )
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
    reg_pool = [bucket_of[i.path] for s in info.reg_subsets for i in s.images for _ in range(s.repeats)]
    epoch = Counter(train) + Counter(cycle_to_length(reg_pool, len(train), seed))
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


def iter_images(info: DatasetInfo) -> Iterable[tuple[Subset, ImageEntry]]:
    for subset in info.subsets:
        for image in subset.images:
            yield subset, image


__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "DatasetInfo",
    "DatasetSummary",
    "FolderSummary",
    "ImageEntry",
    "Subset",
    "count_batches",
    "cycle_to_length",
    "dataset_summary",
    "derive_seed",
    "drop_all_captions",
    "iter_images",
    "plan_buckets",
    "process_caption",
    "scan_dataset",
    "sorted_tags",
    "split_tags",
    "split_validation",
    "tag_frequency",
    "validation_count",
    "write_tag_report",
]
