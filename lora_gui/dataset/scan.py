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

from lora_gui.dataset.images import image_problem, inspect_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files that sit beside images without being images: captions, latent caches, notes.
SIDE_FILE_EXTENSIONS = (".txt", ".caption", ".npz", ".json", ".toml", ".md", ".db", ".ini")
MAX_FOLDER_REPEATS = 10000  # as the repeats setting
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
    # Files that would break or silently change training (unreadable images, non-UTF-8 captions):
    # skipped or read with a warning, or a DatasetError when the scan is strict.
    problems: list[str] = field(default_factory=list)
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


def _other_files(folder: Path, caption_extension: str) -> list[Path]:
    """Files that are neither images lora-gui trains on nor the usual side files."""
    side = {*SIDE_FILE_EXTENSIONS, caption_extension.lower()}
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()
                  and p.suffix.lower() not in (*IMAGE_EXTENSIONS, *side))


def _read_caption(image: Path, extension: str, problems: list[str]) -> str | None:
    """The first non-empty line of ``<stem><extension>``; None when missing or empty. A file that
    is not UTF-8 is read as Windows-1252 (what such files usually are) and reported."""
    caption_path = image.with_name(image.stem + extension)
    if not caption_path.is_file():
        return None
    raw = caption_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        problems.append(f"The caption {caption_path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                        f"at position {exc.start}); it was read as Windows-1252: "
                        f"\"{text.strip()[:60]}\". Save it as UTF-8 to be sure of its words.")
    for line in text.lstrip("\ufeff").splitlines():
        if line.strip():
            return line.strip()
    return None


def _scan_subset(
    folder: Path, repeats: int, class_tokens: str, is_reg: bool, extension: str,
    warnings: list[str], problems: list[str],
) -> Subset:
    subset = Subset(folder=folder, repeats=repeats, class_tokens=class_tokens, is_reg=is_reg)
    for path in _image_files(folder):
        try:
            width, height, animated = inspect_image(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            problems.append(f"Skipped {path}: it could not be read as an image ({exc}).")
            continue
        problem = image_problem(path)
        if problem:
            problems.append(f"Skipped {path}: {problem}.")
            continue
        if animated:
            warnings.append(f"{path} is animated: only its first frame is trained on.")
        subset.images.append(ImageEntry(path, _read_caption(path, extension, problems), width,
                                        height))
    others = _other_files(folder, extension)
    if others:
        shown = ", ".join(p.name for p in others[:8]) + (" …" if len(others) > 8 else "")
        warnings.append(f"Skipped {len(others)} files in {folder} that are not images lora-gui "
                        f"trains on ({shown}): convert them to {', '.join(IMAGE_EXTENSIONS)} to use "
                        "them (an animated GIF's frames are separate images).")
    return subset


def _scan_root(
    root: Path, *, repeats: int, is_reg: bool, extension: str, warnings: list[str],
    problems: list[str],
) -> list[Subset]:
    kind = "regularisation folder" if is_reg else "image folder"
    setting = "reg_img_folder" if is_reg else "img_folder"
    if not root.exists():
        raise DatasetError(f"The {kind} {root} does not exist: check the {setting} setting.")
    if not root.is_dir():
        raise DatasetError(f"The {kind} {root} is a file, not a folder: choose its parent folder.")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    numbered = [(p, _REPEATS_FOLDER.match(p.name)) for p in subfolders]
    numbered = [(p, m) for p, m in numbered if m]
    loose = _image_files(root)
    subsets: list[Subset] = []
    unused: list[str] = []  # "name (why)" of every sub-folder not used, for the error below
    if numbered:
        for folder, match in numbered:
            n, name = int(match.group(1)), match.group(2)
            why = _unusable_repeats(n)
            if why:
                warnings.append(f"Skipped {folder}: {why}.")
                unused.append(f"{folder.name} ({why})")
                continue
            subset = _scan_subset(folder, n, name, is_reg, extension, warnings, problems)
            if not subset.images:
                warnings.append(f"Skipped {folder}: it contains no usable images.")
                unused.append(f"{folder.name} (no usable images)")
                continue
            subsets.append(subset)
        others = [p.name for p in subfolders if not _REPEATS_FOLDER.match(p.name)]
        if others:
            warnings.append(
                f"Ignored folders in {root} without an N_ prefix ({', '.join(others)}): "
                "rename them like 10_name to use them."
            )
            unused += [f"{name} (no N_ prefix: rename it like 10_{name})" for name in others]
        if loose:
            warnings.append(
                f"Ignored {len(loose)} images directly inside {root}: move them into an N_name folder "
                "to use them."
            )
    elif loose:
        match = _REPEATS_FOLDER.match(root.name)
        if match and not _unusable_repeats(int(match.group(1))):
            n, name = int(match.group(1)), match.group(2)
            warnings.append(
                f"The {kind} {root} is itself named N_name: using repeats = {n} and class tokens "
                f"'{name}' from its name."
            )
        else:
            n = 1 if is_reg else repeats
            name = root.name
            warnings.append(f"The {kind} {root} has no N_ prefix: using repeats = {n}.")
        subsets.append(_scan_subset(root, n, name, is_reg, extension, warnings, problems))
    elif subfolders:
        unused += [f"{p.name} (no N_ prefix: rename it like 10_{p.name})" for p in subfolders]
    if not any(s.images for s in subsets):
        found = f" It holds {', '.join(unused)}." if unused else ""
        raise DatasetError(
            f"The {kind} {root} has no usable images: it must contain images "
            f"({', '.join(IMAGE_EXTENSIONS)}) or N_name folders of images (for example 10_mychar)."
            + found
        )
    return subsets


def _unusable_repeats(n: int) -> str | None:
    if n == 0:
        return "0 repeats means it is never used; rename it with 1 or more, like 1_name"
    if n > MAX_FOLDER_REPEATS:
        return f"{n} repeats is more than {MAX_FOLDER_REPEATS}; rename it with a smaller number"
    return None


def scan_dataset(
    img_folder: str | Path,
    reg_folder: str | Path | None = None,
    *,
    repeats: int,
    caption_extension: str = ".txt",
    trigger_words: str = "",
    strict: bool = False,
) -> DatasetInfo:
    """Scan the training (and regularisation) folders. Reads image headers (and the last bytes of
    each file, to find truncated ones), never pixels.

    Raises :class:`DatasetError` when a folder is missing or holds no images, and with ``strict``
    when any image cannot be read or a caption is not UTF-8 (otherwise those are skipped or read
    with a warning, in ``problems`` and ``warnings``).
    """
    if repeats < 1:
        raise DatasetError(f"repeats must be at least 1 (got {repeats}): set repeats to 1 or more.")
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    warnings: list[str] = []
    problems: list[str] = []
    subsets = _scan_root(Path(img_folder), repeats=repeats, is_reg=False,
                         extension=caption_extension, warnings=warnings, problems=problems)
    if reg_folder:
        subsets += _scan_root(Path(reg_folder), repeats=repeats, is_reg=True,
                              extension=caption_extension, warnings=warnings, problems=problems)
    if strict and problems:
        shown = " ".join(problems[:10]) + (f" … and {len(problems) - 10} more." if len(problems) > 10
                                            else "")
        raise DatasetError(f"The dataset has {len(problems)} problem(s) and images.strict_dataset is "
                           f"on: {shown} Fix them, or turn strict_dataset off to skip them with a "
                           "warning.")
    info = DatasetInfo(subsets, warnings=problems + warnings, problems=problems,
                       trigger_words=trigger_words.strip(), caption_extension=caption_extension)
    missing = len(info.images_without_captions)
    if missing:
        info.warnings.append(
            f"{missing} images have no {caption_extension} caption: their folder's class tokens are "
            "used instead."
        )
    return info


def iter_images(info: DatasetInfo) -> Iterable[tuple[Subset, ImageEntry]]:
    for subset in info.subsets:
        for image in subset.images:
            yield subset, image
