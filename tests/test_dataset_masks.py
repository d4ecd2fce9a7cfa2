"""Loss masks shown in the Dataset tab: the alpha channel or a mask folder's file (red channel,
same sub-folder and name, any image format), the ignored parts tinted; pixels computed by hand."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_gui.dataset.masks import TINT, TINT_STRENGTH, find_mask_file, mask_preview
from lora_gui.dataset.scan import DatasetError


def tinted(rgb) -> tuple[int, ...]:
    return tuple(round(c + TINT_STRENGTH * (t - c)) for c, t in zip(rgb, TINT, strict=True))


def close(a, b) -> bool:
    return all(abs(x - y) <= 1 for x, y in zip(a, b, strict=True))


def test_alpha_channel_half_trained(tmp_path):
    image = Image.new("RGBA", (8, 4), (10, 20, 30, 255))
    image.paste((10, 20, 30, 0), (4, 0, 8, 4))  # the right half is transparent: ignored by the loss
    image.save(tmp_path / "x.png")
    preview = mask_preview(tmp_path / "x.png")
    assert preview.image.getpixel((1, 1)) == (10, 20, 30)
    assert close(preview.image.getpixel((6, 2)), tinted((255, 255, 255)))  # transparency shows as white
    assert tinted((255, 255, 255)) == (255, 102, 140)
    assert preview.message == "x.png: alpha channel, 50% of the image is trained (tinted = ignored by the loss)."


def test_mask_folder_file_grey_and_other_format(tmp_path):
    root = tmp_path / "img"
    (root / "10_cat").mkdir(parents=True)
    Image.new("RGB", (6, 6), (200, 100, 0)).save(root / "10_cat" / "x.png")
    (tmp_path / "masks" / "10_cat").mkdir(parents=True)
    mask = Image.new("RGB", (6, 6), (0, 0, 0))
    mask.paste((128, 255, 255), (0, 0, 3, 6))  # red 128 on the left: half trained; the red channel counts
    mask.save(tmp_path / "masks" / "10_cat" / "x.bmp")
    assert find_mask_file(tmp_path / "masks", root / "10_cat" / "x.png", root) == tmp_path / "masks" / "10_cat" / "x.bmp"
    preview = mask_preview(root / "10_cat" / "x.png", tmp_path / "masks", root)
    w = 128 / 255  # Image.composite: image * m + tinted * (1 - m)
    half = tuple(c * w + t * (1 - w) for c, t in zip((200, 100, 0), tinted((200, 100, 0)), strict=True))
    assert close(preview.image.getpixel((1, 3)), half)
    assert close(preview.image.getpixel((5, 3)), tinted((200, 100, 0)))
    assert preview.message.startswith(f"x.png: mask x.bmp, {0.5 * 128 / 255:.0%} of the image is trained")


def test_no_mask_sentences(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "x.png")
    assert mask_preview(tmp_path / "x.png").message == ("x.png has no alpha channel: with masked_loss the "
                                                        "whole image is trained.")
    (tmp_path / "masks").mkdir()
    missing = mask_preview(tmp_path / "x.png", tmp_path / "masks", tmp_path)
    assert missing.mask is None and missing.message.startswith(f"No mask for x.png in {tmp_path / 'masks'}")
    (tmp_path / "masks" / "x.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="The mask of x.png cannot be read"):
        mask_preview(tmp_path / "x.png", tmp_path / "masks", tmp_path)


def test_stretched_mask_and_preview_size(tmp_path):
    Image.new("RGB", (40, 20), (0, 0, 0)).save(tmp_path / "x.png")
    (tmp_path / "m").mkdir()
    Image.new("L", (4, 2), 255).save(tmp_path / "m" / "x.png")
    preview = mask_preview(tmp_path / "x.png", tmp_path / "m", tmp_path, size=10)
    assert preview.image.size == (10, 5) and preview.mask.size == (40, 20)
    assert "100% of the image is trained" in preview.message and "it is stretched" in preview.message
