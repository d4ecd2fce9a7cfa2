"""The model-family seam: the registry, the SD family's metadata strings, the conditioning helpers,
and that a run reaches the model only through its family (the loop never branches on one)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_gui.engine import families
from lora_gui.engine import train as train_module
from lora_gui.engine.families import FAMILIES, family_for, split_conditioning, stack_conditioning
from lora_gui.engine.families.sd import StableDiffusion
from lora_gui.settings import io

ENGINE = Path(train_module.__file__).parent
FAMILY_AGNOSTIC = ("train.py", "setup.py", "checkpoint.py", "evaluation.py", "reporting.py", "loader.py")


def test_the_registry_knows_sd_sdxl_and_flux_and_picks_by_setting():
    assert list(FAMILIES) == ["sd", "sdxl", "flux"] and isinstance(FAMILIES["sd"], StableDiffusion)
    assert family_for(io.load_preset("demo-tiny-cpu")) is FAMILIES["sd"]
    assert family_for(io.load_preset("demo-tiny-sdxl-cpu")) is FAMILIES["sdxl"]  # family: sdxl
    assert family_for(io.load_preset("demo-tiny-flux-cpu")) is FAMILIES["flux"]  # family: flux


def test_auto_detects_the_family_from_the_weights(demo, tmp_path_factory):
    from lora_gui.engine.demo import build_demo

    xl = build_demo(tmp_path_factory.mktemp("xl-detect"), family="sdxl")
    for base, family in ((demo.model_dir, "sd"), (demo.single_file, "sd"), (xl.model_dir, "sdxl"),
                         (xl.single_file, "sdxl"), (tmp_path_factory.mktemp("empty"), "sd")):
        settings = io.apply_overrides(io.load_preset("demo-tiny-cpu"), [f"model.base_model={base}"])
        assert settings.model.family == "auto" and family_for(settings) is FAMILIES[family], base


@pytest.mark.parametrize("version,v_param,expected", [
    ("sd_v1", False, ("False", "sd_v1", "stable-diffusion-v1/lora")),
    ("sd_v1", True, ("False", "sd_v1_v", "stable-diffusion-v1/lora")),
    ("sd_v2", False, ("True", "sd_v2", "stable-diffusion-v2-512/lora")),
    ("sd_v2_v", True, ("True", "sd_v2_v", "stable-diffusion-v2-768-v/lora")),
])
def test_sd_metadata_version_strings(version, v_param, expected):
    settings = io.apply_overrides(io.load_preset("demo-tiny-cpu"), [f"model.v_parameterization={v_param}"])
    versions = StableDiffusion().metadata_versions(SimpleNamespace(version=version), settings)
    assert (versions["ss_v2"], versions["ss_base_model_version"], versions["modelspec.architecture"]) == expected


def test_conditioning_splits_per_row_and_stacks_back():
    states, pooled = torch.randn(3, 5, 4), torch.randn(3, 4)
    rows = split_conditioning(states)
    assert len(rows) == 3 and torch.equal(rows[1], states[1])
    assert torch.equal(stack_conditioning([rows[2], rows[0]]), states[[2, 0]])
    pairs = split_conditioning((states, pooled))
    assert len(pairs) == 3 and torch.equal(pairs[1][1], pooled[1])
    back = stack_conditioning(pairs)
    assert torch.equal(back[0], states) and torch.equal(back[1], pooled)


def _family_names_used(path: Path) -> set[str]:
    """Imports of a family module and attribute reads that only one family's model has."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_gui.engine.families."):
            found.add(node.module)
        if isinstance(node, ast.Attribute) and node.attr in ("text_encoder", "tokenizer", "sd", "StableDiffusion"):
            found.add(node.attr)
    return found


@pytest.mark.parametrize("name", FAMILY_AGNOSTIC)
def test_the_loop_and_its_units_know_no_family(name):
    assert _family_names_used(ENGINE / name) == set()


METHODS = [name for name in vars(families.ModelFamily) if not name.startswith("_") and name != "name"]


def _recording(family):
    """``family`` with each interface method counting its calls into the returned dict."""
    calls: dict[str, int] = {}
    for name in METHODS:
        def counted(*args, _name=name, _method=getattr(family, name), **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _method(*args, **kwargs)

        setattr(family, name, counted)
    return family, calls


def test_a_run_reaches_the_model_through_its_family(demo, tmp_path, monkeypatch):
    family, calls = _recording(StableDiffusion())
    monkeypatch.setattr(train_module, "family_for", lambda settings: family)
    settings = io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={tmp_path}", "images.max_steps=2", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0"])
    result = train_module.run_training(settings, lambda event: None)
    assert result.status == "finished", result.message
    assert calls["load"] == 1 and calls["apply_network"] == 1 and calls["metadata_versions"] == 1
    for step_call in ("add_noise", "target", "batch_conditioning"):
        assert calls[step_call] == 2, step_call  # once per step
    # one timestep draw per sample (2 steps x batch of 2), each bounded by the timestep count
    assert calls["sample_timesteps"] == calls["num_train_timesteps"] == 4
    # predict: once per step, and once on the meta device for the memory estimate's trace
    assert calls["predict"] == 3 and calls["meta_extra"] == 1 and calls["with_unet"] == 1
    assert calls["encode_text"] >= 1
