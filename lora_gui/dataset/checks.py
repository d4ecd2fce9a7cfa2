"""Checks before training: each problem with the files concerned and what to do about it.

- unreadable or truncated images (decoded in full, not only the header the scan reads),
- images smaller than the bucket minimum (they are upscaled, so they train blurry),
- exact and near duplicates (:mod:`lora_gui.dataset.dedupe`),
- caption files that are not UTF-8, caption files without an image, images without a caption,
- repeats that make one folder dominate an epoch.

Every check reads files only; nothing is changed. ``check_dataset`` is what the page's Dataset tab
and ``lora-gui dataset check`` show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.dedupe import Fingerprint, exact_groups, fingerprint, near_groups
from lora_gui.dataset.scan import IMAGE_EXTENSIONS, DatasetError, DatasetInfo, Subset, scan_dataset

DOMINANT_SHARE = 0.8  # one training folder giving this share of an epoch's samples is flagged
MAX_LISTED = 20


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str  # "error": training would fail or skip files; "warning": it trains, but worse
    message: str
    files: list[Path]
    fix: str

    def to_markdown(self) -> str:
        names = ", ".join(f"`{p.parent.name}/{p.name}`" for p in self.files[:MAX_LISTED])
        more = f" and {len(self.files) - MAX_LISTED} more" if len(self.files) > MAX_LISTED else ""
        listed = f"\n  Files: {names}{more}" if self.files else ""
        return f"- **{self.severity}** {self.message}{listed}\n  Fix: {self.fix}"


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    images_checked: int = 0

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_markdown(self) -> str:
        if not self.findings:
            return f"Checked {self.images_checked} images: no problems found."
        head = (f"Checked {self.images_checked} images: {len(self.errors)} error(s), "
                f"{len(self.findings) - len(self.errors)} warning(s).")
        return "\n".join([head, *[f.to_markdown() for f in self.findings]])


def _folder_files(subset: Subset) -> list[Path]:
    return sorted(p for p in subset.folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _fingerprints(info: DatasetInfo, report: CheckReport) -> list[Fingerprint]:
    prints, broken = [], []
    for subset in info.subsets:
        for path in _folder_files(subset):
            report.images_checked += 1
            try:
                prints.append(fingerprint(path))
            except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for a bad file
                broken.append((path, str(exc)))
    if broken:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in broken[:5])
        report.findings.append(Finding(
            "unreadable", "error", f"{len(broken)} image(s) cannot be decoded ({reasons}).",
            [p for p, _ in broken],
            "re-export or re-download them (a truncated file was cut off while copying), or delete "
            "them; training skips them."))
    return prints


def _check_sizes(info: DatasetInfo, buckets: BucketOptions, report: CheckReport) -> None:
    minimum = buckets.min_bucket_resolution if buckets.buckets else min(buckets.resolution)
    small = [i.path for s in info.subsets for i in s.images if min(i.width, i.height) < minimum]
    if small:
        what = "the bucket minimum" if buckets.buckets else "the training resolution"
        report.findings.append(Finding(
            "small", "warning",
            f"{len(small)} image(s) have a side shorter than {what} ({minimum} px): they are "
            "upscaled and train blurry.", small,
            f"use larger images (at least {minimum} px on the short side), or lower "
            "min_bucket_resolution, or turn on bucket_no_upscale."))


def _check_duplicates(prints: list[Fingerprint], report: CheckReport) -> None:
    for group in exact_groups(prints):
        report.findings.append(Finding(
            "duplicate", "warning", f"{len(group)} files are the same image byte for byte "
            f"({', '.join(p.name for p in group)}): it is trained {len(group)} times as often.",
            group, "delete all but one of them (or keep them on purpose, as extra weight)."))
    for group in near_groups(prints):
        report.findings.append(Finding(
            "near-duplicate", "warning", f"{len(group)} images look the same (a resized or "
            f"re-encoded copy?): {', '.join(p.name for p in group)}.", group,
            "open them side by side and keep the best one (largest, least compressed)."))


def _check_captions(info: DatasetInfo, report: CheckReport) -> None:
    ext = info.caption_extension
    bad, orphans = [], []
    for subset in info.subsets:
        stems = {p.stem for p in _folder_files(subset)}
        for caption in sorted(subset.folder.glob(f"*{ext}")):
            if caption.name.startswith("."):
                continue
            try:
                caption.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                bad.append(caption)
            if caption.stem not in stems:
                orphans.append(caption)
    if bad:
        report.findings.append(Finding(
            "encoding", "error", f"{len(bad)} caption file(s) are not UTF-8 text: their odd "
            "characters are trained as replacement marks.", bad,
            "open them in a text editor and save them as UTF-8 (the editor refuses to change them "
            "until then)."))
    if orphans:
        report.findings.append(Finding(
            "orphan-caption", "warning", f"{len(orphans)} caption file(s) have no image of the same "
            "name: they are not used.", orphans,
            "rename them to match their image (photo.png -> photo.txt) or delete them."))
    missing = info.images_without_captions
    if missing:
        report.findings.append(Finding(
            "no-caption", "warning", f"{len(missing)} image(s) have no {ext} caption: their "
            "folder's class tokens are trained instead.", missing,
            "caption them (filter 'no caption' in the Dataset tab, or auto-caption), or keep the "
            "class tokens on purpose."))


def _check_balance(info: DatasetInfo, report: CheckReport) -> None:
    train = [s for s in info.train_subsets if s.images]
    total = sum(len(s.images) * s.repeats for s in train)
    if len(train) < 2 or not total:
        return
    biggest = max(len(s.images) for s in train)
    for subset in train:
        share = len(subset.images) * subset.repeats / total
        if share >= DOMINANT_SHARE:
            balanced = ", ".join(f"{max(1, round(biggest / len(s.images)))}_{s.class_tokens}"
                                 for s in train)
            report.findings.append(Finding(
                "dominant-folder", "warning",
                f"The folder {subset.name} gives {share:.0%} of each epoch's samples "
                f"({len(subset.images)} images x {subset.repeats} repeats): the LoRA learns it "
                "far more than the other folders.", [subset.folder],
                f"lower its repeats or raise the others'; equal weight per folder would be {balanced}."))


def check_dataset(
    img_folder: str | Path,
    reg_folder: str | Path | None = None,
    *,
    repeats: int,
    caption_extension: str = ".txt",
    buckets: BucketOptions,
) -> CheckReport:
    """Every check over the training (and regularisation) folders."""
    report = CheckReport()
    try:
        info = scan_dataset(img_folder, reg_folder, repeats=repeats, caption_extension=caption_extension)
    except DatasetError as exc:
        report.findings.append(Finding("folder", "error", str(exc), [], "choose a folder of images."))
        return report
    prints = _fingerprints(info, report)
    _check_sizes(info, buckets, report)
    _check_duplicates(prints, report)
    _check_captions(info, report)
    _check_balance(info, report)
    return report
