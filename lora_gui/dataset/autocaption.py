"""Auto-captioning without the model: the job (which images, which captioner and model folder,
thresholds, excluded tags, the prompt, what to do with an existing caption), the files each
captioner's folder must hold, the WD14 tag list, choosing tags from the tagger's probabilities,
and merging new tags or a sentence with a caption that is already there.

The models run in the background worker (:mod:`lora_gui.engine.captioners`,
``python -m lora_gui.worker.caption_job``); this module is torch- and onnxruntime-free so the
page and the command line can build and check a job.

Captioners (``CAPTIONERS``): ``wd14`` (an ONNX tagger, tags), ``blip``, ``florence2`` and
``qwen2vl`` (transformers folders as ``save_pretrained`` writes them, read with the native
classes, a sentence). Weights are read from ``*.safetensors`` only: a ``pytorch_model.bin`` is a
pickle, which lora-gui never loads from a folder a user supplies.

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
# name -> (what it is, an example release to download beforehand, the default prompt)
CAPTIONERS = {
    "wd14": ("WD14 tagger (ONNX, tags)", "SmilingWolf/wd-vit-tagger-v3", ""),
    "blip": ("BLIP (transformers, a sentence)", "Salesforce/blip-image-captioning-large", ""),
    "florence2": ("Florence-2 (transformers native, a sentence)", "florence-community/Florence-2-base",
                  "<CAPTION>"),
    "qwen2vl": ("Qwen2-VL / Qwen2.5-VL (transformers, a sentence)", "Qwen/Qwen2-VL-2B-Instruct",
                "Describe this image in one sentence."),
}
# The files of a transformers folder: each entry is satisfied by any one of its names.
TRANSFORMERS_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json"),
                      ("tokenizer.json", "tokenizer_config.json"),
                      ("preprocessor_config.json", "processor_config.json"))
GENERAL, CHARACTER, RATING = "0", "4", "9"


@dataclass(frozen=True)
class TagEntry:
    name: str
    category: str


@dataclass(frozen=True)
class CaptionJob:
    """One auto-captioning job: written to ``caption.json`` in its job folder."""

    images: list[str]
    tagger_dir: str  # the captioner's model folder (the name is kept from the first, WD14-only, jobs)
    caption_extension: str = ".txt"
    rule: str = "skip"  # what to do with an image that already has a caption: one of RULES
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: list[str] = field(default_factory=list)
    underscores_to_spaces: bool = True
    batch_size: int = 4
    undo_root: str = ""  # the folder whose undo journal records the change (the image folder)
    captioner: str = "wd14"  # one of CAPTIONERS
    prompt: str = ""  # Florence-2: a task token such as <CAPTION>; Qwen2-VL: the instruction; BLIP: a prefix
    max_new_tokens: int = 60

    def check(self) -> CaptionJob:
        if self.captioner not in CAPTIONERS:
            raise DatasetError(f"The captioner must be one of {', '.join(CAPTIONERS)}, not {self.captioner!r}.")
        if self.rule not in RULES:
            raise DatasetError(f"The caption rule must be one of {', '.join(RULES)}, not {self.rule!r}.")
        for name in ("general_threshold", "character_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise DatasetError(f"{name} must be above 0 and at most 1 (got {getattr(self, name)}).")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise DatasetError(f"batch_size and max_new_tokens must be at least 1 (got {self.batch_size} "
                               f"and {self.max_new_tokens}).")
        if not self.images:
            raise DatasetError("There are no images to caption: check the folder and the filter.")
        if not str(self.tagger_dir).strip():
            raise DatasetError(f"Choose the model folder of the {CAPTIONERS[self.captioner][0]} captioner.")
        missing_model_files(self.captioner, Path(self.tagger_dir), raise_error=True)
        return self

    @property
    def prompt_or_default(self) -> str:
        return self.prompt.strip() or CAPTIONERS[self.captioner][2]

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


def missing_model_files(captioner: str, folder: Path, raise_error: bool = False) -> list[str]:
    """The files the ``captioner``'s folder lacks (a sentence as DatasetError when ``raise_error``)."""
    if captioner == "wd14":
        return missing_tagger_files(folder, raise_error)
    missing = [" or ".join(names) for names in TRANSFORMERS_FILES
               if not any((folder / name).is_file() for name in names)]
    if missing and raise_error:
        what, example, _ = CAPTIONERS[captioner]
        pickle = (" (a pytorch_model.bin is a pickle and is not read: convert it to model.safetensors)"
                  if (folder / "pytorch_model.bin").is_file() else "")
        needed = ", ".join(" or ".join(names) for names in TRANSFORMERS_FILES)
        raise DatasetError(
            f"The {what} folder {folder} must hold {needed} (the files save_pretrained writes, e.g. "
            f"{example} downloaded beforehand); missing: {'; '.join(missing)}{pickle}.")
    return missing


def sentence_caption(text: str) -> list[str]:
    """A captioner's sentence as the one "tag" merged with a caption (commas kept inside it)."""
    text = " ".join(text.split()).strip(" ,")
    return [text] if text else []


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
