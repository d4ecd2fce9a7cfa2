"""The WD14-style image tagger: an ONNX model run by onnxruntime on the CPU (or a GPU provider
when onnxruntime has one), loaded offline from a local folder (``model.onnx`` +
``selected_tags.csv``, see :mod:`lora_gui.dataset.autocaption`).

Input preparation follows kohya-ss/sd-scripts ``finetune/tag_images_by_wd14_tagger.py``:
transparency onto white, RGB -> BGR, padded to a square with white, resized to the model's input
side (read from the model: 448 for the released taggers), float32 0..255, NHWC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lora_gui.dataset.autocaption import (
    CaptionJob,
    TagEntry,
    choose_tags,
    missing_tagger_files,
    read_tags_csv,
)
from lora_gui.dataset.images import open_rgb


class WD14Tagger:
    """A captioner (:mod:`lora_gui.engine.captioners`): ``caption(paths)`` gives each image's tags
    chosen with ``job``'s thresholds and exclusions."""

    def __init__(self, folder: str | Path, job: CaptionJob | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.job = job or CaptionJob(images=[], tagger_dir=str(folder))
        missing_tagger_files(self.folder, raise_error=True)
        self.tags: list[TagEntry] = read_tags_csv(self.folder / "selected_tags.csv")
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=providers)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        side = first.shape[1]
        self.size = side if isinstance(side, int) else 448

    def prepare(self, path: str | Path) -> np.ndarray:
        image = open_rgb(path)  # upright, transparency composited onto white
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()  # RGB -> BGR

    def predict(self, paths: list[Path]) -> np.ndarray:
        """Probabilities, one row per image, in the tag list's order."""
        batch = np.stack([self.prepare(p) for p in paths])
        return self.session.run(None, {self.input_name: batch})[0]

    def caption(self, paths: list[Path]) -> list[list[str]]:
        return [choose_tags(probs, self.tags, self.job) for probs in self.predict(paths)]
