"""What each key of a kohya_ss GUI config (and each sd-scripts flag in its additional_parameters)
means here: a setting of ours, a setting another open issue adds, or not applicable with the reason.

These are declarative tables read by ``foreign.py``. Keys that are our own setting names map to
themselves and are not listed. Sources: bmaltais/kohya_ss ``kohya_gui/*.py`` (which config key
becomes which sd-scripts flag) and kohya-ss/sd-scripts ``library/train_util.py`` (the flags).
"""

from __future__ import annotations

# foreign key -> our field name.
ALIASES: dict[str, str] = {
    # model and folders
    "pretrained_model_name_or_path": "base_model", "train_data_dir": "img_folder",
    "reg_data_dir": "reg_img_folder", "output_dir": "output_folder", "change_output_name": "output_name",
    "save_model_as": "save_as", "no_metadata": "no_meta", "logging_dir": "log_dir",
    "network_weights": "lora_model_for_resume", "lora_network_weights": "lora_model_for_resume",
    "resume": "load_previous_save_state", "v_param": "v_parameterization",
    "sdxl": "family", "sdxl_checkbox": "family", "flux1_checkbox": "family",
    # Flux (kohya_ss's Flux.1 tab)
    "train_blocks": "flux_train_blocks", "t5xxl_max_token_len": "t5xxl_max_token_length",
    # kohya_ss's DreamBooth tab names the Flux CLIP-L and T5-XXL files so (dreambooth_gui.py passes
    # them as clip_l / t5xxl when flux1_checkbox is on)
    "flux1_clip_l": "clip_l", "flux1_t5xxl": "t5xxl",
    # images and length of the run
    "train_resolution": "resolution", "max_resolution": "resolution", "enable_bucket": "buckets",
    "min_bucket_reso": "min_bucket_resolution", "max_bucket_reso": "max_bucket_resolution",
    "num_epochs": "epochs", "epoch": "epochs", "max_train_epochs": "epochs",
    "max_train_steps": "max_steps",
    # training
    "network_train_unet_only": "unet_only", "network_train_text_encoder_only": "text_only",
    "learning_rate_te": "text_encoder_lr", "scheduler": "lr_scheduler",
    "cosine_restarts": "lr_scheduler_num_cycles", "scheduler_power": "lr_scheduler_power",
    "warmup_lr_ratio": "lr_warmup_steps", "optimizer_type": "optimizer", "net_dim": "network_dim",
    "alpha": "network_alpha", "train_batch_size": "batch_size",
    "gradient_acc_steps": "gradient_accumulation_steps", "max_data_loader_n_workers": "num_workers",
    "persistent_data_loader_workers": "persistent_workers",
    "stop_text_encoder_training_pct": "stop_text_encoder_training",
    # captions
    "shuffle_captions": "shuffle_caption", "max_clip_token_length": "max_token_length",
    "caption_extention": "caption_extension",
    # advanced
    "xformers": "attention", "conditioning_data_dir": "mask_folder", "alpha_mask": "masked_loss",
    "use_wandb": "log_with",
    # LyCORIS (lycoris.kohya's names; kohya_ss writes use_cp for use_tucker)
    "LyCORIS_preset": "lycoris_preset", "preset": "lycoris_preset", "use_cp": "use_tucker",
    "constraint": "constrain",
    # samples
    "sample_every_n_epoch": "sample_every_n_epochs",
}

# Keys whose value is read while converting others (they are reported with what they decided).
HELPERS = frozenset({"use_8bit_adam", "LoRA_type", "lr_warmup", "noise_offset_type",
                     "additional_parameters", "num_cpu_threads_per_process"})

# kohya_ss writes 0 for "not set" in these (it passes None to sd-scripts then): the default is kept.
ZERO_IS_UNSET = frozenset({"max_timestep", "max_train_epochs", "stop_text_encoder_training_pct"})
# ... and "" for these text settings (kohya_ss leaves them empty when a dataset_config TOML holds them).
EMPTY_IS_UNSET = frozenset({"caption_extension", "flux1_clip_l", "flux1_t5xxl"})

# foreign key -> the open issue that adds the setting (the value is kept out until it lands).
# Empty now: Flux (issue #14) and several GPUs (issue #15) have landed.
LATER: dict[str, str] = {}

_TI = "a textual-inversion key (kohya_ss's TI tab); lora-gui trains LoRAs"
_HF = "a Hugging Face upload key: lora-gui never uploads (copy the file where you want it)"
_GUI = "a kohya_ss GUI-only key (it is not passed to sd-scripts)"
_FINETUNE = ("a fine-tuning key (kohya_ss's fine-tune tab with a captions metadata file); lora-gui "
             "reads captions from the files next to the images")
_SD3 = "an SD3 key: no lora-gui issue plans SD3 training"
_MEMORY = "a memory hint of sd-scripts; lora-gui decides where the models live itself"

# foreign key -> why it has no setting here.
NOT_APPLICABLE: dict[str, str] = {
    **dict.fromkeys(("init_word", "num_vectors_per_token", "token_string", "template", "weights"), _TI),
    **dict.fromkeys(("huggingface_path_in_repo", "huggingface_repo_id", "huggingface_repo_type",
                     "huggingface_repo_visibility", "huggingface_token", "async_upload",
                     "resume_from_huggingface", "save_state_to_huggingface"), _HF),
    **dict.fromkeys(("model_list", "save_as_bool"), _GUI),
    **dict.fromkeys(("caption_metadata_filename", "latent_metadata_filename", "full_path",
                     "create_buckets", "create_caption", "image_folder", "train_dir",
                     "use_latent_files", "dataset_repeats", "train_text_encoder"), _FINETUNE),
    "block_lr": "sdxl_train.py's learning rate per U-Net block for full fine-tuning (kohya_ss's "
                "fine-tune tab); a LoRA's block-wise rates are down_lr_weight, mid_lr_weight and "
                "up_lr_weight",
    **dict.fromkeys(("sd3_checkbox", "sd3_cache_text_encoder_outputs",
                     "sd3_cache_text_encoder_outputs_to_disk", "sd3_fused_backward_pass",
                     "sd3_text_encoder_batch_size", "clip_g", "save_clip", "save_t5xxl"), _SD3),
    **dict.fromkeys(("highvram", "lowvram", "lowram"), _MEMORY),
    **dict.fromkeys(("double_blocks_to_swap", "single_blocks_to_swap",
                     "cpu_offload_checkpointing", "split_mode", "t5xxl_device"), _MEMORY),
    **dict.fromkeys(("flux1_cache_text_encoder_outputs", "flux1_cache_text_encoder_outputs_to_disk"),
                    "text-encoder outputs are cached (in memory, for the run) whenever the text "
                    "encoders are not trained and the captions do not change"),
    "t5xxl_dtype": "T5-XXL loads in the same precision as the rest of the Flux model here",
    "apply_t5_attn_mask": "lora-gui's Flux encodes the T5 prompt as diffusers' FluxPipeline does "
                          "(no attention mask), so that training and sampling agree",
    "flux_fused_backward_pass": "a full fine-tuning option of sd-scripts (the optimizer fused into the "
                                "backward pass); not available for LoRA training there either",
    "learning_rate_te1": "an SDXL DreamBooth key (a learning rate per SDXL text encoder for full "
                         "fine-tuning); a LoRA uses text_encoder_lr",
    "learning_rate_te2": "an SDXL DreamBooth key (a learning rate per SDXL text encoder for full "
                         "fine-tuning); a LoRA uses text_encoder_lr",
    "no_token_padding": "a DreamBooth fine-tuning key (train_db.py); LoRA training always pads",
    "full_fp16": "lora-gui keeps the LoRA weights in 32-bit and computes in mixed precision; "
                 "pure fp16 training is not offered",
    "full_bf16": "lora-gui keeps the LoRA weights in 32-bit and computes in mixed precision; "
                 "pure bf16 training is not offered",
    "mem_eff_attn": "sd-scripts' own memory-efficient attention: lora-gui's sdpa attention is "
                    "memory-efficient already",
    "mem_eff_save": "a memory-efficient save of full fine-tuned checkpoints; a LoRA file is small",
    "vae_batch_size": "lora-gui encodes the latent cache in batches it chooses itself",
    "skip_cache_check": "lora-gui always checks its latent cache (it is keyed by the image and the "
                        "settings that change the latents)",
    "disable_mmap_load_safetensors": "lora-gui reads safetensors files itself",
    "fused_backward_pass": "a full fine-tuning option of sd-scripts (Adafactor fused into the "
                           "backward pass); not available for LoRA training there either",
    "blockwise_fused_optimizers": "a full fine-tuning option of sd-scripts; not available for LoRA "
                                  "training there either",
    "fused_optimizer_groups": "a full fine-tuning option of sd-scripts; not available for LoRA "
                              "training there either",
    **dict.fromkeys(("dynamo_backend", "dynamo_mode", "dynamo_use_dynamic", "dynamo_use_fullgraph"),
                    "torch.compile (accelerate's dynamo options) is not offered: lora-gui's trainer "
                    "never hands its models to accelerate to compile"),
    "wandb_api_key": "an API key is a secret and lora-gui does not keep secrets in settings files: "
                     "run 'wandb login' once (offline logging needs no key)",
    "wandb_run_name": "the W&B run is named after the output name (the project is log_tracker_name); "
                      "a [wandb] name = ... in the log_tracker_config file names it otherwise",
    "network_module": "lora-gui picks the module from the network type (networks.lora for LoRA, "
                      "lycoris.kohya for the LyCORIS types)",
    "log_prefix": "lora-gui names the log folder after the run; use log_tracker_name for the tracker",
    "dataset_config": "a dataset_config TOML is not a setting here: import it in the Dataset tab or "
                      "with 'lora-gui dataset toml import FILE --out FOLDER', which lays its subsets "
                      "out as N_name folders and writes the matching settings",
    "train_on_input": "lycoris.kohya does not pass it on (only its ia3 preset sets it per layer)",
    "unit": "a DyLoRA key: DyLoRA is not among lora-gui's network types (LoRA, LoCon, LoHa, LoKr, "
            "IA3, GLoRA, Full, Diag-OFT, BOFT)",
    **dict.fromkeys(("conv_dims", "conv_alphas"),
                    "an old kohya_ss LyCORIS key that its GUI no longer passes to sd-scripts (conv_dim "
                    "and conv_alpha are read instead)"),
    "algo": "the LyCORIS algorithm comes from LoRA_type (lora-gui's network type)",
    "json_load_skip_list": "the skip-list is never loaded from a file (your current one is kept)",
    "sdxl_no_half_vae": "the VAE always computes in float32 here (the SDXL VAE overflows in fp16)",
    "sdxl_cache_text_encoder_outputs": "text-encoder outputs are cached whenever the text encoders "
                                       "are not trained and the captions do not change",
}
