"""Captions and tags: the caption a sample is trained with, the caption options, tag counts.

Caption order (REFERENCE.md, "Labels"): trigger words, whole-caption dropout, split on commas, keep
the first ``keep_tokens``, shuffle the rest, drop tags, join with ", ".
"""

from __future__ import annotations

import math
import random
import re
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
    keep_tokens_separator: str
    secondary_separator: str
    caption_prefix: str
    caption_suffix: str
    enable_wildcard: bool
    token_warmup_min: int
    token_warmup_step: float

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> CaptionOptions:
        return cls(**{f.name: getattr(settings.labels, f.name) for f in fields(cls)})

    @property
    def varies(self) -> bool:
        """Whether a caption can change from one use to the next (no text-encoder cache then)."""
        return bool(self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate
                    or self.caption_dropout_every_n_epochs or self.enable_wildcard or self.token_warmup_step)

    def apply(self, caption: str, trigger_words: str, epoch: int, rng: random.Random,
              step: int | None = None, total_steps: int = 0) -> str:
        """The caption trained with in ``epoch`` at optimizer step ``step`` of ``total_steps``
        (see :func:`process_caption`; the step only matters for the tag warm-up)."""
        return process_caption(
            self.fixed(caption),
            trigger_words=trigger_words,
            keep_tokens=self.keep_tokens,
            shuffle=self.shuffle_caption,
            tag_dropout_rate=self.caption_tag_dropout_rate,
            dropout_rate=self.caption_dropout_rate,
            drop_all=drop_all_captions(epoch, self.caption_dropout_every_n_epochs),
            rng=rng,
            wildcards=self.enable_wildcard,
            keep_tokens_separator=self.keep_tokens_separator,
            secondary_separator=self.secondary_separator,
            flex_limit=self._warmup_limit(step, total_steps),
        )

    def plain(self, caption: str, trigger_words: str) -> str:
        """The caption without randomness (validation and the text-encoder cache): prefix, suffix,
        separators; wildcards take a fixed choice."""
        return process_caption(self.fixed(caption), trigger_words=trigger_words, rng=random.Random(0),
                               wildcards=self.enable_wildcard, keep_tokens_separator=self.keep_tokens_separator,
                               secondary_separator=self.secondary_separator)

    def fixed(self, caption: str) -> str:
        """``caption`` with the prefix and suffix (sd-scripts joins them with a space)."""
        if self.caption_prefix:
            caption = f"{self.caption_prefix} {caption}"
        if self.caption_suffix:
            caption = f"{caption} {self.caption_suffix}"
        return caption

    def _warmup_limit(self, step: int | None, total_steps: int):
        warmup = self.token_warmup_step
        warmup = math.floor(warmup * total_steps) if warmup < 1 else int(warmup)
        if step is None or not warmup or step >= warmup:
            return None
        return lambda n: token_warmup_count(n, step, self.token_warmup_min, warmup)


# --- captions -------------------------------------------------------------------------------------


def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones removed."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def token_warmup_count(n_flex: int, step: int, minimum: int, warmup_steps: int) -> int:
    """Tags (after the kept ones) used at ``step`` during the tag warm-up (sd-scripts
    ``BaseDataset.process_caption``): floor(step x (n - min) / warmup_steps) + min."""
    return math.floor(step * ((n_flex - minimum) / warmup_steps)) + minimum


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """``{a|b|c}`` -> one of the choices at random; ``{{`` and ``}}`` are literal braces
    (sd-scripts ``enable_wildcard``)."""
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\u2985", close_mark + "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_fixed(caption: str, separator: str) -> tuple[str, str, str] | None:
    """(fixed head, shuffled part, fixed tail) around ``keep_tokens_separator``; None without one."""
    if not separator or separator not in caption:
        return None
    head, rest = caption.split(separator, 1)
    middle, _, tail = rest.partition(separator)
    return head, middle, tail


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
    wildcards: bool = False,
    keep_tokens_separator: str = "",
    secondary_separator: str = "",
    flex_limit=None,
) -> str:
    """The caption a sample is trained with (REFERENCE.md order; sd-scripts
    ``BaseDataset.process_caption`` for the separators, wildcards and the warm-up).

    Trigger words come first and are never shuffled or dropped (only whole-caption dropout removes
    them); a trigger word already in the caption is not repeated. ``keep_tokens`` counts tags from
    the start of trigger words + caption, as kohya does with its caption prefix, so keep_tokens = 1
    keeps "mychar" first whether it is a trigger word or the caption's first tag. A caption with
    ``keep_tokens_separator`` keeps the part before it (and after a second one) fixed instead.
    Whole-caption dropout (``dropout_rate``, or ``drop_all``) returns "" (unconditional).
    ``flex_limit(n)``: how many of the n movable tags the tag warm-up uses now.
    """
    if drop_all or (dropout_rate > 0 and rng.random() < dropout_rate):
        return ""
    if wildcards:
        caption = expand_wildcards(caption, rng)
    triggers = split_tags(trigger_words)
    trigger_set = {t.lower() for t in triggers}

    def without_triggers(text: str) -> list[str]:
        return [t for t in split_tags(text) if t.lower() not in trigger_set]

    parts = _split_fixed(caption, keep_tokens_separator)
    if parts is None:
        tags = triggers + without_triggers(caption)
        n_keep = max(keep_tokens, len(triggers))
        kept, rest, tail = tags[:n_keep], tags[n_keep:], []
    else:
        kept, rest, tail = (triggers + without_triggers(parts[0]), without_triggers(parts[1]),
                            without_triggers(parts[2]))
    if flex_limit is not None:
        rest = rest[:flex_limit(len(rest))]
    if shuffle:
        rng.shuffle(rest)
    if tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    joined = ", ".join(kept + rest + tail)
    # sd-scripts replaces the secondary separator by its caption separator, ",".
    return joined.replace(secondary_separator, ",") if secondary_separator else joined


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
