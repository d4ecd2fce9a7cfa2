"""The kohya parity settings: sd-scripts' defaults, their checks (sd-scripts' verify_training_args and
friends) as sentences naming the field, and the value formats kohya uses."""

from __future__ import annotations

import pytest

from lora_gui.settings import TrainingSettings, io
from lora_gui.settings.errors import SettingsError
from lora_gui.settings.schema import LR_SCHEDULERS, OPTIMIZERS, parse_optimizer_args

# setting -> default, from sd-scripts' argparse defaults (train_util.py, train_network.py,
# custom_train_functions.py) or, where sd-scripts' default is None ("off"), kohya_ss's GUI value
# for off (0, "" or False).
DEFAULTS = {
    "min_timestep": 0, "max_timestep": 1000, "loss_type": "l2", "huber_schedule": "snr",
    "huber_c": 0.1, "huber_scale": 1.0, "scale_v_pred_loss_like_noise_pred": False,
    "v_pred_like_loss": 0.0, "debiased_estimation_loss": False, "zero_terminal_snr": False,
    "ip_noise_gamma": 0.0, "ip_noise_gamma_random_strength": False,
    "noise_offset_random_strength": False, "adaptive_noise_scale": 0.0, "masked_loss": False,
    "keep_tokens_separator": "", "secondary_separator": "", "caption_prefix": "",
    "caption_suffix": "", "enable_wildcard": False, "weighted_captions": False,
    "token_warmup_min": 1, "token_warmup_step": 0, "down_lr_weight": "", "mid_lr_weight": "",
    "up_lr_weight": "", "block_lr_zero_threshold": 0.0, "block_dims": "", "block_alphas": "",
    "conv_block_dims": "", "conv_block_alphas": "", "scale_weight_norms": 0.0,
    "loraplus_lr_ratio": 0.0, "loraplus_unet_lr_ratio": 0.0, "loraplus_text_encoder_lr_ratio": 0.0,
    "stop_text_encoder_training": 0, "dim_from_weights": False, "rank_dropout": 0.0,
    "module_dropout": 0.0, "save_every_n_steps": 0, "save_last_n_steps": 0,
    "save_last_n_steps_state": 0, "save_last_n_epochs": 0, "save_last_n_epochs_state": 0,
    "save_state_on_train_end": False, "metadata_title": "", "metadata_author": "",
    "metadata_description": "", "metadata_license": "", "metadata_tags": "",
    "log_tracker_name": "", "log_tracker_config": "", "log_config": False,
    "lr_scheduler_type": "", "lr_scheduler_args": "",
}


def test_every_parity_option_is_declared_with_kohyas_default():
    s = TrainingSettings()
    for name, default in DEFAULTS.items():
        assert s.get(name) == default, name


def test_kohya_ss_dropdowns_are_choices():
    """kohya_ss class_basic_training.py: its optimizer and scheduler dropdowns (the dotted entries
    are accepted as class paths)."""
    assert {"AdamW", "AdamWScheduleFree", "AdamW8bit", "Adafactor", "DAdaptation", "DAdaptAdaGrad",
            "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptAdamPreprint", "DAdaptLion",
            "DAdaptSGD", "Lion", "Lion8bit", "PagedAdamW8bit", "PagedAdamW32bit", "PagedLion8bit",
            "Prodigy", "RAdamScheduleFree", "SGDNesterov", "SGDNesterov8bit",
            "SGDScheduleFree"} <= set(OPTIMIZERS)
    assert {"adafactor", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
            "linear", "piecewise_constant", "polynomial", "cosine_with_min_lr", "inverse_sqrt",
            "warmup_stable_decay"} == set(LR_SCHEDULERS)
    for dotted in ("bitsandbytes.optim.AdEMAMix8bit", "pytorch_optimizer.CAME",
                   "prodigyplus.ProdigyPlusScheduleFree"):
        assert io.validate_document({"training": {"optimizer": dotted}}).training.optimizer == dotted
    assert io.validate_document({"training": {"optimizer": "adamw8bit"}}).training.optimizer == \
        "AdamW8bit"


def _issues(doc: dict) -> dict[str, str]:
    with pytest.raises(SettingsError) as info:
        io.validate_document(doc)
    return {i.path: i.message for i in info.value.issues}


@pytest.mark.parametrize(("doc", "path", "words"), [
    # train_util.verify_training_args
    ({"advanced": {"adaptive_noise_scale": 0.01}}, "advanced.adaptive_noise_scale", "noise offset"),
    ({"advanced": {"scale_v_pred_loss_like_noise_pred": True}},
     "advanced.scale_v_pred_loss_like_noise_pred", "v_parameterization"),
    ({"model": {"v_parameterization": True}, "advanced": {"v_pred_like_loss": 0.1}},
     "advanced.v_pred_like_loss", "v_parameterization"),
    # train_util.get_timesteps draws from [min, max)
    ({"advanced": {"min_timestep": 600, "max_timestep": 500}}, "advanced.min_timestep", "max"),
    # train_util.get_huber_threshold_if_needed: -log(huber_c) for the exponential schedule
    ({"advanced": {"huber_c": 0}}, "advanced.huber_c", "above 0"),
    # train_network.py: dim_from_weights needs network_weights
    ({"advanced": {"dim_from_weights": True}}, "advanced.dim_from_weights", "Start from LoRA"),
    # get_scheduler_fix: a custom scheduler class takes no warm-up
    ({"training": {"lr_scheduler_type": "CosineAnnealingLR", "lr_warmup_steps": 10,
                   "lr_scheduler": "constant_with_warmup"}}, "training.lr_warmup_steps", "warm-up"),
    ({"training": {"lr_scheduler": "piecewise_constant"}}, "training.lr_scheduler_args", "step_rules"),
    # networks/lora.py get_block_dims_and_alphas: 25 blocks for SD 1.x/2.x
    ({"advanced": {"block_dims": "4,4,4"}}, "advanced.block_dims", "25"),
    ({"advanced": {"down_lr_weight": ",".join(["1"] * 13)}}, "advanced.down_lr_weight", "1 to 12"),
    ({"advanced": {"up_lr_weight": "wave"}}, "advanced.up_lr_weight", "numbers"),
    ({"training": {"optimizer": "Sophia"}}, "training.optimizer", "dotted class path"),
    ({"training": {"lr_scheduler_type": "torch optim"}}, "training.lr_scheduler_type", "class name"),
])
def test_sd_scripts_checks_name_the_field(doc, path, words):
    issues = _issues(doc)
    assert path in issues and words in issues[path], issues


def test_valid_block_values_and_presets():
    s = io.validate_document({"advanced": {
        "down_lr_weight": "cosine+0.25", "mid_lr_weight": "0.5", "up_lr_weight": "0, 0, 1",
        "block_dims": ", ".join(["8"] * 25), "block_alphas": ",".join(["4.5"] * 25)}})
    assert s.advanced.up_lr_weight == "0,0,1" and s.advanced.block_dims == ",".join(["8"] * 25)
    assert s.advanced.down_lr_weight == "cosine+0.25"


def test_optimizer_args_parse_like_sd_scripts_literal_eval():
    """train_util.get_optimizer: key, value = arg.split("="); value = ast.literal_eval(value)."""
    assert parse_optimizer_args('"betas=0.9,0.99" "eps=1e-8" "decouple=True" "d0=None"') == \
        {"betas": (0.9, 0.99), "eps": 1e-8, "decouple": True, "d0": None}
    with pytest.raises(ValueError, match="key=value"):
        parse_optimizer_args("weight_decay")
