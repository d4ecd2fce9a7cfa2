"""The U-Net's blocks as kohya-ss/sd-scripts ``networks/lora.py`` numbers them and the per-block
settings read against them: block-wise LR weights (``get_block_lr_weight``), block dims and alphas
(``get_block_dims_and_alphas``). SD 1.x/2.x: 25 blocks IN0..IN11, MID, OUT0..OUT11 (diffusers
module names); SDXL: 23 blocks, 0 (time/label embedding), IN 1..9, MID 10..12, OUT 13..21 and 22
(out), read from the original (SAI) module names the SDXL LoRA uses. sd-scripts' Flux network
(``networks/lora_flux.py``) reads none of these settings: a Flux run refuses them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


class BlockSettingError(ValueError):
    """A sentence naming the block-wise setting that cannot be read."""


# sd-scripts networks/lora.py: the SD 1.x/2.x U-Net's blocks IN0..IN11, MID, OUT0..OUT11.
NUM_OF_BLOCKS = 12  # down (and up) blocks: 4 levels x (2 resnets/attentions + 1 sampler)
NUM_BLOCKS = 2 * NUM_OF_BLOCKS + 1
_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
# SDXL (LoRANetwork.SDXL_NUM_OF_BLOCKS, SDXL_NUM_OF_MID_BLOCKS): input_blocks 0..8, middle_block
# 0..2, output_blocks 0..8, and the two edge blocks (0 and 22) whose LR weight is always 1.
_RE_SDXL = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")
BLOCK_SETTINGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas",
                  "conv_block_dims", "conv_block_alphas")


@dataclass(frozen=True)
class BlockLayout:
    """How many LR weights a family's U-Net takes on each side (down/up), in the middle, and
    whether the list is framed by the two edge blocks (SDXL)."""

    family: str
    side: int  # down_lr_weight / up_lr_weight entries
    mid: int  # mid_lr_weight entries
    edges: bool  # SDXL: block 0 (embeddings) and the last block (out), weight 1

    @property
    def total(self) -> int:
        """Entries of block_dims / block_alphas (sd-scripts ``num_total_blocks``)."""
        return 2 * self.side + self.mid + (2 if self.edges else 0)

    def index(self, kohya_name: str) -> int:
        return sdxl_block_index(kohya_name) if self.family == "SDXL" else block_index(kohya_name)


SD_BLOCKS = BlockLayout("SD 1.x/2.x", NUM_OF_BLOCKS, 1, False)
SDXL_BLOCKS = BlockLayout("SDXL", 9, 3, True)


def block_layout(family: str, adv) -> BlockLayout | None:
    """The block numbering of a family's U-Net (``family``: a ModelFamily name); None for a family
    without one (Flux). Refuses, naming the field, a block setting the family cannot take: any on
    Flux (lora_flux.py ignores them), block dims/alphas of the other family's length."""
    given = [name for name in BLOCK_SETTINGS if str(getattr(adv, name)).strip()]
    layout = {"sd": SD_BLOCKS, "sdxl": SDXL_BLOCKS}.get(family)
    if layout is None:
        if given:
            raise BlockSettingError(
                f"advanced.{given[0]}: block-wise LR weights and block dims/alphas are for the SD and SDXL "
                "U-Nets; sd-scripts' Flux LoRA (networks/lora_flux.py) reads none of them. Clear it for Flux.")
        return None
    for name in (n for n in given if n in BLOCK_SETTINGS[3:]):  # dims and alphas: one per block
        count = len(str(getattr(adv, name)).split(","))
        if count != layout.total:
            raise BlockSettingError(
                f"advanced.{name}: the {layout.family} U-Net has {layout.total} blocks, so give "
                f"{layout.total} comma-separated numbers (got {count}).")
    return layout


def sdxl_block_index(kohya_name: str) -> int:
    """The block of an SDXL U-Net LoRA module (sd-scripts ``get_block_index`` with is_sdxl):
    input_blocks_N -> 1 + N, middle_block_N -> 10 + N, output_blocks_N -> 13 + N; the embeddings
    are block 0 and the out layers 22 (no LoRA there); -1 for any other name."""
    m = _RE_SDXL.match(kohya_name)
    if m:
        return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))
    if kohya_name.startswith(("lora_unet_time_embed_", "lora_unet_label_emb_")):
        return 0
    return 22 if kohya_name.startswith("lora_unet_out_") else -1


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


def _preset_weights(spec: str, n: int) -> list[float] | None:
    """sd-scripts' named curves of ``n`` weights for down/up_lr_weight ('cosine', 'sine', 'linear',
    'reverse_linear', 'zeros', each optionally '+base')."""
    name, _, base = spec.partition("+")
    base_lr = float(base) if base else 0.0
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


def _weight_list(text: str, length: int, setting: str, preset: bool) -> list[float] | None:
    text = text.strip()
    if not text:
        return None
    values = _preset_weights(text, length) if preset else None
    if values is None:
        try:
            values = [float(s) if s.strip() else 0.0 for s in text.split(",")]
        except ValueError:
            raise BlockSettingError(
                f"{setting}: {text!r} is not a list of numbers separated by commas (or cosine, sine, "
                "linear, reverse_linear, zeros).") from None
    return (values + [1.0] * length)[:length]


def block_lr_weights(down: str, mid: str, up: str, zero_threshold: float = 0.0,
                     layout: BlockLayout = SD_BLOCKS) -> list[float] | None:
    """The LR factor of each U-Net block (sd-scripts ``get_block_lr_weight``): SD 1.x/2.x lists of
    12, 1 and 12 numbers, SDXL 9, 3 and 9 framed by 1 for blocks 0 and 22 (shorter lists are
    filled with 1, longer ones cut); a factor not above ``zero_threshold`` becomes 0; None when
    none of the three is given."""
    lengths = (layout.side, layout.mid, layout.side)
    lists = [_weight_list(text, n, f"advanced.{name}", preset=name != "mid_lr_weight")
             for text, n, name in zip((down, mid, up), lengths, BLOCK_SETTINGS)]
    if all(v is None for v in lists):
        return None
    weights: list[float] = []
    for values, length in zip(lists, lengths):
        values = [1.0] * length if values is None else [w if w > zero_threshold else 0.0 for w in values]
        weights += values
    return [1.0, *weights, 1.0] if layout.edges else weights
