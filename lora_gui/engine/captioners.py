"""The captioners of an auto-captioning job, one interface: ``load_captioner(job)`` gives an
object whose ``caption(paths)`` returns, per image, the tags (WD14) or the one sentence
(BLIP, Florence-2, Qwen2-VL) to merge with the image's caption under the job's rule
(:func:`lora_gui.dataset.autocaption.merge_caption`).

The transformers captioners load a local folder as ``save_pretrained`` writes it, offline
(``local_files_only``), with the native classes (no remote code) and safetensors weights only
(``use_safetensors``: a pickle is never loaded); :func:`missing_model_files` has said which files
the folder must hold before any of this runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lora_gui.dataset.autocaption import CaptionJob, missing_model_files, sentence_caption
from lora_gui.dataset.images import open_rgb


class Captioner(Protocol):
    def caption(self, paths: list[Path]) -> list[list[str]]: ...


def _device_dtype():
    import torch

    if torch.cuda.is_available():  # half precision on a GPU: captioning needs no fp32 accuracy
        return "cuda", torch.float16
    return "cpu", torch.float32


def _load_model(cls, folder: Path):
    device, dtype = _device_dtype()
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
    return model.to(device).train(False), device, dtype


class _TransformersCaptioner:
    """Shared by the transformers captioners: the folder's files, the job, images as RGB."""

    def __init__(self, job: CaptionJob):
        self.folder = Path(job.tagger_dir)
        missing_model_files(job.captioner, self.folder, raise_error=True)
        self.job = job

    def images(self, paths: list[Path]):
        return [open_rgb(p) for p in paths]  # upright, transparency composited onto white

    def generate(self, model, inputs: dict, device, dtype):
        import torch

        moved = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                 for k, v in inputs.items() if hasattr(v, "to")}
        with torch.inference_mode():
            return model.generate(**moved, max_new_tokens=self.job.max_new_tokens, do_sample=False)


class BlipCaptioner(_TransformersCaptioner):
    """BLIP image captioning (Salesforce's blip-image-captioning-*): the prompt, if any, is the
    start of the sentence the model completes ("a photography of")."""

    def __init__(self, job: CaptionJob):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        super().__init__(job)
        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        self.model, self.device, self.dtype = _load_model(BlipForConditionalGeneration, self.folder)

    def caption(self, paths: list[Path]) -> list[list[str]]:
        prompt = self.job.prompt.strip()
        images = self.images(paths)
        inputs = self.processor(images=images, text=[prompt] * len(images) if prompt else None,
                                return_tensors="pt")
        out = self.generate(self.model, inputs, self.device, self.dtype)
        return [sentence_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class Florence2Captioner(_TransformersCaptioner):
    """Florence-2 in transformers' native format (``florence-community/Florence-2-*``; Microsoft's
    original folders need their remote code, which is never run). The prompt is a task token:
    <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>."""

    def __init__(self, job: CaptionJob):
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        super().__init__(job)
        self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        self.model, self.device, self.dtype = _load_model(Florence2ForConditionalGeneration, self.folder)

    def caption(self, paths: list[Path]) -> list[list[str]]:
        images = self.images(paths)
        inputs = self.processor(images=images, text=[self.job.prompt_or_default] * len(images),
                                return_tensors="pt")
        out = self.generate(self.model, inputs, self.device, self.dtype)
        return [sentence_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


QWEN_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


class QwenVLCaptioner(_TransformersCaptioner):
    """Qwen2-VL and Qwen2.5-VL instruct models: the prompt is the instruction. The chat turn is
    written in Qwen's format (``<|im_start|>user ... <|im_end|>``, the image as
    ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch + ``<|vision_end|>``, as the
    models' chat template and processor do); the tokenizer and image processor are loaded on
    their own because transformers' Qwen2-VL processor also needs a video processor (torchvision)."""

    def __init__(self, job: CaptionJob):
        import json

        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        super().__init__(job)
        model_type = json.loads((self.folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in QWEN_CLASSES:
            from lora_gui.dataset.scan import DatasetError

            raise DatasetError(f"The folder {self.folder} holds a {model_type!r} model, not Qwen2-VL or "
                               f"Qwen2.5-VL ({', '.join(QWEN_CLASSES)}): choose another captioner.")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, padding_side="left")
        self.image_processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        cls = getattr(transformers, QWEN_CLASSES[model_type])
        self.model, self.device, self.dtype = _load_model(cls, self.folder)

    def chat(self, image_tokens: int) -> str:
        return ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * image_tokens
                + f"<|vision_end|>{self.job.prompt_or_default}<|im_end|>\n<|im_start|>assistant\n")

    def caption(self, paths: list[Path]) -> list[list[str]]:
        pixels = self.image_processor(images=self.images(paths), return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        texts = [self.chat(int(thw.prod()) // merge) for thw in pixels["image_grid_thw"]]
        inputs = {**self.tokenizer(texts, return_tensors="pt", padding=True), **pixels}
        out = self.generate(self.model, inputs, self.device, self.dtype)
        new = out[:, inputs["input_ids"].shape[1]:]  # only the answer, not the prompt
        return [sentence_caption(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def load_captioner(job: CaptionJob) -> Captioner:
    """The job's captioner, loaded from its folder."""
    if job.captioner == "wd14":
        from lora_gui.engine.tagger import WD14Tagger

        return WD14Tagger(job.tagger_dir, job)
    table = {"blip": BlipCaptioner, "florence2": Florence2Captioner, "qwen2vl": QwenVLCaptioner}
    return table[job.captioner](job)
