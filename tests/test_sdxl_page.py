"""The page and SDXL (torch-free, as the web process): family-only fields shown only for their
family, the family guessed from a folder or a safetensors header, and the memory estimate in the
dataset preview."""

from __future__ import annotations

import json
import struct

import gradio as gr

from lora_gui.dataset.memory import FOOTPRINTS, GIB, estimate, guess_family
from lora_gui.settings.schema import GROUPS, TrainingSettings
from lora_gui.ui import fields
from lora_gui.ui.form import build_tabs


def _safetensors_header(path, keys):
    header = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in keys}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    return path


SD_AND_SDXL = {"advanced.noise_offset", "advanced.noise_offset_random_strength", "advanced.adaptive_noise_scale",
               "advanced.multires_noise_iterations", "advanced.multires_noise_discount", "advanced.min_snr_gamma",
               "advanced.conv_dim", "advanced.conv_alpha", "advanced.zero_terminal_snr", "model.v_parameterization"}


def test_family_only_settings_say_so_in_the_schema():
    family_of = {f"{g}.{n}": tuple((info.json_schema_extra or {}).get("family", ()))
                 for g, cls in GROUPS.items() for n, info in cls.model_fields.items()}
    assert family_of["model.v2"] == ("sd",) and family_of["training.clip_skip"] == ("sd",)
    flux_only = {k for k, v in family_of.items() if v == ("flux",)}
    assert {"model.ae", "model.clip_l", "model.t5xxl", "model.flux_lora_format", "advanced.timestep_sampling",
            "advanced.discrete_flow_shift", "advanced.guidance_scale", "advanced.t5xxl_max_token_length"} <= flux_only
    # the DDPM settings a Flux run refuses are shown for SD and SDXL only
    assert {k for k, v in family_of.items() if v == ("sd", "sdxl")} == SD_AND_SDXL
    assert {k for k, v in family_of.items() if v} == set(fields.FAMILY_KEYS) == {"model.v2", "training.clip_skip"} \
        | flux_only | SD_AND_SDXL
    assert GROUPS["model"].model_fields["family"].default == "auto"


def test_the_family_is_guessed_without_torch(tmp_path):
    xl = _safetensors_header(tmp_path / "xl.safetensors", ["conditioner.embedders.0.transformer.x", "model.diffusion_model.y"])
    sd = _safetensors_header(tmp_path / "sd.safetensors", ["model.diffusion_model.y", "cond_stage_model.transformer.z"])
    folder = tmp_path / "xl-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "X"]}))
    assert [guess_family(str(p)) for p in (xl, sd, folder, tmp_path / "missing.ckpt")] == ["sdxl", "sd", "sdxl", None]


def test_family_only_fields_are_hidden_for_another_family(tmp_path):
    xl = _safetensors_header(tmp_path / "xl.safetensors", ["conditioner.embedders.1.model.x"])
    def shown(values, flux=False, ddpm=True):  # the SD-only fields; Flux-only and DDPM ones by the flags
        visible = fields.family_fields_visible(values)
        assert {visible.pop(k) for k in SD_AND_SDXL} == {ddpm}
        assert {visible.pop(k) for k in list(visible) if k not in ("model.v2", "training.clip_skip")} == {flux}
        return visible

    assert shown({"model.family": "sdxl"}) == {"model.v2": False, "training.clip_skip": False}
    assert shown({"model.family": "sd"}) == {"model.v2": True, "training.clip_skip": True}
    assert shown({"model.family": "flux"}, flux=True, ddpm=False) == {"model.v2": False, "training.clip_skip": False}
    assert shown({"model.family": "auto", "model.base_model": str(xl)}) == {"model.v2": False, "training.clip_skip": False}
    assert shown({"model.family": "auto", "model.base_model": ""}, flux=True) == {"model.v2": True,
                                                                                   "training.clip_skip": True}
    with gr.Blocks():
        registry = build_tabs({"model.family": "sdxl"})
    assert registry.components["model.v2"].visible is False
    assert registry.components["training.clip_skip"].visible is False
    assert registry.components["model.v_parameterization"].visible is True  # both families use it


def test_the_dataset_preview_shows_the_estimated_peak_memory(tmp_path):
    from PIL import Image

    from lora_gui.ui.preview import build_preview

    folder = tmp_path / "data" / "2_cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (1024, 1024), (i * 90, 0, 0)).save(folder / f"{i}.png")
    xl = _safetensors_header(tmp_path / "xl.safetensors", ["conditioner.embedders.1.model.x"])
    values = fields.settings_to_values(TrainingSettings())
    values.update({"model.img_folder": str(tmp_path / "data"), "model.base_model": str(xl),
                   "images.resolution": "1024", "training.mixed_precision": "bf16",
                   "training.gradient_checkpointing": True, "training.unet_only": True,
                   "training.optimizer": "AdamW8bit", "training.network_dim": 32})
    md = build_preview(values).markdown
    expected = estimate(FOOTPRINTS["sdxl"], width=1024, height=1024, batch=1, rank=32, optimizer="AdamW8bit",
                        precision="bf16", checkpointing=True, train_te=False, te_cached=True)
    assert f"Estimated peak GPU memory at 1024x1024: {expected.total / GIB:.1f} GB" in md
    unknown = build_preview({**values, "model.base_model": ""}).markdown
    assert "choose a base model (or its family) to see the estimated peak GPU memory" in unknown


def test_a_kohya_ss_sdxl_preset_imports_as_sdxl():
    """kohya_ss's presets/lora/"SDXL - LoRA AI_characters standard v1.1.json", as published."""
    from pathlib import Path

    from lora_gui.settings.foreign import convert

    doc = json.loads((Path(__file__).parent / "fixtures" / "kohya_ss_sdxl_lora.json").read_text())
    settings, report = convert(doc)
    assert settings.model.family == "sdxl" and report.mapped["sdxl"] == "model.family"
    assert settings.images.resolution == "1024,1024" and settings.training.network_dim == 32
    assert settings.training.gradient_checkpointing and settings.advanced.min_snr_gamma == 5
    assert "float32" in report.ignored["sdxl_no_half_vae"]
    assert "cached" in report.ignored["sdxl_cache_text_encoder_outputs"]
    sd, _ = convert({**doc, "sdxl": False})
    assert sd.model.family == "auto"


def test_the_sdxl_presets_fit_a_24_gb_gpu_at_1024_px():
    from lora_gui.dataset.memory import preview_estimate
    from lora_gui.settings import io

    for name in ("sdxl-character", "sdxl-style"):
        settings = io.load_preset(name)
        assert settings.model.family == "sdxl" and settings.images.resolution == "1024"
        est = preview_estimate(settings, (1024, 1024))
        assert est is not None and est.total < 20 * GIB, (name, est.sentence())
