"""Dataset folders: the scan of image folders, repeats, class tokens and caption files.

The web process imports this module (folder preview), so it uses only the standard library and
Pillow (header reads, never pixel decoding).

Folder layouts (REFERENCE.md, "img_folder"): a parent of ``N_name`` folders (N = repeats, the rest
of the name = class tokens), or one plain folder of images that uses the ``repeats`` setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from lora_gui.dataset.images import read_image_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


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


def iter_images(info: DatasetInfo) -> Iterable[tuple[Subset, ImageEntry]]:
    for subset in info.subsets:
        for image in subset.images:
            yield subset, image
