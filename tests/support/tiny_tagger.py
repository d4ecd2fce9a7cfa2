"""A tiny WD14-style tagger for tests: a torch module exported to ``model.onnx`` (torch's ONNX
exporter, which needs the ``onnx`` package) next to its ``selected_tags.csv``, the two files of a
real tagger release, so the code under test loads it like a downloaded folder.

Scores come from the mean B, G, R (0..1) of the NHWC BGR input: ``blue_theme`` and the character
``hatsune_miku`` follow blue, ``red_theme`` follows red, ``^_^`` is always 0.95, the two rating tags
are fixed. A solid blue (40, 70, 220) image is tagged "hatsune miku, blue theme, ^_^"; a solid red
(220, 40, 40) one "red theme, ^_^" (defaults: general 0.35, character 0.85).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

CSV = """tag_id,name,category,count
1,general,9,100
2,sensitive,9,100
3,blue_theme,0,50
4,red_theme,0,50
5,^_^,0,10
6,hatsune_miku,4,5
"""
BLUE, RED = (40, 70, 220), (220, 40, 40)
BLUE_TAGS, RED_TAGS = "hatsune miku, blue theme, ^_^", "red theme, ^_^"


class TinyTagger(torch.nn.Module):
    def forward(self, x):
        bgr = x.mean(dim=(1, 2)) / 255.0
        b, r = bgr[:, 0:1], bgr[:, 2:3]
        ones = torch.ones_like(b)
        logits = torch.cat([5 * ones, -5 * ones, 20 * (b - 0.5), 20 * (r - 0.5),
                            math.log(0.95 / 0.05) * ones, 10 * (b - 0.5)], dim=1)
        return torch.sigmoid(logits)


def export_tiny_tagger(folder: Path, side: int = 32) -> Path:
    """Write the tagger's two files into ``folder``; ``side`` is its input size (448 for a real one)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(TinyTagger(), torch.zeros(1, side, side, 3), str(folder / "model.onnx"), dynamo=False,
                      input_names=["input_1"], output_names=["predictions_sigmoid"],
                      dynamic_axes={"input_1": {0: "batch"}, "predictions_sigmoid": {0: "batch"}})
    (folder / "selected_tags.csv").write_text(CSV)
    return folder
