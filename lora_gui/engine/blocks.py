"""The SD 1.x/2.x U-Net's blocks as kohya-ss/sd-scripts ``networks/lora.py`` numbers them (IN0..IN11,
MID, OUT0..OUT11) and the per-block settings read against them: block-wise LR weights
(``get_block_lr_weight``); the block dims and alphas use the same numbering."""

from __future__ import annotations

import math
import re


class BlockSettingError(ValueError):
    """A sentence naming the block-wise setting that cannot be read."""


# sd-scripts networks/lora.py: the SD 1.x/2.x U-Net's blocks IN0..IN11, MID, OUT0..OUT11.
NUM_OF_BLOCKS = 12  # down (and up) blocks: 4 levels x (2 resnets/attentions + 1 sampler)
NUM_BLOCKS = 2 * NUM_OF_BLOCKS + 1
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def block_index(kohya_name: str) -> int:
    """The block of a U-Net LoRA module (sd-scripts ``get_block_index``, SD 1.x/2.x): 1..12 for
    the down blocks (3 per level: 2 resnets/attentions, then the downsampler), 12 for the middle
    block, 13..24 for the up blocks; -1 when the name is in none of them."""
    m = _RE_UPDOWN.search(kohya_name)
    if m:
        direction, level, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else index)
        return 1 + idx if direction == "down" else NUM_OF_BLOCKS + 1 + idx
    if "mid_block_" in kohya_name:
        return NUM_OF_BLOCKS
    return -1


def _preset_weights(spec: str) -> list[float] | None:
    """sd-scripts' named curves for down/up_lr_weight ('cosine', 'sine', 'linear',
    'reverse_linear', 'zeros', each optionally '+base')."""
    name, _, base = spec.partition("+")
    base_lr = float(base) if base else 0.0
    n = NUM_OF_BLOCKS
    curves = {
        "cosine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))],
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
        "linear": [i / (n - 1) for i in range(n)],
        "reverse_linear": [i / (n - 1) for i in reversed(range(n))],
        "zeros": [0.0] * n,
    }
    if name.strip() not in curves:
        return None
    return [w + base_lr for w in curves[name.strip()]]


def _weight_list(text: str, length: int, setting: str) -> list[float] | None:
    text = text.strip()
    if not text:
        return None
    values = _preset_weights(text) if length == NUM_OF_BLOCKS else None
    if values is None:
        try:
            values = [float(s) if s.strip() else 0.0 for s in text.split(",")]
        except ValueError:
            raise BlockSettingError(
                f"{setting}: {text!r} is not a list of numbers separated by commas (or cosine, sine, "
                "linear, reverse_linear, zeros).") from None
    return (values + [1.0] * length)[:length]


def block_lr_weights(down: str, mid: str, up: str, zero_threshold: float = 0.0) -> list[float] | None:
    """The LR factor of each U-Net block 0..24 (sd-scripts ``get_block_lr_weight``): lists of 12,
    1 and 12 numbers (shorter lists are filled with 1, longer ones cut), a factor not above
    ``zero_threshold`` becomes 0; None when none of the three is given."""
    lists = [_weight_list(down, NUM_OF_BLOCKS, "advanced.down_lr_weight"),
             _weight_list(mid, 1, "advanced.mid_lr_weight"),
             _weight_list(up, NUM_OF_BLOCKS, "advanced.up_lr_weight")]
    if all(v is None for v in lists):
        return None
    weights: list[float] = []
    for values, length in zip(lists, (NUM_OF_BLOCKS, 1, NUM_OF_BLOCKS)):
        values = [1.0] * length if values is None else [w if w > zero_threshold else 0.0 for w in values]
        weights += values
    return weights
