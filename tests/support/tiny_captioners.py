"""Tiny randomly initialised BLIP, Florence-2 and Qwen2-VL captioners for tests, built from their
transformers configs (tiny sizes) with a tiny word-level tokenizer built here (no download) and
written with ``save_pretrained``: the files a real release holds (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, the image processor's config), so
the code under test loads them like a downloaded folder.

The generation config asks for ``MIN_WORDS`` new tokens and suppresses the special tokens other
than the end, so a random model still writes words of ``WORDS`` (random ones).
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "blue", "red", "cat", "dog", "photo", "of", "the", "sky", "tree"]
MIN_WORDS, MAX_WORDS = 3, 5
FLORENCE_EXTRA = "What does the image describe?".split()
QWEN_EXTRA = ["user", "assistant", "Describe", "this", "image", "in", "one", "sentence"]
PLAIN_WORDS = {"blip": WORDS, "florence2": FLORENCE_EXTRA + WORDS, "qwen2vl": QWEN_EXTRA + WORDS}


def _tokenizer(specials: list[str], extra: list[str], **roles):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + extra + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles), vocab


def _save(model, folder: Path, suppress: list[int], *parts) -> Path:
    model.generation_config.min_new_tokens = MIN_WORDS
    model.generation_config.max_new_tokens = MAX_WORDS
    model.generation_config.suppress_tokens = suppress
    model.save_pretrained(folder)
    for part in parts:
        part.save_pretrained(folder)
    return folder


def build_blip(folder: Path) -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tokenizer, vocab = _tokenizer(specials, [], pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    size = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=5,
                                         pad_token_id=0, sep_token_id=3, eos_token_id=3, **size),
                        vision_config=dict(image_size=32, patch_size=8, **size), projection_dim=32)
    torch.manual_seed(0)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return _save(BlipForConditionalGeneration(config).eval(), folder, [0, 1, 2, 4, 5], processor)


def build_florence2(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tokenizer, vocab = _tokenizer(specials, FLORENCE_EXTRA, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    config = Florence2Config(
        text_config=dict(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                         decoder_ffn_dim=37, max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0, decoder_start_token_id=3, forced_bos_token_id=2, forced_eos_token_id=3),
        vision_config=dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                           patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 4), num_groups=(2, 4),
                           window_size=2, projection_dim=32, drop_path_rate=0.0),
        image_token_id=4)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                do_center_crop=False)
    with torch.no_grad():  # the processor writes one <image> token per image feature
        images.image_seq_length = model.get_image_features(torch.zeros(1, 3, 32, 32)).pooler_output.shape[1]
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer)
    return _save(model, folder, [0, 1, 4], processor)


def build_qwen2vl(folder: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<unk>"]
    tokenizer, vocab = _tokenizer(specials, QWEN_EXTRA,
                                  pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=specials[:7])
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    torch.manual_seed(0)
    images = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
    return _save(Qwen2VLForConditionalGeneration(config).eval(), folder, [0, 1, 3, 4, 5, 6, 7],
                 tokenizer, images)


BUILDERS = {"blip": build_blip, "florence2": build_florence2, "qwen2vl": build_qwen2vl}
