"""safetensors metadata of a saved LoRA: kohya's ss_* keys and the ModelSpec keys (all strings).

A1111, ComfyUI and the additional-networks extension read these; ``sshs_model_hash`` lets them
index the file without hashing it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.settings import TrainingSettings

NETWORK_MODULE = "networks.lora"


@dataclass
class RunFacts:
    """What the engine learned while setting up a run (filled in once)."""

    versions: dict  # the family's ss_v2, ss_base_model_version and modelspec.architecture
    base_model_name: str
    num_train_images: int  # images x repeats (sd-scripts' num_train_images), without held-out ones
    num_reg_images: int  # images x repeats of the regularisation folders
    num_epochs: int
    max_train_steps: int
    tag_frequency: dict
    dataset_dirs: dict
    bucket_info: dict | None  # None when bucketing is off (sd-scripts writes "null")
    session_id: str
    started_at: float
    network_alpha: float  # the alpha actually in the tensors (a start-from LoRA's alpha wins)
    reg_dataset_dirs: dict = field(default_factory=dict)
    num_batches_per_epoch: int = 0
    total_batch_size: int = 0
    num_validation_images: int = 0
    file_hashes: dict = field(default_factory=dict)  # ss_sd_model_hash, ss_vae_name, ...
    optimizer: str = ""  # ss_optimizer as get_optimizer names it (optim.optimizer_record)


def _s(value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return "None"
    return str(value)


# --- the facts ------------------------------------------------------------------------------------

def gather_facts(t) -> RunFacts:
    """The facts of a set-up trainer ``t`` (its dataset, plan, model and accelerator)."""
    from lora_gui.engine.optim import optimizer_record

    s, info, data = t.settings, t.info, t.dataset
    held_out = set(getattr(data, "held_out", ()))
    processes = t.acc.num_processes
    return RunFacts(
        versions=t.family.metadata_versions(t.model, s), base_model_name=base_model_name(s.model.base_model),
        num_train_images=len(data.train_items),
        num_reg_images=sum(len(sub.images) * sub.repeats for sub in info.reg_subsets),
        num_epochs=t.plan.epochs, max_train_steps=t.plan.total_steps,
        tag_frequency=kohya_tag_frequency(info), dataset_dirs=dataset_dirs(info, False, held_out),
        reg_dataset_dirs=dataset_dirs(info, True, held_out),
        bucket_info=bucket_info(data) if s.images.buckets else None,
        session_id=uuid.uuid4().hex[:16], started_at=t.t_start, network_alpha=t.network_alpha,
        num_batches_per_epoch=math.ceil(t.plan.batches_per_epoch / processes),
        total_batch_size=s.effective_batch_size(processes), num_validation_images=len(held_out),
        # Only the main process saves, so only it reads the base model file through for its hash.
        file_hashes=model_file_hashes(s.model.base_model, s.model.vae) if t.is_main else {},
        optimizer=optimizer_record(s))


def kohya_tag_frequency(info) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency`` as sd-scripts train_util.BaseDataset.set_tag_frequency counts it: per
    folder name, each image's caption split at commas, stripped and lower-cased, counted once per
    image (repeats do not count); regularisation folders included."""
    result: dict[str, dict[str, int]] = {}
    for subset in info.subsets:
        counts = Counter(result.get(subset.name, {}))
        for image in subset.images:
            counts.update(tag.strip().lower() for tag in subset.caption_for(image).split(",")
                          if tag.strip())
        result[subset.name] = dict(counts)
    return result


def dataset_dirs(info, reg: bool, held_out: set) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs`` (training folders) or ``ss_reg_dataset_dirs`` (regularisation folders):
    {folder name: {"n_repeats", "img_count"}} as train_network.py writes them."""
    return {sub.name: {"n_repeats": sub.repeats,
                       "img_count": sum(1 for i in sub.images if i.path not in held_out)}
            for sub in info.subsets if sub.is_reg == reg}


def bucket_info(data) -> dict:
    """``ss_bucket_info`` in sd-scripts' structure (train_util.BaseDataset.make_buckets):
    {"buckets": {index: {"resolution": [w, h], "count": samples incl. repeats}},
    "mean_img_ar_error": mean over the images (without repeats) of |bucket w/h - image w/h|}.
    The index counts the used buckets in sorted order, as sd-scripts' BucketManager.sort does."""
    counts = data.bucket_counts()
    buckets = {i: {"resolution": [w, h], "count": counts[(w, h)]}
               for i, (w, h) in enumerate(sorted(counts))}
    sizes = {i.path: (i.width, i.height) for sub in data.info.subsets for i in sub.images}
    errors = [abs(b[0] / b[1] - sizes[path][0] / sizes[path][1])
              for path, b in {item.path: item.bucket
                              for item in data.train_items + data.reg_items}.items()]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def model_hash(path: Path) -> str:
    """sd-scripts train_util.model_hash (A1111's old model hash): sha256 of the 64 KiB at 1 MiB,
    first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: Path) -> str:
    """sd-scripts train_util.calculate_sha256 (A1111's new hash, what Civitai links by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_file_hashes(base_model: str, vae: str) -> dict[str, str]:
    """ss_sd_model_hash/ss_new_sd_model_hash of the base model file and ss_vae_name/ss_vae_hash/
    ss_new_vae_hash of a replacement VAE, as train_network.py writes them. A diffusers folder has
    no file hash (sd-scripts would write "IsADirectory"): the keys are left out then."""
    out: dict[str, str] = {}
    for prefix, value in (("sd_model", base_model), ("vae", vae)):
        path = Path(value).expanduser() if value.strip() else None
        if prefix == "vae" and path is not None:
            out["ss_vae_name"] = path.name
        if path is not None and path.is_file():
            out[f"ss_{prefix}_hash"] = model_hash(path)
            out[f"ss_new_{prefix}_hash"] = sha256_file(path)
    return out


# --- the metadata ---------------------------------------------------------------------------------

def network_args(s: TrainingSettings) -> dict[str, str]:
    """``ss_network_args``: the networks.lora keyword arguments kohya_ss passes as --network_args
    (the dropout of ``network_dropout`` is its own flag, recorded as ss_network_dropout)."""
    adv = s.advanced
    args: dict[str, str] = {}
    if adv.conv_dim > 0:
        args.update(conv_dim=str(adv.conv_dim), conv_alpha=str(adv.conv_alpha))
    for name in ("rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                 "loraplus_text_encoder_lr_ratio"):
        if getattr(adv, name) > 0:
            args[name] = str(getattr(adv, name))
    for name in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas",
                 "conv_block_dims", "conv_block_alphas"):
        if getattr(adv, name):
            args[name] = getattr(adv, name)
    if adv.block_lr_zero_threshold and any(args.get(n) for n in ("down_lr_weight", "mid_lr_weight",
                                                                  "up_lr_weight")):
        args["block_lr_zero_threshold"] = str(adv.block_lr_zero_threshold)
    return args


def network_metadata(s: TrainingSettings) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args): kohya's networks.lora, or lycoris.kohya with its algo."""
    from lora_gui.engine.network_lycoris import NETWORK_MODULE as LYCORIS_MODULE
    from lora_gui.engine.network_lycoris import LycorisSpec, uses_lycoris

    if uses_lycoris(s):
        return LYCORIS_MODULE, LycorisSpec.from_settings(s).network_args()
    return NETWORK_MODULE, network_args(s)


def minimal_metadata(s: TrainingSettings, facts: RunFacts) -> dict[str, str]:
    """sd-scripts' SS_METADATA_MINIMUM_KEYS: what ``no_meta`` keeps (plus ModelSpec and hashes)."""
    module, args = network_metadata(s)
    minimal = {
        "ss_network_module": module,
        "ss_network_dim": _s(s.training.network_dim),
        "ss_network_alpha": _s(facts.network_alpha),
        "ss_v2": facts.versions["ss_v2"],
        "ss_base_model_version": facts.versions["ss_base_model_version"],
    }
    if args:  # train_network.py writes the key only when there are network args
        minimal["ss_network_args"] = json.dumps(args)
    return minimal


def modelspec(s: TrainingSettings, facts: RunFacts, now: float) -> dict[str, str]:
    """The ModelSpec 1.0.1 keys as sd-scripts' get_sai_model_spec fills them for a LoRA."""
    m, adv = s.model, s.advanced
    w, h = s.images.resolution_wh
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": facts.versions["modelspec.architecture"],
        "modelspec.implementation": "diffusers",
        "modelspec.title": m.metadata_title or m.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        # The objective trained, not the base's family: an SD 1.x base trained with v-prediction is "v".
        "modelspec.prediction_type": "v" if m.v_parameterization else "epsilon",
        "modelspec.encoder_layer": str(s.training.clip_skip),
    }
    for name in ("author", "description", "license", "tags"):
        if getattr(m, f"metadata_{name}").strip():
            spec[f"modelspec.{name}"] = getattr(m, f"metadata_{name}").strip()
    if (adv.min_timestep, adv.max_timestep) != (0, 1000):
        spec["modelspec.timestep_range"] = f"{adv.min_timestep},{adv.max_timestep}"
    if s.triggers.trigger_words.strip():
        spec["modelspec.trigger_phrase"] = s.triggers.trigger_words.strip()
    return spec


def build_metadata(s: TrainingSettings, facts: RunFacts, *, epoch: int, step: int,
                   final: bool) -> dict[str, str]:
    """Every save's metadata (``final`` is kept for callers; every save records its finish time, as
    train_network.py's save_model does)."""
    now = time.time()
    if s.model.no_meta:
        return {**minimal_metadata(s, facts), **modelspec(s, facts, now)}
    return {**minimal_metadata(s, facts), **_run_record(s, facts, epoch, step, now),
            **_settings_record(s), **({"ss_optimizer": facts.optimizer} if facts.optimizer else {}),
            **_dataset_record(s, facts), **facts.file_hashes,
            **modelspec(s, facts, now)}


def _run_record(s: TrainingSettings, facts: RunFacts, epoch: int, step: int, now: float) -> dict:
    m, tr = s.model, s.training
    return {
        "ss_output_name": m.output_name,
        "ss_sd_model_name": facts.base_model_name,
        "ss_session_id": facts.session_id,
        "ss_training_started_at": _s(facts.started_at),
        "ss_training_finished_at": _s(now),
        "ss_training_comment": m.training_comment or "None",
        "ss_num_train_images": _s(facts.num_train_images),
        "ss_num_reg_images": _s(facts.num_reg_images),
        "ss_num_validation_images": _s(facts.num_validation_images),
        "ss_num_batches_per_epoch": _s(facts.num_batches_per_epoch),
        "ss_num_epochs": _s(facts.num_epochs),
        "ss_epoch": _s(epoch),
        "ss_steps": _s(step),
        "ss_max_train_steps": _s(facts.max_train_steps),
        "ss_batch_size_per_device": _s(tr.batch_size),
        "ss_total_batch_size": _s(facts.total_batch_size),
        "ss_v_parameterization": _s(m.v_parameterization),
    }


def _settings_record(s: TrainingSettings) -> dict:
    tr, lab, adv = s.training, s.labels, s.advanced
    return {
        "ss_learning_rate": _s(tr.learning_rate),
        "ss_unet_lr": _s(s.effective_unet_lr),
        "ss_text_encoder_lr": _s(s.effective_text_encoder_lr),
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
        "ss_max_grad_norm": _s(tr.max_grad_norm),
        "ss_validation_split": _s(tr.validation_split),
        "ss_caption_dropout_rate": _s(lab.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(lab.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _s(lab.caption_tag_dropout_rate),
        "ss_noise_offset": _s(adv.noise_offset),
        "ss_noise_offset_random_strength": _s(adv.noise_offset_random_strength),
        "ss_adaptive_noise_scale": _s(adv.adaptive_noise_scale or None),
        "ss_multires_noise_iterations": _s(adv.multires_noise_iterations),
        "ss_multires_noise_discount": _s(adv.multires_noise_discount),
        "ss_ip_noise_gamma": _s(adv.ip_noise_gamma or None),
        "ss_ip_noise_gamma_random_strength": _s(adv.ip_noise_gamma_random_strength),
        "ss_zero_terminal_snr": _s(adv.zero_terminal_snr),
        "ss_min_snr_gamma": _s(adv.min_snr_gamma),
        "ss_debiased_estimation": _s(adv.debiased_estimation_loss),
        "ss_loss_type": adv.loss_type,
        "ss_huber_schedule": adv.huber_schedule,
        "ss_huber_c": _s(adv.huber_c),
        "ss_huber_scale": _s(adv.huber_scale),
        "ss_prior_loss_weight": _s(adv.prior_loss_weight),
        "ss_network_dropout": _s(adv.network_dropout),
        "ss_scale_weight_norms": _s(adv.scale_weight_norms or None),
    }


def _dataset_record(s: TrainingSettings, facts: RunFacts) -> dict:
    img, lab = s.images, s.labels
    w, h = img.resolution_wh
    return {
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
        "ss_tag_frequency": json.dumps(facts.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs, ensure_ascii=False),
        "ss_bucket_info": json.dumps(facts.bucket_info),
    }


def with_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    from lora_gui.engine.network import addnet_hash, addnet_legacy_hash

    return {**metadata, "sshs_model_hash": addnet_hash(tensors, metadata),
            "sshs_legacy_hash": addnet_legacy_hash(tensors, metadata)}


def base_model_name(path: str) -> str:
    return Path(path).name or str(path)
