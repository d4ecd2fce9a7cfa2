"""Sample grids for the run panel (Pillow, no gradio): prompts down, steps (or LoRA strengths)
across, so over-fitting shows as a row that stops changing or degrades from left to right."""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont

from lora_gui.events import SampleReady

CELL = 128  # pixels per thumbnail
LABEL_H = 18
MAX_COLUMNS = 10  # steps shown: evenly spaced over the run, always the last one


def _columns(keys: list, limit: int = MAX_COLUMNS) -> list:
    if len(keys) <= limit:
        return keys
    stride = (len(keys) - 1) / (limit - 1)
    return [keys[round(i * stride)] for i in range(limit)]


def grid_cells(samples: Iterable[SampleReady], sweep: bool) -> tuple[list, list[int], dict]:
    """(column keys, row indexes, {(column, row): path}) of the step grid (``sweep`` False: the
    samples made during training, columns = steps) or of the strength sweep (columns = strengths)."""
    cells: dict = {}
    for event in samples:
        if (event.strength is not None) != sweep:
            continue
        cells[(event.strength if sweep else event.step, event.index)] = event.path
    columns = _columns(sorted({c for c, _ in cells}))
    rows = sorted({r for _, r in cells})
    return columns, rows, cells


def sample_grid(samples: Iterable[SampleReady], sweep: bool = False) -> Image.Image | None:
    """The grid image, or None when there are no samples of that kind. Missing files stay grey."""
    columns, rows, cells = grid_cells(samples, sweep)
    if not columns:
        return None
    font = ImageFont.load_default()
    grid = Image.new("RGB", (len(columns) * CELL, LABEL_H + len(rows) * CELL), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    for x, column in enumerate(columns):
        label = f"x{column:g}" if sweep else f"step {column}"
        draw.text((x * CELL + 4, 3), label, fill=(20, 20, 20), font=font)
        for y, row in enumerate(rows):
            path = cells.get((column, row))
            if path is None:
                continue
            try:
                with Image.open(path) as im:
                    thumb = im.convert("RGB")
                    thumb.thumbnail((CELL, CELL))
            except OSError:  # deleted or still being written: leave the cell grey
                continue
            grid.paste(thumb, (x * CELL + (CELL - thumb.width) // 2,
                               LABEL_H + y * CELL + (CELL - thumb.height) // 2))
    return grid
