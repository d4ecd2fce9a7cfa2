"""The kohya_ss importer over kohya_ss's own shipped LoRA configs (a copy of their keys and values in
tests/fixtures/kohya_ss_configs.json): every key is mapped, promised by another issue, or not
applicable with a reason; and the conversions kohya_ss applies before calling sd-scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_gui.settings.foreign import _UNKNOWN, command_line_flags, convert
from lora_gui.settings.kohya_keys import ALIASES, LATER, NOT_APPLICABLE

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "kohya_ss_configs.json").read_text())
CONFIGS: dict[str, dict] = FIXTURE["configs"]

# Values in those files that our schema refuses, each with the reason the report gives: sd-scripts
# takes them, lora-gui asks for something it can train (bucket steps of 64 for SD's U-Net, sides that
# are multiples of 8, a rank of at most 1024: the LyCORIS presets' 100000 means "full" in LoKr).
EXPECTED_INVALID = {
    "bucket_reso_steps": "must be at least 64",
    "max_resolution": "multiple of 8",
    "network_dim": "at most 1024",
}


def test_fixture_holds_every_shipped_lora_config():
    assert len(CONFIGS) == 62
    assert sum(name.startswith("presets/lora/") for name in CONFIGS) == 31
    keys = {k for doc in CONFIGS.values() for k in doc}
    assert len(keys) == 237


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_key_of_a_shipped_config_has_a_mapping_or_a_reason(name):
    doc = CONFIGS[name]
    settings, report = convert(doc)
    grouped = [report.mapped, report.later, report.not_applicable, report.rejected]
    for key in doc:
        homes = [g for g in grouped if key in g]
        assert len(homes) == 1, f"{key}: in {len(homes)} groups"
    assert _UNKNOWN not in report.rejected.values()
    for key, reason in report.rejected.items():
        assert key in EXPECTED_INVALID and EXPECTED_INVALID[key] in reason, (key, reason)
    text = report.report()
    for key in doc:
        assert f"  {key}" in text
    assert all(v.startswith("issue #1") for v in report.later.values())
    assert all(len(reason) > 20 for reason in report.not_applicable.values())


def test_report_groups_keys_by_kind():
    _, report = convert({**CONFIGS["test/config/TI-AdamW8bit.json"], "huggingface_token": ""})
    text = report.report()
    assert "Mapped" in text and "Added by another open issue" in text and "Not applicable" in text
    assert "textual-inversion" in report.not_applicable["init_word"]
    assert "Hugging Face" in report.not_applicable["huggingface_token"]
    assert report.mapped["sdxl"] == "model.family"  # SDXL landed (issue #13)
    assert report.mapped["multi_gpu"].endswith(".multi_gpu")  # several GPUs landed (issue #15)
    assert not report.later


def test_tables_do_not_overlap_and_name_real_settings():
    from lora_gui.settings.schema import FIELD_GROUPS

    assert not set(LATER) & set(NOT_APPLICABLE)
    assert not (set(LATER) | set(NOT_APPLICABLE)) & set(ALIASES)
    # json_load_skip_list is ours, and never loaded from a file
    assert (set(LATER) | set(NOT_APPLICABLE)) & set(FIELD_GROUPS) == {"json_load_skip_list"}
    assert set(ALIASES.values()) <= set(FIELD_GROUPS)


def test_locon_config_values_arrive_as_kohya_ss_passes_them():
    """test/config/locon-AdamW8bit.json: the values kohya_ss's lora_gui.py passes to sd-scripts."""
    s, report = convert(CONFIGS["test/config/locon-AdamW8bit.json"])
    adv, tr = s.advanced, s.training
    assert tr.optimizer == "AdamW8bit" and tr.learning_rate == 5e-4
    assert tr.unet_lr == 1e-4 and tr.text_encoder_lr == 1e-4 and tr.batch_size == 4
    assert (tr.network_dim, tr.network_alpha, adv.conv_dim, adv.conv_alpha) == (16, 8, 16, 8)
    assert (adv.network_dropout, adv.rank_dropout, adv.module_dropout) == (0.1, 0.1, 0.1)
    assert adv.scale_weight_norms == 1 and adv.debiased_estimation_loss
    assert adv.ip_noise_gamma == 0.1 and adv.ip_noise_gamma_random_strength
    assert adv.noise_offset == 0.05 and adv.noise_offset_random_strength
    assert adv.adaptive_noise_scale == 0.005
    assert (adv.min_timestep, adv.max_timestep, adv.loss_type) == (0, 1000, "l2")
    assert s.labels.caption_dropout_rate == 0.05 and s.samples.sample_every_n_steps == 25
    assert report.mapped["LoRA_type"] == "advanced.network_type" and adv.network_type == "LoRA"
    assert report.mapped["LyCORIS_preset"] == "advanced.lycoris_preset"


def _with(name: str, **changes) -> dict:
    return {**CONFIGS[name], **changes}


def test_noise_offset_type_original_keeps_only_the_noise_offset():
    doc = _with("test/config/locon-AdamW8bit.json", multires_noise_iterations=6,
                multires_noise_discount=0.5)
    s, report = convert(doc)
    assert s.advanced.noise_offset == 0.05 and s.advanced.adaptive_noise_scale == 0.005
    assert s.advanced.multires_noise_iterations == 0 and s.advanced.multires_noise_discount == 0.3
    assert "multires_noise_iterations" in report.not_applicable
    assert report.mapped["noise_offset_type"] == "advanced.noise_offset"


def test_noise_offset_type_multires_keeps_only_the_multires_settings():
    doc = _with("test/config/locon-AdamW8bit.json", noise_offset_type="Multires",
                multires_noise_iterations=8, multires_noise_discount=0.2)
    s, report = convert(doc)
    assert (s.advanced.multires_noise_iterations, s.advanced.multires_noise_discount) == (8, 0.2)
    assert s.advanced.noise_offset == 0 and not s.advanced.noise_offset_random_strength
    assert s.advanced.adaptive_noise_scale == 0
    assert {"noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"} <= \
        set(report.not_applicable)


def test_additional_parameters_flags_are_imported_and_win_over_keys():
    doc = _with("test/config/LoKR-AdamW8bit-toml.json", max_grad_norm=1,
                additional_parameters='--lr_scheduler_type "CosineAnnealingLR" --lr_scheduler_args '
                                      '"T_max=1000" "eta_min=0e-0" --network_train_unet_only '
                                      '--max_grad_norm=0 --log_prefix=xl-loha')
    s, report = convert(doc)
    assert s.training.lr_scheduler_type == "CosineAnnealingLR"
    assert s.training.lr_scheduler_args == "T_max=1000 eta_min=0e-0"
    assert s.training.unet_only and s.training.max_grad_norm == 0
    assert report.mapped["--max_grad_norm"] == "training.max_grad_norm"
    assert "overrides" in report.not_applicable["max_grad_norm"]
    assert "log folder" in report.not_applicable["--log_prefix"]


def test_command_line_flags_keep_windows_paths_and_refuse_loose_words():
    assert command_line_flags(r'--vae "C:\models\vae.safetensors" --a=1 --b') == \
        {"vae": r"C:\models\vae.safetensors", "a": "1", "b": True}
    with pytest.raises(ValueError, match="does not belong"):
        command_line_flags("stray --a")
    _, report = convert({"additional_parameters": "stray"})
    assert "cannot be split" in report.rejected["additional_parameters"]


def test_network_args_flags_map_to_settings():
    s, report = convert({"additional_parameters": '--network_args "rank_dropout=0.2" '
                                                   '"loraplus_lr_ratio=16" "algo=loha"'})
    assert s.advanced.rank_dropout == 0.2 and s.advanced.loraplus_lr_ratio == 16
    assert s.advanced.network_type == "LoHa"
    assert report.mapped["--network_args algo"] == "advanced.network_type"


def test_kohya_ss_unset_markers_and_old_strings():
    s, report = convert({"max_timestep": 0, "min_timestep": False, "max_train_epochs": "0",
                         "epoch": "3", "stop_text_encoder_training_pct": 0, "caption_extension": "",
                         "shuffle_caption": "True", "learning_rate": "0.0002", "keep_tokens": "2",
                         "noise_offset": "0.1", "flip_aug": "false"})
    assert (s.advanced.max_timestep, s.advanced.min_timestep, s.images.epochs) == (1000, 0, 3)
    assert s.training.stop_text_encoder_training == 0 and s.labels.caption_extension == ".txt"
    assert s.labels.shuffle_caption and s.training.learning_rate == 2e-4 and s.labels.keep_tokens == 2
    assert s.advanced.noise_offset == 0.1 and not s.images.flip_aug
    assert {"max_timestep", "max_train_epochs", "caption_extension"} <= set(report.defaulted)


def test_max_train_epochs_wins_over_epoch_and_stop_te_percent_becomes_a_fraction():
    """kohya_ss lora_gui.py: stop_text_encoder_training is a percentage of max_train_steps
    (ceil(max_train_steps / 100 * pct)); ours below 1 is the same fraction of the total steps."""
    s, report = convert({"epoch": 8, "max_train_epochs": "16", "stop_text_encoder_training": 30,
                         "learning_rate_te": 1e-5, "text_encoder_lr": 5e-5})
    assert s.images.epochs == 16 and "wins" in report.not_applicable["epoch"]
    assert s.training.stop_text_encoder_training == pytest.approx(0.3)
    assert s.training.text_encoder_lr == 5e-5 and "wins" in report.not_applicable["learning_rate_te"]
    s, _ = convert({"stop_text_encoder_training": 100})
    assert s.training.stop_text_encoder_training == 0


def test_optimizer_names_and_dotted_paths():
    for name, expected in (("lion8bit", "Lion8bit"), ("PagedAdamW8bit", "PagedAdamW8bit"),
                           ("pytorch_optimizer.CAME", "pytorch_optimizer.CAME"),
                           ("adamwschedulefree", "AdamWScheduleFree")):
        s, _ = convert({"optimizer": name})
        assert s.training.optimizer == expected
    _, report = convert({"optimizer": "Sophia"})
    assert "not supported" in report.rejected["optimizer"]


def test_quoted_optimizer_args_as_kohya_ss_writes_them():
    """sd-scripts train_util.get_optimizer: key=value, value through ast.literal_eval."""
    s, _ = convert({"optimizer": "Prodigy", "optimizer_args":
                    '"decouple=True" "weight_decay=0.1" "betas=0.9,0.91"'})
    assert s.optimizer_kwargs == {"decouple": True, "weight_decay": 0.1, "betas": (0.9, 0.91)}


def test_use_wandb_and_lycoris_and_flux_types():
    s, report = convert({"use_wandb": True, "LoRA_type": "LyCORIS/LoHa", "conv_dim": 4})
    assert s.model.log_with == "wandb" and s.advanced.conv_dim == 4
    assert s.advanced.network_type == "LoHa" and report.mapped["LoRA_type"] == "advanced.network_type"
    s, report = convert({"LoRA_type": "Flux1", "flux1_checkbox": True})  # Flux landed (issue #14)
    assert report.mapped["LoRA_type"] == "advanced.network_type" and s.advanced.network_type == "LoRA"
    assert s.model.family == "flux"


def test_dreambooth_flux_file_keys_map_to_clip_l_and_t5xxl():
    """kohya_ss dreambooth_gui.py passes flux1_clip_l / flux1_t5xxl as sd-scripts' --clip_l /
    --t5xxl when flux1_checkbox is on (and they win over the SD3 tab's clip_l / t5xxl there); an
    empty one leaves clip_l / t5xxl as the file gives them."""
    s, report = convert({"flux1_checkbox": True, "flux1_clip_l": "/m/clip_l.safetensors",
                         "flux1_t5xxl": "/m/t5xxl_fp16.safetensors", "clip_l": "/other/clip.safetensors"})
    assert (s.model.clip_l, s.model.t5xxl) == ("/m/clip_l.safetensors", "/m/t5xxl_fp16.safetensors")
    assert report.mapped["flux1_clip_l"] == "model.clip_l" and "wins" in report.not_applicable["clip_l"]
    s, report = convert({"clip_l": "/m/c.safetensors", "flux1_clip_l": "", "flux1_t5xxl": ""})
    assert s.model.clip_l == "/m/c.safetensors" and s.model.t5xxl == ""
    assert report.mapped["clip_l"] == "model.clip_l" and "flux1_clip_l" in report.defaulted


def test_num_cpu_threads_per_process_becomes_an_accelerate_launch_flag():
    """kohya_ss class_accelerate_launch.py: --num_cpu_threads_per_process N on accelerate launch."""
    s, report = convert({"num_cpu_threads_per_process": 2})
    assert s.launch.extra_accelerate_launch_args == "--num_cpu_threads_per_process 2"
    assert report.mapped["num_cpu_threads_per_process"] == "launch.extra_accelerate_launch_args"
    s, _ = convert({"num_cpu_threads_per_process": 4, "extra_accelerate_launch_args": "--tee 3"})
    assert s.launch.extra_accelerate_launch_args == "--tee 3 --num_cpu_threads_per_process 4"
    s, report = convert({"num_cpu_threads_per_process": 4,
                         "extra_accelerate_launch_args": "--num_cpu_threads_per_process 8"})
    assert s.launch.extra_accelerate_launch_args == "--num_cpu_threads_per_process 8"
    assert "wins" in report.not_applicable["num_cpu_threads_per_process"]
    _, report = convert({"num_cpu_threads_per_process": "many"})
    assert "threads" in report.rejected["num_cpu_threads_per_process"]


def test_reasons_name_the_setting_a_user_reaches_for():
    """Keys without a setting say what to use instead, where there is something."""
    assert "down_lr_weight" in NOT_APPLICABLE["block_lr"]
    assert "log_tracker_config" in NOT_APPLICABLE["wandb_run_name"]
    for key in ("flux1_clip_l", "flux1_t5xxl", "num_cpu_threads_per_process"):
        assert key not in NOT_APPLICABLE
