"""A tiny Flux.1-dev-shaped model with random weights, built offline in about a second.

What makes Flux Flux, at toy widths: a ``FluxTransformer2DModel`` with 2 double-stream and 2
single-stream blocks and the guidance embedding (the dev variant), a CLIP-L-like text encoder
(its pooled output), a T5 encoder (its hidden states) with a SentencePiece-style Unigram
tokenizer trained here on the demo's words, a 16-channel VAE with Flux's latent shift and scale
and no quant convs, and the flow-matching Euler scheduler with Flux's resolution-dependent shift.

Saved twice: as a diffusers folder (``FluxPipeline.save_pretrained``) and as the separate files
ComfyUI users keep - the transformer in the original layout, ``ae.safetensors``,
``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` - beside it.
"""

from __future__ import annotations

from pathlib import Path

from lora_gui.engine.families.sd_demo import DEMO_MERGES

CLIP_WIDTH, T5_WIDTH = 32, 32
HEADS, HEAD_DIM = 2, 16  # inner width 32; Flux: 24 x 128
ROPE_AXES = (4, 6, 6)  # sums to HEAD_DIM; Flux: (16, 56, 56)
SHIFT_FACTOR, SCALING_FACTOR = 0.1159, 0.3611  # the Flux VAE's latent normalisation
SEPARATE_FILES = ("ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors")

_WORDS = ("red green blue yellow purple white black grey circle square triangle shape shapes circles "
          "background large medium small demoshape blurry a an the of and with on in photo picture")


def t5_tokenizer():
    """A T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, Metaspace pre-tokenizer as T5's
    SentencePiece model) whose Unigram vocabulary is trained on the demo's words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    letters = " ".join("abcdefghijklmnopqrstuvwxyz0123456789,.")
    corpus = [_WORDS, letters] + [f"{a} {b}, {c} background" for a in _WORDS.split()[:8]
                                  for b in ("circle", "square", "triangle") for c in ("white", "black")]
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75, max_piece_length=12)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _encoders(clip_tok, t5_tok, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_gui.engine.tokenizer import MAX_LENGTH

    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=CLIP_WIDTH, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return clip, t5


def _transformer_and_vae(seed: int):
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True, axes_dims_rope=ROPE_AXES)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    return transformer, vae


def tiny_flux_pipeline(seed: int = 0):
    """A ``FluxPipeline`` of random tiny components (deterministic for a seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from lora_gui.engine.tokenizer import clip_tokenizer

    clip_tok, t5_tok = clip_tokenizer(DEMO_MERGES), t5_tokenizer()
    clip, t5 = _encoders(clip_tok, t5_tok, seed)
    transformer, vae = _transformer_and_vae(seed)
    # FLUX.1-dev's scheduler config (configs/flux-dev/scheduler): shift 3, resolution-dependent shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def write_tiny_flux(model_dir: Path, single_file: Path, seed: int = 0) -> None:
    """Save the tiny model as a diffusers folder, and the transformer (original layout) at
    ``single_file`` with ``ae``, ``clip_l`` and ``t5xxl_fp16`` safetensors beside it."""
    from safetensors.torch import save_file

    from lora_gui.engine.families.flux_convert import to_original
    from lora_gui.engine.ldm_keys import vae_to_ldm

    pipe = tiny_flux_pipeline(seed)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    cfg = pipe.transformer.config
    save_file(to_original(pipe.transformer.state_dict(), cfg.num_layers, cfg.num_single_layers),
              str(single_file), metadata={"format": "pt"})
    ae, clip_l, t5 = (single_file.parent / name for name in SEPARATE_FILES)
    save_file({k: v.contiguous() for k, v in vae_to_ldm(pipe.vae.state_dict()).items()}, str(ae))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()  # as ComfyUI's clip_l files
               for k, v in pipe.text_encoder.state_dict().items()}, str(clip_l))
    t5_state = {k: v.contiguous() for k, v in pipe.text_encoder_2.state_dict().items()
                if k != "encoder.embed_tokens.weight"}  # tied to shared.weight, as T5 files store it
    save_file(t5_state, str(t5))
