"""safetensors metadata of a saved LoRA: kohya's ss_* keys and the ModelSpec keys (all strings).

A1111, ComfyUI and the additional-networks extension read these; ``sshs_model_hash`` lets them
index the file without hashing it again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from lora_gui.settings import TrainingSettings

NETWORK_MODULE = "networks.lora"


@dataclass
class RunFacts:
    """What the engine learned while setting up a run (filled in once)."""

    versions: dict  # the family's ss_v2, ss_base_model_version and modelspec.architecture
    base_model_name: str
    num_train_images: int
    num_reg_images: int
    num_epochs: int
    max_train_steps: int
    tag_frequency: dict
    dataset_dirs: dict
    bucket_info: dict
    session_id: str
    started_at: float
    network_alpha: float  # the alpha actually in the tensors (a start-from LoRA's alpha wins)


def _s(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    return str(value)


def network_args(s: TrainingSettings) -> dict[str, str]:
    args = {}
    if s.advanced.conv_dim > 0:
        args.update(conv_dim=str(s.advanced.conv_dim), conv_alpha=str(s.advanced.conv_alpha))
    if s.advanced.network_dropout > 0:
        args["dropout"] = str(s.advanced.network_dropout)
    return args


def network_metadata(s: TrainingSettings) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args): kohya's networks.lora, or lycoris.kohya with its algo."""
    from lora_gui.engine.network_lycoris import NETWORK_MODULE as LYCORIS_MODULE
    from lora_gui.engine.network_lycoris import LycorisSpec, uses_lycoris

    if uses_lycoris(s):
        return LYCORIS_MODULE, LycorisSpec.from_settings(s).network_args()
    return NETWORK_MODULE, network_args(s)


def build_metadata(s: TrainingSettings, facts: RunFacts, *, epoch: int, step: int,
                   final: bool) -> dict[str, str]:
    m, tr, img, lab, adv = s.model, s.training, s.images, s.labels, s.advanced
    module, args = network_metadata(s)
    minimal = {
        "ss_network_module": module,
        "ss_network_dim": _s(tr.network_dim),
        "ss_network_alpha": _s(facts.network_alpha),
        "ss_network_args": json.dumps(args) if args else "None",
        "ss_v2": facts.versions["ss_v2"],
        "ss_base_model_version": facts.versions["ss_base_model_version"],
    }
    if m.no_meta:
        return minimal
    w, h = img.resolution_wh
    now = time.time()
    full = {
        **minimal,
        "ss_output_name": m.output_name,
        "ss_sd_model_name": facts.base_model_name,
        "ss_session_id": facts.session_id,
        "ss_training_started_at": _s(facts.started_at),
        "ss_training_finished_at": _s(now) if final else "None",
        "ss_training_comment": m.training_comment or "None",
        "ss_learning_rate": _s(tr.learning_rate),
        "ss_unet_lr": _s(s.effective_unet_lr),
        "ss_text_encoder_lr": _s(s.effective_text_encoder_lr),
        "ss_num_train_images": _s(facts.num_train_images),
        "ss_num_reg_images": _s(facts.num_reg_images),
        "ss_num_epochs": _s(facts.num_epochs),
        "ss_epoch": _s(epoch),
        "ss_steps": _s(step),
        "ss_max_train_steps": _s(facts.max_train_steps),
        "ss_lr_scheduler": tr.lr_scheduler,
        "ss_lr_warmup_steps": _s(tr.lr_warmup_steps),
        "ss_optimizer": tr.optimizer + (f"({tr.optimizer_args})" if tr.optimizer_args else ""),
        "ss_seed": _s(tr.seed),
        "ss_clip_skip": _s(tr.clip_skip),
        "ss_max_token_length": _s(lab.max_token_length),
        "ss_mixed_precision": tr.mixed_precision,
        "ss_full_fp16": "False",
        "ss_gradient_checkpointing": _s(tr.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(tr.gradient_accumulation_steps),
        "ss_batch_size_per_device": _s(tr.batch_size),
        "ss_max_grad_norm": _s(tr.max_grad_norm),
        "ss_resolution": f"({w}, {h})",
        "ss_enable_bucket": _s(img.buckets),
        "ss_min_bucket_reso": _s(img.min_bucket_resolution),
        "ss_max_bucket_reso": _s(img.max_bucket_resolution),
        "ss_bucket_no_upscale": _s(img.bucket_no_upscale),
        "ss_cache_latents": _s(img.cache_latents),
        "ss_flip_aug": _s(img.flip_aug),
        "ss_color_aug": _s(img.color_aug),
        "ss_random_crop": _s(img.random_crop),
        "ss_shuffle_caption": _s(lab.shuffle_caption),
        "ss_keep_tokens": _s(lab.keep_tokens),
        "ss_caption_dropout_rate": _s(lab.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(lab.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _s(lab.caption_tag_dropout_rate),
        "ss_noise_offset": _s(adv.noise_offset),
        "ss_multires_noise_iterations": _s(adv.multires_noise_iterations),
        "ss_multires_noise_discount": _s(adv.multires_noise_discount),
        "ss_min_snr_gamma": _s(adv.min_snr_gamma),
        "ss_prior_loss_weight": _s(adv.prior_loss_weight),
        "ss_network_dropout": _s(adv.network_dropout),
        "ss_v_parameterization": _s(m.v_parameterization),
        "ss_tag_frequency": json.dumps(facts.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs, ensure_ascii=False),
        "ss_bucket_info": json.dumps(facts.bucket_info),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": facts.versions["modelspec.architecture"],
        "modelspec.implementation": "diffusers",
        "modelspec.title": m.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        # The objective trained, not the base's family: an SD 1.x base trained with v-prediction is "v".
        "modelspec.prediction_type": "v" if m.v_parameterization else "epsilon",
    }
    if s.triggers.trigger_words.strip():
        full["modelspec.trigger_phrase"] = s.triggers.trigger_words.strip()
    return full


def with_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    from lora_gui.engine.network import addnet_hash, addnet_legacy_hash

    return {**metadata, "sshs_model_hash": addnet_hash(tensors, metadata),
            "sshs_legacy_hash": addnet_legacy_hash(tensors, metadata)}


def base_model_name(path: str) -> str:
    return Path(path).name or str(path)
