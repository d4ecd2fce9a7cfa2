"""The dataset workbench's one entry point for the page's Dataset tab and ``lora-gui dataset``:
which folders and options (from the settings), the rows to browse, the bulk operations by name,
the caption editor and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.dataset.autocaption import CaptionJob
from lora_gui.dataset.browse import Row, RowFilter, dataset_rows, filter_rows
from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.checks import CheckReport, check_dataset
from lora_gui.dataset.edit import (
    CaptionEditor,
    EditResult,
    TagOp,
    add_tag,
    dedupe_tags,
    remove_tag,
    replace_tag,
    sort_tags,
    triggers_first,
)
from lora_gui.dataset.scan import DatasetError, DatasetInfo, scan_dataset

if TYPE_CHECKING:
    from lora_gui.settings import TrainingSettings

# The bulk operations by name (the page's dropdown, the command line's --op).
BULK_OPS = {
    "add tag (front)": "add the tag first",
    "add tag (back)": "add the tag last",
    "remove tag": "remove the tag",
    "replace tag": "replace the tag by the new tag (in the filtered images)",
    "rename tag everywhere": "rename the tag in every image, whatever the filter",
    "trigger words first": "put the trigger words first (adding missing ones)",
    "dedupe tags": "remove repeated tags",
    "sort tags": "sort tags alphabetically, keeping the first keep_tokens in place",
}


def bulk_op(name: str, tag: str = "", new: str = "", *, triggers: str = "", keep: int = 0) -> TagOp:
    """The tag operation ``name`` (a key of ``BULK_OPS``); DatasetError with a sentence when a
    needed value is missing."""
    tag, new = tag.strip(), new.strip()
    needs_tag = name in ("add tag (front)", "add tag (back)", "remove tag", "replace tag",
                         "rename tag everywhere")
    if needs_tag and not tag:
        raise DatasetError(f"'{name}' needs a tag: type it in the Tag field.")
    if name in ("replace tag", "rename tag everywhere") and not new:
        raise DatasetError(f"'{name}' needs the new tag: type it in the New tag field.")
    if name == "trigger words first" and not triggers.strip():
        raise DatasetError("'trigger words first' needs trigger words: set them in the Trigger "
                           "words tab (or --triggers).")
    table = {
        "add tag (front)": lambda: add_tag(tag, front=True),
        "add tag (back)": lambda: add_tag(tag, front=False),
        "remove tag": lambda: remove_tag(tag),
        "replace tag": lambda: replace_tag(tag, new),
        "rename tag everywhere": lambda: replace_tag(tag, new),
        "trigger words first": lambda: triggers_first(triggers),
        "dedupe tags": lambda: dedupe_tags,
        "sort tags": lambda: sort_tags(keep),
    }
    if name not in table:
        raise DatasetError(f"There is no bulk operation '{name}': choose one of {', '.join(BULK_OPS)}.")
    return table[name]()


@dataclass(frozen=True)
class Workbench:
    """A dataset as the settings describe it: folders, repeats, caption extension, buckets."""

    img_folder: Path
    reg_folder: Path | None
    repeats: int
    caption_extension: str
    buckets: BucketOptions
    trigger_words: str = ""
    keep_tokens: int = 0

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> Workbench:
        if not settings.model.img_folder:
            raise DatasetError("No image folder is set: choose the Image folder (model.img_folder).")
        reg = settings.model.reg_img_folder
        return cls(Path(settings.model.img_folder), Path(reg) if reg else None,
                   settings.images.repeats, settings.labels.caption_extension,
                   BucketOptions.from_settings(settings), settings.triggers.trigger_words,
                   settings.labels.keep_tokens)

    def scan(self) -> DatasetInfo:
        return scan_dataset(self.img_folder, self.reg_folder, repeats=self.repeats,
                            caption_extension=self.caption_extension, trigger_words=self.trigger_words)

    def rows(self, row_filter: RowFilter = RowFilter()) -> list[Row]:
        return filter_rows(dataset_rows(self.scan(), self.buckets), row_filter)

    def editor(self) -> CaptionEditor:
        return CaptionEditor(self.img_folder, self.caption_extension)

    def bulk(self, name: str, row_filter: RowFilter, tag: str = "", new: str = "") -> EditResult:
        """Apply the bulk operation ``name`` to the filtered images (every image for a rename)."""
        op = bulk_op(name, tag, new, triggers=self.trigger_words, keep=self.keep_tokens)
        chosen = self.rows(RowFilter() if name == "rename tag everywhere" else row_filter)
        what = f"{name} {tag!r}" + (f" -> {new!r}" if new.strip() else "") if tag.strip() else name
        return self.editor().bulk([r.path for r in chosen], [op], what)

    def check(self) -> CheckReport:
        return check_dataset(self.img_folder, self.reg_folder, repeats=self.repeats,
                             caption_extension=self.caption_extension, buckets=self.buckets)

    def caption_job(self, row_filter: RowFilter, tagger_dir: str, **options) -> CaptionJob:
        """An auto-captioning job for the filtered images (``options``: CaptionJob's fields),
        checked; DatasetError with a sentence when it cannot run."""
        images = [str(r.path) for r in self.rows(row_filter)]
        return CaptionJob(images=images, tagger_dir=tagger_dir, caption_extension=self.caption_extension,
                          undo_root=str(self.img_folder), **options).check()
