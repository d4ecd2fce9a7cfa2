"""The dataset preview: folders, repeats, counts, captions, buckets, steps and tags, computed from the
form's values with the torch-free dataset package (the same plan the trainer uses)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.captions import sorted_tags, tag_frequency
from lora_gui.dataset.memory import preview_estimate, recommend
from lora_gui.dataset.scan import DatasetError, iter_images, scan_dataset
from lora_gui.dataset.summary import dataset_summary, plan_buckets
from lora_gui.settings.schema import GROUPS, TrainingSettings
from lora_gui.ui.fields import SPEC_BY_KEY, values_to_document
from lora_gui.worker.launch import find_gpus

THUMBNAILS = 8
THUMB_SIZE = 192
NEEDED_GROUPS = ("model", "triggers", "images", "training", "labels", "advanced")


@dataclass
class Preview:
    markdown: str
    thumbnails: list[tuple[Any, str]] = field(default_factory=list)  # (PIL image, caption)
    ok: bool = True


def _groups(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The groups the preview needs, each validated on its own so that an invalid setting elsewhere
    (a sample size, say) does not block it."""
    doc = values_to_document(values)
    groups, problems = {}, []
    for name in NEEDED_GROUPS:
        try:
            groups[name] = GROUPS[name].model_validate(doc.get(name, {}))
        except ValidationError as exc:
            groups[name] = GROUPS[name]()
            for err in exc.errors(include_url=False):
                key = f"{name}.{err['loc'][0]}" if err["loc"] else name
                label = SPEC_BY_KEY[key].label if key in SPEC_BY_KEY else key
                problems.append(f"{label}: {err['msg']} (the default is used for the preview)")
    return groups, problems


def _thumb(path: Path, caption: str) -> tuple[Any, str] | None:
    try:
        with Image.open(path) as img:
            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
            return img.convert("RGB"), caption
    except (OSError, ValueError):
        return None


def _memory_line(groups: dict[str, Any], bucket_of: dict) -> str:
    """The estimated peak GPU memory of a run with these settings at the largest bucket."""
    settings = TrainingSettings.model_construct(**groups)
    largest = max(bucket_of.values(), key=lambda b: b[0] * b[1])
    est = preview_estimate(settings, largest)
    if est is None:
        return "\nMemory: choose a base model (or its family) to see the estimated peak GPU memory."
    line = f"\n{est.sentence().replace('Estimated peak memory', f'Estimated peak GPU memory at {largest[0]}x{largest[1]}')}"
    gpus = find_gpus()  # NVML; the smallest GPU found is the one a run must fit
    advice = recommend(settings, largest, min(g.memory_mib for g in gpus) * 2**20) if gpus else None
    return line + (f" {advice}" if advice else "")


def build_preview(values: dict[str, Any]) -> Preview:
    groups, problems = _groups(values)
    model, images, training, labels = groups["model"], groups["images"], groups["training"], \
        groups["labels"]
    if not model.img_folder:
        return Preview("Choose an **Image folder** to see its folders, captions, buckets and steps.",
                       ok=False)
    try:
        info = scan_dataset(model.img_folder, model.reg_img_folder or None, repeats=images.repeats,
                            caption_extension=labels.caption_extension,
                            trigger_words=groups["triggers"].trigger_words,
                            strict=images.strict_dataset)
    except (DatasetError, OSError) as exc:
        return Preview(f"**The dataset cannot be used:** {exc}", ok=False)
    settings = TrainingSettings.model_construct(images=images, training=training)
    buckets = BucketOptions.from_settings(settings)
    try:
        summary = dataset_summary(info, buckets, batch_size=training.batch_size,
                                  validation_split=training.validation_split, seed=training.seed)
        bucket_of = plan_buckets(info, buckets)
    except ValueError as exc:  # bucket limits that do not fit together
        return Preview(f"**Buckets cannot be planned:** {exc}", ok=False)
    plan = settings.plan_steps(summary.steps_per_epoch)
    lines = [summary.to_markdown(), ""]
    lines.append(
        f"**{plan.steps_per_epoch} optimizer steps per epoch × {plan.epochs} epochs = "
        f"{plan.total_steps} steps**" + (f" (max steps {images.max_steps})" if images.max_steps else "")
        + f"; effective batch {training.batch_size * training.gradient_accumulation_steps}.")
    lines.append(_memory_line(groups, bucket_of))
    missing = info.images_without_captions
    if missing:
        shown = ", ".join(p.name for p in missing[:10]) + (" …" if len(missing) > 10 else "")
        lines.append(f"\nImages without a {info.caption_extension} caption ({len(missing)}): {shown}")
    total_tags = Counter()
    for counts in tag_frequency(info).values():
        total_tags.update(counts)
    if total_tags:
        top = ", ".join(f"{t} ({n})" for t, n in sorted_tags(dict(total_tags))[:15])
        lines.append(f"\nTop tags: {top}")
    lines += [f"\n- {p}" for p in problems]
    thumbs = []
    for subset, image in iter_images(info):
        if len(thumbs) >= THUMBNAILS:
            break
        w, h = bucket_of[image.path]
        caption = subset.caption_for(image)
        item = _thumb(image.path, f"{subset.name}/{image.path.name} → bucket {w}x{h}: "
                                  f"{caption[:120]}")
        if item:
            thumbs.append(item)
    return Preview("\n".join(lines), thumbs)
