"""SDXL conditioning: the six size/crop numbers of a flipped, randomly cropped, bucketed image
against numbers computed by hand; the text conditioning against diffusers' SDXL pipeline."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from lora_gui.dataset.scan import scan_dataset
from lora_gui.engine.data import TrainDataset
from lora_gui.engine.families.sdxl_condition import encode_sdxl, time_ids
from tests.test_data import SMALL, data_options, make_image

torch.set_num_threads(1)


def test_size_and_crop_of_a_flipped_randomly_cropped_bucketed_image(tmp_path):
    # 330x100 (aspect 3.3) is nearest the (192, 64) bucket (|ln 3.3 - ln 3| = 0.095 < |ln 3.3 - ln 4|
    # = 0.192). Covering 192x64 scales by max(192/330, 64/100) = 0.64 to round(211.2) x 64 = 211x64:
    # 19 columns are cut, none of the rows; a random crop at x-position fx cuts int(fx * 20) columns
    # on the left, and a flip turns the cut on the right (19 - left) into the cut on the left.
    src = make_image(tmp_path / "data" / "1_wide" / "wide.png", (330, 100))
    info = scan_dataset(tmp_path / "data", repeats=1)
    dataset = TrainDataset(info, data_options(**SMALL, flip_aug=True, random_crop=True, batch_size=1))
    item = dataset.train_items[0]
    assert item.bucket == (192, 64) and item.size == (330, 100)
    seen = set()
    for epoch in range(40):
        draw = dataset._draw(item, epoch, 0, 0)
        batch = dataset.load_batch([item], epoch, 0)
        left = min(19, int(draw.crop_position[0] * 20))
        expected_left = 19 - left if draw.flip else left
        ids = time_ids(batch.original_sizes, batch.crop_top_lefts, batch.bucket)
        assert ids.tolist() == [[100.0, 330.0, 0.0, float(expected_left), 64.0, 192.0]]
        # ... and the reported crop is the real one: the pixels are that window of the resized image.
        resized = Image.open(src).convert("RGB").resize((211, 64), Image.Resampling.LANCZOS)
        window = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if draw.flip else resized
        window = window.crop((expected_left, 0, expected_left + 192, 64))
        expected = np.asarray(window, dtype=np.float32).transpose(2, 0, 1) / 255.0 * 2.0 - 1.0
        assert np.allclose(batch.pixels[0].numpy(), expected, atol=1e-6)
        seen.add((draw.flip, expected_left))
        if len({flip for flip, _ in seen}) == 2 and len(seen) >= 4:
            break
    assert {flip for flip, _ in seen} == {False, True}  # both cases were checked


def test_validation_batches_report_the_centre_crop(tmp_path):
    make_image(tmp_path / "data" / "1_tall" / "tall.png", (100, 250))  # -> bucket (64, 192)
    info = scan_dataset(tmp_path / "data", repeats=1)
    dataset = TrainDataset(info, data_options(**SMALL, flip_aug=True, random_crop=True, batch_size=1))
    item = dataset.train_items[0]
    assert item.bucket == (64, 192)
    # scale max(64/100, 192/250) = 0.768 -> 77 x 192; centre crop cuts (77 - 64) // 2 = 6 columns.
    batch = dataset.load_batch([item], augment=False)
    assert time_ids(batch.original_sizes, batch.crop_top_lefts, batch.bucket).tolist() == [
        [250.0, 100.0, 0.0, 6.0, 192.0, 64.0]
    ]


@functools.lru_cache(maxsize=1)
def _tiny_pipe():
    from lora_gui.engine.families.sdxl_demo import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=3)


def test_text_conditioning_equals_diffusers_sdxl_pipeline():
    pipe = _tiny_pipe()
    prompts = ["red circle, blue background", "a green square"]
    with torch.no_grad():
        states, pooled = encode_sdxl((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                     prompts)
        ref_states, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert states.shape == (2, 77, 32 + 64) and pooled.shape == (2, 64)
    assert torch.equal(states, ref_states) and torch.equal(pooled, ref_pooled)


@pytest.mark.parametrize("max_tokens,chunks", [(75, 1), (150, 2), (225, 3)])
def test_long_captions_are_encoded_in_chunks_by_both_encoders(max_tokens, chunks):
    pipe = _tiny_pipe()
    caption = ", ".join(f"tag{i}" for i in range(120))  # well over 225 tokens
    with torch.no_grad():
        states, pooled = encode_sdxl((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                                     [caption, "short"], max_token_length=max_tokens)
        first, first_pooled = encode_sdxl((pipe.tokenizer, pipe.tokenizer_2),
                                          (pipe.text_encoder, pipe.text_encoder_2), [caption, "short"])
    assert states.shape == (2, 77 if chunks == 1 else 75 * chunks + 2, 96)  # sd-scripts: 75n+2
    # BOS and the first 75 states are the 75-token encoding's; the pooled vector is the first chunk's
    assert torch.allclose(states[:, :76], first[:, :76], atol=1e-6)
    assert torch.allclose(pooled, first_pooled, atol=1e-6)
