"""The LoRA tools as worker runs (tool.json in a run folder) and on the command line."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora_tools import random_lora

from lora_gui.cli import main as cli_main
from lora_gui.engine.lora_tools.merge import lora_deltas
from lora_gui.engine.network import load_lora_file, save_lora
from lora_gui.events import RunState
from lora_gui.settings import SettingsError
from lora_gui.settings.tools import ResizeJob, default_output, free_path, parse_job
from lora_gui.worker.client import WorkerClient

pytestmark = pytest.mark.slow


@pytest.fixture
def lora_file(tmp_path):
    return save_lora(tmp_path / "style.safetensors", random_lora(), {"ss_network_dim": "8", "ss_seed": "1"},
                     "safetensors")


def many_modules() -> dict[str, torch.Tensor]:
    sd = {}
    for i in range(300):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q"
        sd |= {f"{name}.lora_down.weight": torch.randn(8, 64), f"{name}.lora_up.weight": torch.randn(64, 8),
               f"{name}.alpha": torch.tensor(8.0)}
    return sd


def test_resize_runs_in_the_worker_and_never_overwrites(lora_file, tmp_path):
    client = WorkerClient(tmp_path / "runs").tools_client()
    try:
        first = client.start_tool(ResizeJob(lora=str(lora_file), rank=4, save_precision="float"))
        info = first.wait(120)
        assert info.state is RunState.FINISHED, info.message
        result = json.loads(first.paths.result.read_text())
        out = tmp_path / "style_r4.safetensors"
        assert result["output"] == str(out) == info.output_path and result["output_size"] == out.stat().st_size
        assert len(result["modules"]) == 4 and all(0 < m["fro_retained"] <= 1 for m in result["modules"])
        sd, meta = load_lora_file(out)
        assert meta["ss_network_dim"] == "4" and meta["ss_seed"] == "1" and "sshs_model_hash" in meta
        assert all(v.shape[0] == 4 for k, v in sd.items() if k.endswith("lora_down.weight"))
        events = [json.loads(line)["kind"] for line in first.paths.events.read_text().splitlines()]
        assert events[0] == "started" and events.count("progress") == 4 and events[-1] == "finished"
        before = out.read_bytes()
        second = client.start_tool(ResizeJob(lora=str(lora_file), rank=4, save_precision="float"))
        assert second.wait(120).output_path == str(tmp_path / "style_r4-1.safetensors")
        assert out.read_bytes() == before
    finally:
        client.close()


def test_stop_ends_the_tool_without_writing(tmp_path):
    path = save_lora(tmp_path / "big.safetensors", many_modules(), None, "safetensors")
    client = WorkerClient(tmp_path / "runs").tools_client()
    try:
        run = client.start_tool(ResizeJob(lora=str(path), rank=2))
        run.stop()  # in the inbox before the worker has imported torch: it stops at the first module
        info = run.wait(120)
        assert info.state is RunState.STOPPED and info.message == "Stopped at step 1; nothing was written."
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors", "runs"]
    finally:
        client.close()


def test_a_bad_file_fails_with_a_sentence(tmp_path):
    (tmp_path / "hada.safetensors").write_bytes(b"")
    save_lora(tmp_path / "hada.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, None, "safetensors",
              overwrite=True)
    client = WorkerClient(tmp_path / "runs").tools_client()
    try:
        info = client.start_tool(ResizeJob(lora=str(tmp_path / "hada.safetensors"))).wait(120)
        assert info.state is RunState.FAILED
        assert info.message == "The file is a LoHa network; this tool works on plain LoRA and LoCon files only."
        with pytest.raises(SettingsError, match="lora: .*missing.safetensors does not exist"):
            client.start_tool(ResizeJob(lora=str(tmp_path / "missing.safetensors")))
    finally:
        client.close()


def test_cli_merge_and_inspect(lora_file, tmp_path, capsys):
    other = save_lora(tmp_path / "b.safetensors", random_lora(seed=9, rank=2, alpha=1.0), None, "safetensors")
    out = tmp_path / "both.safetensors"
    runs = str(tmp_path / "runs")
    assert cli_main(["tools", "merge", str(lora_file), str(other), "--weights", "0.5", "2",
                     "--save-precision", "float", "--output", str(out), "--runs-dir", runs]) == 0
    merged = lora_deltas(load_lora_file(out)[0])
    a, b = lora_deltas(random_lora()), lora_deltas(random_lora(seed=9, rank=2, alpha=1.0))
    assert max((merged[n] - 0.5 * a[n] - 2 * b[n]).abs().max().item() for n in a) < 1e-4
    capsys.readouterr()
    assert cli_main(["tools", "inspect", str(lora_file), "--runs-dir", runs]) == 0
    text = capsys.readouterr().out
    assert "**Type:** LoCon" in text and "| IN01 | 2 | 8 | 4 |" in text and "Block weights" in text
    assert cli_main(["tools", "resize", str(lora_file), "--dynamic-method", "sv_fro", "--dynamic-param", "2"]) == 2


def test_job_documents_and_names(tmp_path):
    job = parse_job({"kind": "resize", "lora": "x/a.safetensors", "dynamic_method": "sv_fro", "dynamic_param": 0.9})
    assert default_output(job).name == "a_sv_fro-0.9.safetensors"
    (tmp_path / "a.safetensors").touch()
    (tmp_path / "a-1.safetensors").touch()
    assert free_path(tmp_path / "a.safetensors").name == "a-2.safetensors"
    assert free_path(tmp_path / "b").name == "b.safetensors"
    with pytest.raises(SettingsError, match="give one weight per LoRA"):
        parse_job({"kind": "merge", "loras": ["a", "b"], "weights": [1.0]})
