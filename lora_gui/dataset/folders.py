"""Several image folders, each with its repeats and class tokens, as one dataset: the page's
per-folder table becomes the ``N_name`` layout of links that a multi-concept dataset needs (built
by :func:`lora_gui.dataset.kohya_toml.link_subsets`, as a TOML import builds it), so nobody names
folders ``10_mydog dog`` by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_gui.dataset.kohya_toml import SUBSET_DEFAULTS, TomlSubset, link_subsets
from lora_gui.dataset.scan import IMAGE_EXTENSIONS, DatasetError

MAX_REPEATS = 10_000


@dataclass(frozen=True)
class FolderEntry:
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool = False


def _truthy(value) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "x", "reg")


def parse_rows(rows: Iterable[Sequence], base: Path = Path(".")) -> list[FolderEntry]:
    """Table rows ``(folder, repeats, class tokens, regularisation)`` as entries; blank rows are
    skipped; a DatasetError names the row and what to fix."""
    entries = []
    for n, row in enumerate(rows, 1):
        cells = [*row, "", "", "", ""][:4]
        folder = str(cells[0] if cells[0] is not None else "").strip()
        if not folder:
            continue
        path = (base / folder).resolve()
        if not path.is_dir():
            raise DatasetError(f"Folder row {n}: {folder} is not a folder: type the path of an image folder.")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            raise DatasetError(f"Folder row {n}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) "
                               "directly: choose the folder the images are in.")
        try:
            repeats = int(float(str(cells[1]).strip() or 1))
        except ValueError:
            raise DatasetError(f"Folder row {n}: repeats must be a whole number, not {cells[1]!r}.") from None
        if not 1 <= repeats <= MAX_REPEATS:
            raise DatasetError(f"Folder row {n}: repeats must be between 1 and {MAX_REPEATS} (got {repeats}).")
        entries.append(FolderEntry(path, repeats, str(cells[2] or "").strip(), _truthy(cells[3])))
    if not any(not e.is_reg for e in entries):
        raise DatasetError("Add at least one image folder (not regularisation) to the folder table.")
    return entries


def build_folders(entries: list[FolderEntry], dest: str | Path, caption_extension: str) -> tuple[Path, Path | None]:
    """``dest/img/N_tokens`` (and ``dest/reg/N_tokens``) folders of links to each entry's images and
    captions; returns the image and regularisation folders for the settings."""
    subsets = [TomlSubset(**{**SUBSET_DEFAULTS, "image_dir": e.folder, "num_repeats": e.repeats,
                             "class_tokens": e.class_tokens, "is_reg": e.is_reg,
                             "caption_extension": caption_extension}) for e in entries]
    return link_subsets(subsets, dest, caption_extension)
