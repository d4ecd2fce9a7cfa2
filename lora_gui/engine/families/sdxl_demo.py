"""A tiny SDXL-shaped model with random weights, built offline in about a second.

It has what makes SDXL SDXL, at toy widths: two text encoders (a CLIP-L-like ``CLIPTextModel``
and a bigG-like ``CLIPTextModelWithProjection`` whose pooled projection feeds the U-Net), the
``text_time`` addition embedding for the six size/crop numbers, an attention-free first block,
several transformer blocks per attention (the depth that SDXL's numbering must survive), the
SDXL VAE scaling factor and the SDXL scheduler. The two encoders have different widths, as
CLIP-L (768) and bigG (1280) do: single-file readers tell them apart by that.
"""

from __future__ import annotations

from pathlib import Path

from lora_gui.engine.families.sd_demo import DEMO_MERGES
from lora_gui.engine.families.sdxl_convert import to_sdxl_single_file_state_dict

TE1_WIDTH, TE2_WIDTH = 32, 64
TIME_EMBED_DIM = 8  # per size/crop number; SDXL uses 256
SCALING_FACTOR = 0.13025  # SDXL's VAE latent scale (SD 1.x: 0.18215)


def _text_encoders(tokenizer, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_gui.engine.tokenizer import MAX_LENGTH

    common = dict(
        vocab_size=len(tokenizer),
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(
        CLIPTextConfig(hidden_size=TE1_WIDTH, intermediate_size=2 * TE1_WIDTH, hidden_act="quick_gelu",
                       projection_dim=TE1_WIDTH, **common)
    )
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=TE2_WIDTH, intermediate_size=2 * TE2_WIDTH, hidden_act="gelu",
                       projection_dim=TE2_WIDTH, **common)
    )
    return te1, te2


def _unet_and_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TE2_WIDTH + 6 * TIME_EMBED_DIM,
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
        scaling_factor=SCALING_FACTOR,
        force_upcast=True,
    )
    return unet, vae


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of random tiny components (deterministic for a seed)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from lora_gui.engine.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer(DEMO_MERGES)
    tokenizer_2 = clip_tokenizer(DEMO_MERGES, pad_token="!")  # SDXL's second tokenizer pads with "!"
    te1, te2 = _text_encoders(tokenizer, seed)
    unet, vae = _unet_and_vae(seed)
    # SDXL base 1.0's scheduler (configs/sdxl/scheduler): scaled-linear betas, epsilon, "leading".
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def write_tiny_sdxl(model_dir: Path, single_file: Path, seed: int = 0) -> None:
    """Save the tiny model as a diffusers folder and as an SDXL single file (SGM layout)."""
    from safetensors.torch import save_file

    pipe = tiny_sdxl_pipeline(seed)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    state = to_sdxl_single_file_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    save_file(state, str(single_file), metadata={"format": "pt"})
