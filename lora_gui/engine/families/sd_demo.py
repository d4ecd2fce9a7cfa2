"""The tiny random SD-1.x-shaped demo model (what ``engine.demo.build_demo`` writes for the SD
family): a diffusers folder and its single-file twin in the A1111/CompVis layout."""

from __future__ import annotations

from pathlib import Path

from lora_gui.engine.ldm_keys import to_single_file_state_dict

DEMO_MERGES = 2000  # BPE merges of the demo tokenizer: 512 + 2000 + 2 = 2514 tokens


def _tiny_components(seed: int):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_gui.engine.tokenizer import MAX_LENGTH, clip_tokenizer

    tokenizer = clip_tokenizer(DEMO_MERGES)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.5's training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, epsilon).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return tokenizer, text_encoder, unet, vae, scheduler


def write_tiny_sd(model_dir: Path, single_file: Path, seed: int) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    tokenizer, text_encoder, unet, vae, scheduler = _tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    state = to_single_file_state_dict(unet, vae, text_encoder)
    save_file(state, str(single_file), metadata={"format": "pt"})
