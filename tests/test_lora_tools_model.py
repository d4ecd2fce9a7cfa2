"""Merge into a checkpoint and extract from one, on the tiny demo model (images compared in fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_gui.engine.lora_tools.checkpoint import read_base
from lora_gui.engine.lora_tools.extract import extract_lora
from lora_gui.engine.lora_tools.merge import apply_deltas, lora_deltas
from lora_gui.engine.model_load import load_base_model
from lora_gui.engine.network import LoraNetwork, NetworkSpec

pytestmark = pytest.mark.slow


def _images(model) -> np.ndarray:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(7), output_type="np").images


def _with_lora(path, sd, config_dir=None):
    """The base model with the LoRA applied by the trainer's own network (peft), and its images."""
    model = load_base_model(path, config_dir=config_dir)
    network = LoraNetwork.apply(model.unet, model.text_encoder, NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    network.load_state_dict_kohya(sd)
    return _images(model)


@pytest.fixture(scope="module")
def lora_and_images(demo):
    """A random rank-4 LoCon in kohya format (every module of the demo model), and images with it."""
    model = load_base_model(demo.single_file)
    base_images = _images(model)
    network = LoraNetwork.apply(model.unet, model.text_encoder,
                                NetworkSpec(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in network.unet_parameters() + network.text_encoder_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    sd = network.state_dict_kohya()
    return sd, base_images, _images(model)


def test_merge_into_checkpoint_gives_the_images_of_base_plus_lora(demo, lora_and_images, tmp_path):
    sd, base_images, lora_images = lora_and_images
    assert np.abs(lora_images - base_images).max() > 0.05  # the LoRA really changes the images
    base = read_base(demo.single_file)
    merged, missing = apply_deltas(base.state, base.key_map, lora_deltas(sd))
    assert missing == []
    assert set(merged) == set(base.state)  # every key of the file kept (VAE, embeddings...)
    path = tmp_path / "merged.safetensors"
    save_file(merged, str(path))
    merged_images = _images(load_base_model(path, config_dir=demo.model_dir))
    assert np.abs(merged_images - lora_images).max() < 1e-3


def test_merge_into_a_diffusers_folder_writes_the_single_file_layout(demo, lora_and_images):
    sd, _, _ = lora_and_images
    from_folder, from_file = read_base(demo.model_dir), read_base(demo.single_file)
    assert set(from_folder.state) == set(from_file.state) and from_folder.key_map == from_file.key_map
    assert sorted(from_folder.targets) == sorted(from_file.targets)
    names = {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}
    assert names == set(from_file.lora_targets(conv=True))  # the trainer's LoCon targets, all mapped
    assert names > set(from_file.lora_targets(conv=False))


def test_extract_from_base_and_merged_reproduces_the_lora(demo, lora_and_images, tmp_path):
    sd, _, lora_images = lora_and_images
    base = read_base(demo.single_file)
    merged, _ = apply_deltas(base.state, base.key_map, lora_deltas(sd))
    extracted, kept = extract_lora(base, merged, 4, conv_rank=2, conv=True)
    want, got = lora_deltas(sd), lora_deltas(extracted)
    assert set(got) == set(want)
    assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-3
    assert min(kept.values()) > 0.999999
    assert extracted[next(k for k in extracted if k.endswith(".alpha"))].item() in (2.0, 4.0)  # alpha = rank
    assert np.abs(_with_lora(demo.single_file, extracted) - lora_images).max() < 1e-3
    without_conv, _ = extract_lora(base, merged, 4, conv=False)
    assert not any("resnets" in k for k in without_conv)


def test_runner_merges_into_a_checkpoint_file_and_extracts_from_it(demo, lora_and_images, tmp_path):
    from lora_gui.engine.lora_tools.runner import run_tool
    from lora_gui.engine.model_files import read_state_dict
    from lora_gui.engine.network import save_lora
    from lora_gui.events import CommandQueue, Finished
    from lora_gui.settings.tools import ExtractJob, MergeJob

    sd, _, _ = lora_and_images
    lora = save_lora(tmp_path / "l.safetensors", sd, None, "safetensors")
    events: list = []
    merged_path = tmp_path / "merged.safetensors"
    run_tool(MergeJob(loras=[str(lora)], weights=[0.5], base=str(demo.single_file), output=str(merged_path)),
             events.append, CommandQueue(), tmp_path)
    assert isinstance(events[-1], Finished), events[-1]
    assert events[-1].output_path == str(merged_path)
    base = read_base(demo.single_file)
    want, _ = apply_deltas(base.state, base.key_map, lora_deltas(sd, 0.5))
    got = read_state_dict(merged_path)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    events.clear()
    out = tmp_path / "x.safetensors"
    run_tool(ExtractJob(base=str(demo.single_file), tuned=str(merged_path), rank=4, conv=True, conv_rank=2,
                        save_precision="float", output=str(out)), events.append, CommandQueue(), tmp_path)
    assert events[-1].output_path == str(out)
    extracted = lora_deltas(load_lora_file_tensors(out))
    half = lora_deltas(sd, 0.5)
    assert max((extracted[n] - half[n]).abs().max().item() for n in half) < 1e-3


def load_lora_file_tensors(path):
    from lora_gui.engine.network import load_lora_file

    return load_lora_file(path)[0]
