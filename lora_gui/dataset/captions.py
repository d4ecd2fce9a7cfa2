"""Captions and tags: the caption a sample is trained with, the caption options, tag counts.

Caption order (REFERENCE.md, "Labels"): trigger words, whole-caption dropout, split on commas, keep
the first ``keep_tokens``, shuffle the rest, drop tags, join with ", ".
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from lora_gui.atomic import write_text

if TYPE_CHECKING:
    from lora_gui.dataset.scan import DatasetInfo
    from lora_gui.settings import TrainingSettings


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings, read from the settings in one place: each field is the
    ``LabelSettings`` setting of the same name.

    No defaults and no checks of its own: the schema declares and checks them.
    """

    shuffle_caption: bool
    keep_tokens: int
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> CaptionOptions:
        return cls(**{f.name: getattr(settings.labels, f.name) for f in fields(cls)})

    def apply(self, caption: str, trigger_words: str, epoch: int, rng: random.Random) -> str:
        """The caption trained with in ``epoch`` (see :func:`process_caption`)."""
        return process_caption(
            caption,
            trigger_words=trigger_words,
            keep_tokens=self.keep_tokens,
            shuffle=self.shuffle_caption,
            tag_dropout_rate=self.caption_tag_dropout_rate,
            dropout_rate=self.caption_dropout_rate,
            drop_all=drop_all_captions(epoch, self.caption_dropout_every_n_epochs),
            rng=rng,
        )


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


def total_tags(info: DatasetInfo) -> Counter[str]:
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
    lines = [f"{tag}: {count}\n" for tag, count in sorted_tags(total_tags(info), alphabetical)]
    return write_text(path, "".join(lines))
