"""The schema: completeness, metadata, cross-field rules, derived numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_gui.settings import FIELD_GROUPS, GROUPS, SettingsError, TrainingSettings, io
from lora_gui.settings.fields import WIDGETS
from lora_gui.settings.schema import estimate_batches, parse_optimizer_args

# Canonical names of REFERENCE.md section 1 (checked against the file itself when it is present).
CANONICAL = """
base_model v2 v_parameterization vae img_folder reg_img_folder output_folder output_name save_as
save_precision training_comment no_meta log_dir lora_model_for_resume save_state
load_previous_save_state trigger_words repeats epochs max_steps save_every_n_epochs resolution buckets
min_bucket_resolution max_bucket_resolution bucket_reso_steps bucket_no_upscale flip_aug color_aug
random_crop cache_latents cache_latents_to_disk seed clip_skip learning_rate unet_lr text_encoder_lr
unet_only text_only lr_scheduler lr_scheduler_num_cycles lr_scheduler_power lr_warmup_steps optimizer
network_dim network_alpha batch_size gradient_accumulation_steps num_workers persistent_workers
mixed_precision gradient_checkpointing max_grad_norm caption_extension shuffle_caption keep_tokens
caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate max_token_length
tag_occurrence_txt_file sort_tag_occurrence_alphabetically noise_offset multires_noise_iterations
multires_noise_discount min_snr_gamma conv_dim conv_alpha prior_loss_weight attention sample_prompts
sample_sampler sample_width sample_height sample_steps sample_cfg_scale test_seed sample_every_n_epochs
sample_every_n_steps save_json_folder load_json_path json_load_skip_list multi_run_folder save_json_only
validation_split validation_every_n_steps validation_every_n_epochs network_dropout optimizer_args
""".split()
# Legacy names that are not settings of their own but are understood on import.
LEGACY = {"use_8bit_adam": "optimizer"}

TABS = ["model", "triggers", "images", "training", "labels", "advanced", "samples", "runs", "launch"]


def test_every_canonical_setting_exists_once_with_description_and_ui_metadata():
    assert list(GROUPS) == TABS
    for name in CANONICAL:
        assert name in FIELD_GROUPS, name
    names = [n for cls in GROUPS.values() for n in cls.model_fields]
    assert len(names) == len(set(names)), "a field name is declared twice"
    for group, cls in GROUPS.items():
        assert cls.tab == group and cls.title
        for name, info in cls.model_fields.items():
            assert info.description and len(info.description) > 20, name
            extra = info.json_schema_extra
            assert extra["widget"] in WIDGETS, name
            assert isinstance(extra["advanced"], bool) and isinstance(extra["order"], int)


def _reference_names(text: str) -> set[str]:
    section = text.split("## 1.")[1].split("## 2.")[0]
    names = set()
    for line in section.splitlines():
        m = re.match(r"\|\s*([a-z0-9_]+(?:\s*,\s*[a-z0-9_]+)*)\s*(\(\+ to disk\))?\s*\|", line)
        if m and m.group(1) not in ("setting",):
            names.update(n.strip() for n in m.group(1).split(","))
    return names


def test_reference_md_names_are_all_declared():
    ref = Path(__file__).resolve().parents[2] / "shared" / "REFERENCE.md"
    if not ref.exists():
        pytest.skip("shared/REFERENCE.md is not beside this checkout")
    names = _reference_names(ref.read_text())
    assert len(names) > 60
    missing = [n for n in names if n not in FIELD_GROUPS and n not in LEGACY]
    assert missing == []


def test_defaults_validate_and_descriptions_state_corrected_meanings():
    s = TrainingSettings()
    assert s.training.network_dim == 16 and s.images.max_steps == 0
    desc = {n: GROUPS[g].model_fields[n].description for n, g in FIELD_GROUPS.items()}
    assert "rank" in desc["network_dim"].lower()
    assert "v-prediction" in desc["v_parameterization"]
    assert "path" in desc["vae"].lower()
    assert "aspect" in desc["buckets"].lower()
    assert "layer" in desc["clip_skip"].lower()
    assert "not clip tokens" in desc["keep_tokens"].lower()
    assert "chunks" in desc["max_token_length"]
    assert "attention" in desc["attention"].lower()


def bad(doc):
    with pytest.raises(SettingsError) as info:
        io.validate_document(doc)
    return info.value


def test_all_errors_of_a_document_are_reported_together_with_paths():
    err = bad({"images": {"resolution": "abc", "bucket_reso_steps": 65},
               "training": {"learning_rat": 1, "batch_size": "x"},
               "labels": {"max_token_length": 100}})
    assert set(err.paths) == {"images.resolution", "images.bucket_reso_steps", "training.learning_rat",
                              "training.batch_size", "labels.max_token_length"}
    assert "did you mean 'learning_rate'" in str(err)
    assert "75, 150 or 225" in str(err)


def test_field_errors_and_cross_field_errors_together():
    err = bad({"labels": {"max_token_length": 100},
               "training": {"unet_only": True, "text_only": True}})
    assert set(err.paths) == {"labels.max_token_length", "training.text_only"}


@pytest.mark.parametrize("doc,path", [
    ({"images": {"resolution": "2048", "max_bucket_resolution": 1024}}, "images.resolution"),
    ({"images": {"resolution": "128", "min_bucket_resolution": 256}}, "images.resolution"),
    ({"images": {"min_bucket_resolution": 1024, "max_bucket_resolution": 512, "resolution": "512"}},
     "images.min_bucket_resolution"),
    ({"images": {"bucket_reso_steps": 96}}, "images.bucket_reso_steps"),
    ({"images": {"color_aug": True, "cache_latents": True}}, "images.color_aug"),
    ({"images": {"random_crop": True, "cache_latents": True}}, "images.random_crop"),
    ({"training": {"unet_only": True, "text_only": True}}, "training.text_only"),
    ({"training": {"lr_warmup_steps": 10, "lr_scheduler": "constant"}}, "training.lr_scheduler"),
    ({"training": {"unet_only": True, "unet_lr": 0}}, "training.unet_lr"),
    ({"training": {"text_only": True, "text_encoder_lr": 0}}, "training.text_encoder_lr"),
    ({"training": {"learning_rate": 0}}, "training.learning_rate"),
    ({"training": {"lr_scheduler": "adafactor"}}, "training.lr_scheduler"),
    ({"samples": {"sample_width": 100}}, "samples.sample_width"),
    ({"samples": {"sample_height": 516}}, "samples.sample_height"),
    ({"labels": {"keep_tokens": -1}}, "labels.keep_tokens"),
    ({"labels": {"caption_dropout_rate": 1.5}}, "labels.caption_dropout_rate"),
    ({"labels": {"caption_tag_dropout_rate": -0.1}}, "labels.caption_tag_dropout_rate"),
    ({"labels": {"max_token_length": 76}}, "labels.max_token_length"),
    ({"training": {"persistent_workers": True, "num_workers": 0}}, "training.persistent_workers"),
    ({"training": {"optimizer_args": "weight_decay=0.1 oops"}}, "training.optimizer_args"),
    ({"model": {"output_name": "../evil"}}, "model.output_name"),
])
def test_rule_rejects(doc, path):
    err = bad(doc)
    assert path in err.paths
    assert all(len(i.message) > 15 for i in err.issues)


@pytest.mark.parametrize("doc", [
    {"images": {"resolution": "1024", "max_bucket_resolution": 1024}},
    {"images": {"resolution": "768,512"}},
    {"images": {"resolution": "2048", "buckets": False}},
    {"images": {"color_aug": True, "random_crop": True, "cache_latents": False}},
    {"training": {"unet_only": True}},
    {"training": {"text_only": True}},
    {"training": {"lr_warmup_steps": 10, "lr_scheduler": "constant_with_warmup"}},
    {"training": {"unet_lr": 0}},  # trains only the text encoder
    {"training": {"text_encoder_lr": 0, "unet_only": True}},
    {"training": {"lr_scheduler": "adafactor", "optimizer": "Adafactor"}},
    {"samples": {"sample_width": 512, "sample_height": 768}},
    {"labels": {"keep_tokens": 0, "caption_dropout_rate": 1.0, "caption_tag_dropout_rate": 0.0}},
    {"labels": {"max_token_length": 225}},
    {"training": {"persistent_workers": True, "num_workers": 2}},
])
def test_rule_accepts(doc):
    io.validate_document(doc)


def test_per_part_learning_rates():
    s = io.validate_document({"training": {"learning_rate": 1e-4, "unet_lr": 0}})
    assert not s.train_unet and s.train_text_encoder and s.effective_text_encoder_lr == 1e-4
    s = io.validate_document({"training": {"text_encoder_lr": 5e-5, "unet_only": True}})
    assert s.train_unet and not s.train_text_encoder


def test_derived_numbers():
    s = io.validate_document({"training": {"batch_size": 2, "gradient_accumulation_steps": 3},
                              "images": {"epochs": 4}})
    assert s.effective_batch_size() == 6 and s.effective_batch_size(num_processes=2) == 12
    # 2 folders: 10 images x 5 repeats + 4 images x 10 repeats = 90 items; batch 2 -> 45 batches
    batches = estimate_batches(10 * 5 + 4 * 10, 2, with_reg=False)
    assert batches == 45
    assert estimate_batches(90, 2, with_reg=True) == 90  # regularisation doubles the epoch
    plan = s.plan_steps(batches)
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (15, 4, 60)
    # max_steps overrides epochs only when > 0
    s2 = s.model_copy(update={"images": s.images.model_copy(update={"max_steps": 20})})
    assert s2.plan_steps(batches).total_steps == 20 and s2.plan_steps(batches).epochs == 2
    assert s.warmup_steps(100) == 0
    s3 = io.validate_document({"training": {"lr_warmup_steps": 0.1}})
    assert s3.warmup_steps(200) == 20
    s4 = io.validate_document({"training": {"lr_warmup_steps": 7}})
    assert s4.warmup_steps(200) == 7


def test_optimizer_args_parse_safely():
    assert parse_optimizer_args("weight_decay=0.01 betas=0.9,0.99 decouple=True d0=1e-6 x=None "
                                "name='a b'") == {"weight_decay": 0.01, "betas": (0.9, 0.99),
                                                  "decouple": True, "d0": 1e-6, "x": None,
                                                  "name": "a b"}
    assert parse_optimizer_args("") == {}
    # Anything that looks like code stays text: nothing is evaluated.
    assert parse_optimizer_args("x=__import__('os')") == {"x": "__import__('os')"}
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer_args("weight_decay 0.1")


def test_settings_are_frozen():
    s = TrainingSettings()
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        s.training.learning_rate = 1.0  # type: ignore[misc]
