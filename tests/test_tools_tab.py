"""The Tools tab's form -> job document (no browser, no worker)."""

from __future__ import annotations

from lora_gui.settings.tools import MergeJob, ResizeJob, field_order, parse_job
from lora_gui.ui.tools_tab import _document


def test_form_values_become_a_valid_job():
    names = field_order(ResizeJob)
    values = {"lora": "a.safetensors", "rank": 4.0, "conv_rank": "", "dynamic_method": "", "dynamic_param": "",
              "save_precision": "fp16", "output": ""}
    doc = _document("resize", names, tuple(values[n] for n in names))
    assert doc == {"kind": "resize", "lora": "a.safetensors", "rank": 4, "save_precision": "fp16"}
    job = parse_job(doc)
    assert job.rank == 4 and job.conv_rank is None and job.dynamic_method is None


def test_merge_lists_are_split():
    names = field_order(MergeJob)
    values = dict.fromkeys(names, "")
    values.update(loras="a.safetensors\nb.safetensors", weights="0.5, 2", mode="svd", rank=8.0)
    job = parse_job(_document("merge", names, tuple(values[n] for n in names)))
    assert job.loras == ["a.safetensors", "b.safetensors"] and job.weights == [0.5, 2.0] and job.rank == 8
