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


def test_results_are_drawn(tmp_path):
    import json
    from types import SimpleNamespace

    from lora_gui.events import RunState
    from lora_gui.ui.tools_tab import _result
    from lora_gui.worker.protocol import RunPaths

    paths = RunPaths(tmp_path)
    paths.result.write_text(json.dumps({"tool": "inspect", "card_text": "**Type:** LoRA",
                                        "blocks": [{"block": "TE", "norm": 2.0}, {"block": "IN01", "norm": 1.0}]}))
    run, info = SimpleNamespace(paths=paths), SimpleNamespace(state=RunState.FINISHED, message="")
    asked = []
    ctx = SimpleNamespace(servable=lambda path: asked.append(path) or str(path))
    status, _, card, _, chart = _result(ctx, run, info)
    assert status == "**inspect**: done" and card == "**Type:** LoRA"
    assert [list(row) for row in chart.value["data"]] == [["TE", 2.0], ["IN01", 1.0]]
    out = tmp_path / "x.safetensors"
    paths.result.write_text(json.dumps({"tool": "extract", "output": str(out), "output_size": 2e6, "modules": 2,
                                        "mean_fro_retained": 1.0, "kept_energy": {"a": 1.0, "b": 0.5}}))
    status, download, _, table, _ = _result(ctx, run, info)
    assert status == f"**extract**: wrote `{out}` (2.00 MB)" and asked == [out]
    assert download.value["path"] == str(out)
    outside = SimpleNamespace(servable=lambda path: None)  # a file outside the served roots
    status, download, _, _, _ = _result(outside, run, info)
    assert "outside the folders this page may serve" in status and download.visible is False
    assert [list(row) for row in table.value["data"]] == [["a", 1.0], ["b", 0.5]]
    failed = SimpleNamespace(state=RunState.FAILED, message="The file is a LoHa network.")
    assert _result(ctx, run, failed)[0] == "**failed**: The file is a LoHa network."
