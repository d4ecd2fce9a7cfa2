"""Auto-captioning without the model: the job (which images, which tagger folder, thresholds,
excluded tags, what to do with an existing caption), the WD14 tag list, choosing tags from the
tagger's probabilities, and merging them with a caption that is already there.

The model itself runs in the background worker (:mod:`lora_gui.engine.tagger`,
``python -m lora_gui.worker.caption_job``); this module is torch- and onnxruntime-free so the
page and the command line can build and check a job.

WD14 taggers (SmilingWolf's ``wd-*-tagger`` releases, used by kohya-ss/sd-scripts
``finetune/tag_images_by_wd14_tagger.py``) ship ``model.onnx`` and ``selected_tags.csv`` with the
columns ``tag_id,name,category,count``; category 9 = rating, 0 = general, 4 = character. Tag names
use underscores; sd-scripts turns them into spaces only for names longer than 3 characters, so
kaomoji such as ``^_^`` stay as they are.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_gui.atomic import write_json
from lora_gui.dataset.captions import split_tags
from lora_gui.dataset.scan import DatasetError

RULES = ("skip", "prepend", "append", "overwrite")
TAGGER_FILES = ("model.onnx", "selected_tags.csv")
GENERAL, CHARACTER, RATING = "0", "4", "9"


@dataclass(frozen=True)
class TagEntry:
    name: str
    category: str


@dataclass(frozen=True)
class CaptionJob:
    """One auto-captioning job: written to ``caption.json`` in its job folder."""

    images: list[str]
    tagger_dir: str
    caption_extension: str = ".txt"
    rule: str = "skip"  # what to do with an image that already has a caption: one of RULES
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: list[str] = field(default_factory=list)
    underscores_to_spaces: bool = True
    batch_size: int = 4
    undo_root: str = ""  # the folder whose undo journal records the change (the image folder)

    def check(self) -> CaptionJob:
        if self.rule not in RULES:
            raise DatasetError(f"The caption rule must be one of {', '.join(RULES)}, not {self.rule!r}.")
        for name in ("general_threshold", "character_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise DatasetError(f"{name} must be above 0 and at most 1 (got {getattr(self, name)}).")
        if self.batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1 (got {self.batch_size}).")
        if not self.images:
            raise DatasetError("There are no images to caption: check the folder and the filter.")
        missing_tagger_files(Path(self.tagger_dir), raise_error=True)
        return self

    def save(self, path: Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> CaptionJob:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def missing_tagger_files(folder: Path, raise_error: bool = False) -> list[str]:
    """The files a WD14 tagger folder lacks (a sentence as DatasetError when ``raise_error``)."""
    missing = [name for name in TAGGER_FILES if not (folder / name).is_file()]
    if missing and raise_error:
        raise DatasetError(
            f"The tagger folder {folder} must hold {' and '.join(TAGGER_FILES)} (a WD14 tagger "
            f"release, e.g. SmilingWolf/wd-vit-tagger-v3, downloaded beforehand); missing: "
            f"{', '.join(missing)}.")
    return missing


def read_tags_csv(path: Path) -> list[TagEntry]:
    """The tag list in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"The tag list {path} cannot be read ({exc}).") from None
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise DatasetError(f"The tag list {path} must start with the header tag_id,name,category "
                           "(the selected_tags.csv of a WD14 tagger).")
    return [TagEntry(row[1], row[2]) for row in rows[1:] if len(row) >= 3]


def tag_text(name: str, underscores_to_spaces: bool) -> str:
    return name.replace("_", " ") if underscores_to_spaces and len(name) > 3 else name


def choose_tags(probs, tags: list[TagEntry], job: CaptionJob) -> list[str]:
    """Character tags at or above their threshold, then general tags, each by probability
    (highest first); ratings are not caption tags; excluded tags are left out."""
    if len(probs) != len(tags):
        raise DatasetError(f"The tagger gives {len(probs)} scores but its tag list has {len(tags)} "
                           "tags: the model.onnx and selected_tags.csv are from different releases.")
    excluded = {" ".join(t.replace("_", " ").split()).lower() for t in job.exclude}
    chosen: list[tuple[int, float, str]] = []
    for prob, tag in zip(probs, tags, strict=True):
        limit = {GENERAL: job.general_threshold, CHARACTER: job.character_threshold}.get(tag.category)
        text = tag_text(tag.name, job.underscores_to_spaces)
        if limit is None or float(prob) < limit or text.replace("_", " ").lower() in excluded:
            continue
        chosen.append((0 if tag.category == CHARACTER else 1, -float(prob), text))
    return [text for _, _, text in sorted(chosen)]


def merge_caption(existing: str | None, new_tags: list[str], rule: str) -> str | None:
    """The caption to write under ``rule``; None = leave the file alone."""
    old = split_tags(existing or "")
    if rule == "skip":
        return None if old else ", ".join(new_tags)
    if rule == "overwrite":
        return ", ".join(new_tags)
    merged = new_tags + old if rule == "prepend" else old + new_tags
    return ", ".join(dict.fromkeys(merged))
