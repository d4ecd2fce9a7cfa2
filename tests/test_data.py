"""Dataset scan, buckets, captions, batches, latent cache and tag report (lora_gui.dataset and
lora_gui.engine.data)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from lora_gui.dataset import buckets as bk
from lora_gui.dataset import images as im
from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.captions import (
    drop_all_captions,
    process_caption,
    split_tags,
    tag_frequency,
    write_tag_report,
)
from lora_gui.dataset.scan import DatasetError, scan_dataset
from lora_gui.dataset.summary import dataset_summary
from lora_gui.engine.data import DataOptions, LatentCache, TrainDataset, summarize
from lora_gui.settings.schema import FIELD_GROUPS, GROUPS, TrainingSettings

torch.set_num_threads(1)

# Small training area so buckets, images and the VAE stay tiny:
# buckets (64,192) (64,256) (128,128) (192,64) (256,64).
SMALL = dict(resolution="128", min_bucket_resolution=64, max_bucket_resolution=256, bucket_reso_steps=64)


def data_options(**values) -> DataOptions:
    """DataOptions from settings given by bare name, each group validated by the schema. The
    cross-field rules are skipped (as in the page's preview) so the engine's own guards are tested."""
    docs: dict[str, dict] = {name: {} for name in ("images", "training", "labels", "advanced", "model")}
    for name, value in values.items():
        docs[FIELD_GROUPS[name]][name] = value
    groups = {group: GROUPS[group].model_validate(doc) for group, doc in docs.items()}
    return DataOptions.from_settings(TrainingSettings.model_construct(**groups))


def make_image(path: Path, size: tuple[int, int], seed: int = 0, **save_kwargs) -> Path:
    """An asymmetric image (left-right gradient plus noise), so a flip changes the pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None]
    pixels = np.clip(x * np.array([1.0, 0.4, 0.1]) + rng.uniform(0, 40, (h, w, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, **save_kwargs)
    return path


def make_parent_layout(root: Path) -> Path:
    """img/10_mychar: 4 images (2 captions), 2_other_thing: 1 image, plus things to ignore."""
    img = root / "img"
    a = img / "10_mychar"
    make_image(a / "a.png", (64, 64), 1)
    make_image(a / "b.JPG", (200, 64), 2)  # wide -> 192x64
    make_image(a / "c.webp", (64, 200), 3)  # tall -> 64x192
    make_image(a / "d.bmp", (80, 80), 4)
    (a / "a.txt").write_text("mychar, smiling, outdoors\n")
    (a / "c.txt").write_text("mychar, sitting\n")
    (a / "notes.md").write_text("not an image")
    b = img / "2_other_thing"
    make_image(b / "e.png", (256, 64), 5)
    (b / "e.txt").write_text("landscape, smiling")
    (img / "notes").mkdir()
    return img


def make_reg(root: Path, n: int = 3) -> Path:
    reg = root / "reg" / "1_person"
    for i in range(n):
        make_image(reg / f"r{i}.png", (64, 64), 100 + i)
    return root / "reg"


# --- scanning -------------------------------------------------------------------------------------


def test_scan_parent_layout_counts_repeats_tokens_and_captions(tmp_path):
    info = scan_dataset(make_parent_layout(tmp_path), repeats=3)
    assert [(s.name, s.repeats, s.class_tokens, len(s.images)) for s in info.subsets] == [
        ("10_mychar", 10, "mychar", 4),
        ("2_other_thing", 2, "other_thing", 1),
    ]
    mychar = info.subsets[0]
    assert [i.path.name for i in mychar.images] == ["a.png", "b.JPG", "c.webp", "d.bmp"]
    assert [(i.width, i.height) for i in mychar.images] == [(64, 64), (200, 64), (64, 200), (80, 80)]
    assert mychar.images[0].caption == "mychar, smiling, outdoors"
    assert mychar.caption_for(mychar.images[1]) == "mychar"  # missing caption -> class tokens
    assert [p.name for p in info.images_without_captions] == ["b.JPG", "d.bmp"]
    assert (info.num_train_images, info.num_reg_images) == (5, 0)
    assert info.num_train_items == info.num_epoch_samples == 10 * 4 + 2 * 1
    assert info.dataset_dirs() == {
        "10_mychar": {"n_repeats": 10, "img_count": 4},
        "2_other_thing": {"n_repeats": 2, "img_count": 1},
    }
    text = " ".join(info.warnings)
    assert "notes" in text and "2 images have no .txt caption" in text


def test_scan_plain_folder_uses_repeats_setting_and_folder_name(tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "x.png", (64, 64))
    make_image(folder / "y.jpeg", (96, 64))
    (folder / "y.txt").write_text("a, b")
    info = scan_dataset(folder, repeats=7, caption_extension="txt")
    (subset,) = info.subsets
    assert (subset.repeats, subset.class_tokens, len(subset.images)) == (7, "photos", 2)
    assert info.num_train_items == 14
    assert any("has no N_ prefix: using repeats = 7" in w for w in info.warnings)
    (folder / "._x.png").write_bytes(b"macOS fork, not an image")
    assert len(scan_dataset(folder, repeats=7).subsets[0].images) == 2
    # pointing at one N_name folder directly uses its own repeats and class tokens
    named = scan_dataset(make_parent_layout(tmp_path) / "10_mychar", repeats=3)
    assert (named.subsets[0].repeats, named.subsets[0].class_tokens) == (10, "mychar")
    assert any("is itself named N_name" in w for w in named.warnings)


def test_scan_with_reg_folder_doubles_epoch(tmp_path):
    info = scan_dataset(make_parent_layout(tmp_path), make_reg(tmp_path), repeats=1)
    assert [s.is_reg for s in info.subsets] == [False, False, True]
    assert (info.num_train_images, info.num_reg_images) == (5, 3)
    assert info.num_epoch_samples == 2 * info.num_train_items == 84


def test_scan_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as missing:
        scan_dataset(tmp_path / "nope", repeats=1)
    assert str(tmp_path / "nope") in str(missing.value)
    (tmp_path / "empty" / "some_subfolder").mkdir(parents=True)
    with pytest.raises(DatasetError, match="must contain images .* or N_name folders of images"):
        scan_dataset(tmp_path / "empty", repeats=1)
    with pytest.raises(DatasetError, match="repeats"):
        scan_dataset(make_parent_layout(tmp_path), repeats=0)
    assert issubclass(DatasetError, ValueError)


def test_scan_reads_200_headers_without_decoding_pixels(tmp_path, monkeypatch):
    folder = tmp_path / "5_many"
    for i in range(200):
        ext = (".png", ".jpg", ".webp", ".bmp")[i % 4]
        make_image(folder / f"{i:03d}{ext}", (16 + i % 7, 24), i)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed size is swapped
    make_image(folder / "rotated.jpg", (40, 20), exif=exif.tobytes())

    def refuse(self, *args, **kwargs):
        raise AssertionError("the scan decoded pixels")

    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    info = scan_dataset(tmp_path, repeats=1)
    monkeypatch.undo()
    sizes = {i.path.name: (i.width, i.height) for i in info.subsets[0].images}
    assert len(sizes) == 201 and sizes["006.webp"] == (22, 24) and sizes["rotated.jpg"] == (20, 40)
    assert im.open_rgb(folder / "rotated.jpg").size == (20, 40)  # loader agrees with the scan


# --- buckets --------------------------------------------------------------------------------------


def test_make_buckets_512_gives_kohyas_17():
    assert bk.make_buckets((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
        (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
        (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    assert all(w * h <= 768 * 768 for w, h in bk.make_buckets((768, 768), 256, 1024, 64))


def test_assign_bucket_nearest_aspect_ratio():
    buckets = bk.make_buckets((512, 512), 256, 1024, 64)
    assert bk.assign_bucket(512, 512, buckets) == (512, 512)
    assert bk.assign_bucket(3000, 3000, buckets) == (512, 512)
    assert bk.assign_bucket(1024, 768, buckets) == (576, 448)
    assert bk.assign_bucket(768, 1024, buckets) == (448, 576)
    assert bk.assign_bucket(600, 1200, buckets) == (320, 704)
    assert bk.assign_bucket(5000, 100, buckets) == (1024, 256)


def test_no_upscale_bucket_and_buckets_off():
    area = 512 * 512
    assert bk.no_upscale_bucket(300, 200, area, 64) == (256, 192)  # small: own size floored
    assert bk.no_upscale_bucket(1024, 1024, area, 64) == (512, 512)  # large: scaled to the area
    assert bk.no_upscale_bucket(2000, 1000, area, 64) == (704, 320)  # 724x362 floored
    assert bk.no_upscale_bucket(40, 40, area, 64) == (64, 64)  # never below one step
    assert bk.choose_bucket(1000, 300, resolution=(512, 768), enable_buckets=False) == (512, 768)


def test_transform_covers_crops_flips_and_shifts_hue(tmp_path):
    path = make_image(tmp_path / "w.png", (200, 64))
    plain = im.load_image_array(path, (128, 128))
    assert plain.shape == (3, 128, 128) and plain.dtype == np.float32
    assert -1.0 <= plain.min() and plain.max() <= 1.0
    flipped = im.load_image_array(path, (128, 128), flip=True)
    assert not np.allclose(plain, flipped) and np.allclose(plain[:, :, ::-1], flipped)
    left = im.load_image_array(path, (128, 128), crop_position=(0.0, 0.0))
    right = im.load_image_array(path, (128, 128), crop_position=(1.0, 0.0))
    assert left.mean() < plain.mean() < right.mean()  # gradient grows to the right
    rgb = np.array([[[1.0, 0.0, 0.0], [0.2, 0.5, 0.9], [0.3, 0.3, 0.3]]], dtype=np.float32)
    assert np.allclose(im.shift_hue(rgb, 0.0), rgb, atol=1e-6)
    assert np.allclose(im.shift_hue(rgb, 1 / 3)[0, 0], [0, 1, 0], atol=1e-6)  # red -> green
    assert np.allclose(im.shift_hue(rgb, 0.25)[0, 2], [0.3, 0.3, 0.3])  # grey has no hue


# --- captions -------------------------------------------------------------------------------------

CAPTION = "a, b, c, d, e, f, g"


def test_keep_tokens_stay_in_place_and_shuffle_permutes_the_rest():
    orders = set()
    for seed in range(20):
        out = split_tags(process_caption(CAPTION, keep_tokens=2, shuffle=True, rng=random.Random(seed)))
        assert out[:2] == ["a", "b"] and sorted(out[2:]) == ["c", "d", "e", "f", "g"]
        orders.add(tuple(out))
    assert len(orders) > 5
    assert process_caption(" a ,b,, c ", rng=random.Random(0)) == "a, b, c"


def test_tag_dropout_rate_and_whole_caption_dropout_statistics():
    rng = random.Random(1)
    tags = ", ".join(f"t{i}" for i in range(20))
    kept = [
        split_tags(process_caption(tags, keep_tokens=1, tag_dropout_rate=0.3, rng=rng)) for _ in range(500)
    ]
    assert all(k[0] == "t0" for k in kept)
    dropped = 1 - np.mean([len(k) - 1 for k in kept]) / 19
    assert abs(dropped - 0.3) < 0.03
    empties = sum(process_caption(CAPTION, dropout_rate=0.25, rng=rng) == "" for _ in range(2000))
    assert abs(empties / 2000 - 0.25) < 0.04
    assert process_caption(CAPTION, trigger_words="sks", drop_all=True, rng=rng) == ""
    assert [drop_all_captions(e, 3) for e in range(6)] == [False, False, True, False, False, True]
    assert not any(drop_all_captions(e, 0) for e in range(4))


def test_trigger_words_first_never_dropped_nor_duplicated():
    for seed in range(30):
        out = process_caption(
            "smiling, MyChar, outdoors, sks",
            trigger_words="sks, mychar",
            shuffle=True,
            tag_dropout_rate=0.5,
            rng=random.Random(seed),
        )
        tags = split_tags(out)
        assert tags[:2] == ["sks", "mychar"] and len(tags) == len(set(t.lower() for t in tags))
        assert set(tags[2:]) <= {"smiling", "outdoors"}
    assert (
        process_caption("mychar, smiling", trigger_words="mychar", rng=random.Random(0)) == "mychar, smiling"
    )
    # keep_tokens counts from the trigger words, like kohya's caption prefix
    out = process_caption("x, y, z", trigger_words="sks", keep_tokens=2, shuffle=True, rng=random.Random(3))
    assert split_tags(out)[:2] == ["sks", "x"]


def test_caption_pipeline_is_deterministic_for_a_seed():
    kwargs = dict(trigger_words="sks", keep_tokens=1, shuffle=True, tag_dropout_rate=0.3, dropout_rate=0.1)
    runs = [
        [process_caption(CAPTION, rng=r, **kwargs) for _ in range(50)]
        for r in (random.Random(9), random.Random(9))
    ]
    assert runs[0] == runs[1]
    assert runs[0] != [process_caption(CAPTION, rng=random.Random(10), **kwargs) for _ in range(50)]


# --- training dataset -----------------------------------------------------------------------------


def dataset(tmp_path, reg=False, **options) -> TrainDataset:
    img = tmp_path / "img"
    if not img.exists():
        make_parent_layout(tmp_path)
    reg_folder = (tmp_path / "reg") if reg else None
    if reg and not reg_folder.exists():
        make_reg(tmp_path)
    info = scan_dataset(img, reg_folder, repeats=1, trigger_words="sks")
    return TrainDataset(info, data_options(**{**SMALL, "batch_size": 3, "seed": 7, **options}))


def paths(batches):
    return [[(i.path.name, i.is_reg) for i in batch] for batch in batches]


def test_epoch_batches_deterministic_never_mix_buckets_and_count_steps(tmp_path):
    ds = dataset(tmp_path)
    assert {i.path.name: i.bucket for i in ds.train_items} == {
        "a.png": (128, 128), "b.JPG": (192, 64), "c.webp": (64, 192), "d.bmp": (128, 128),
        "e.png": (256, 64),
    }  # fmt: skip
    first = ds.epoch_batches(0)
    assert paths(first) == paths(dataset(tmp_path).epoch_batches(0))  # fresh object, same (seed, epoch)
    assert paths(first) == paths(ds.epoch_batches(0))
    assert paths(first) != paths(ds.epoch_batches(1))
    for epoch in range(3):
        batches = ds.epoch_batches(epoch)
        assert all(len({i.bucket for i in b}) == 1 and 1 <= len(b) <= 3 for b in batches)
        assert sum(len(b) for b in batches) == 42
        assert len(batches) == ds.steps_per_epoch
    # 128x128: 20 -> 7 batches, 192x64: 10 -> 4, 64x192: 10 -> 4, 256x64: 2 -> 1
    assert ds.steps_per_epoch == 16
    other_seed = dataset(tmp_path, seed=8)
    assert paths(other_seed.epoch_batches(0)) != paths(first)


def test_reg_items_match_train_items_and_are_flagged(tmp_path):
    ds = dataset(tmp_path, reg=True)
    items = [i for b in ds.epoch_batches(0) for i in b]
    assert sum(i.is_reg for i in items) == sum(not i.is_reg for i in items) == 42
    assert Counter(i.path.name for i in items if i.is_reg) == {"r0.png": 14, "r1.png": 14, "r2.png": 14}
    assert all(i.trigger_words == "" for i in ds.reg_items)  # trigger words only on train images
    assert ds.num_reg_images == 3
    summary = summarize(ds.info, ds.options)
    assert summary.steps_per_epoch == ds.steps_per_epoch
    assert summary.samples_per_epoch == 84


def test_validation_split_is_disjoint_and_stable(tmp_path):
    ds = dataset(tmp_path, validation_split=0.4)
    held = {i.path for i in ds.validation_items()}
    assert len(held) == 2 and len(ds.validation_items()) == 2
    assert held.isdisjoint({i.path for b in ds.epoch_batches(0) for i in b})
    assert ds.num_train_images == 3
    assert held == {i.path for i in dataset(tmp_path, validation_split=0.4).validation_items()}
    tiny = dataset(tmp_path, validation_split=0.01)
    assert len(tiny.validation_items()) == 1  # at least one image
    batch = ds.load_batch(ds.validation_batches()[0], augment=False)
    assert batch.flipped == [False] * len(batch.paths)
    assert all(c.startswith("sks") for c in batch.captions)
    summary = summarize(ds.info, ds.options)
    assert (summary.validation_images, summary.steps_per_epoch) == (2, ds.steps_per_epoch)


def test_load_batch_shapes_range_and_determinism(tmp_path):
    options = dict(flip_aug=True, color_aug=True, random_crop=True, shuffle_caption=True, keep_tokens=1,
                   caption_tag_dropout_rate=0.2)
    ds = dataset(tmp_path, reg=True, **options)
    batches = ds.epoch_batches(2)
    index = next(i for i, b in enumerate(batches) if b[0].bucket == (192, 64) and len(b) == 3)
    batch = ds.load_batch(batches[index], 2, index)
    assert batch.pixels.shape == (3, 3, 64, 192) and batch.pixels.dtype == torch.float32
    assert batch.latents is None and batch.bucket == (192, 64)
    assert -1.0 <= batch.pixels.min() and batch.pixels.max() <= 1.0
    assert batch.is_reg.dtype == torch.bool and batch.is_reg.tolist() == [i.is_reg for i in batches[index]]
    assert all(c.startswith("sks") for c, r in zip(batch.captions, batch.is_reg) if not r)
    ds.load_batch(batches[0], 2, 0)  # loading something else in between changes nothing
    again = dataset(tmp_path, reg=True, **options)
    same = again.load_batch(again.epoch_batches(2)[index], 2, index)
    assert torch.equal(batch.pixels, same.pixels) and batch.captions == same.captions
    # the epoch view resumes at a batch and loads exactly that batch
    view = ds.epoch_view(2, skip_batches=index)
    assert len(view) == ds.steps_per_epoch - index and torch.equal(view[0].pixels, batch.pixels)


def test_flip_aug_flips_pixels(tmp_path):
    ds = dataset(tmp_path, flip_aug=True, batch_size=1)
    plain = dataset(tmp_path, batch_size=1)
    seen = set()
    for k, items in enumerate(ds.epoch_batches(0)):
        if items[0].path.name != "b.JPG":
            continue
        flipped = ds.load_batch(items, 0, k)
        base = plain.load_batch(items, 0, k).pixels
        expected = base.flip(-1) if flipped.flipped[0] else base
        assert torch.equal(flipped.pixels, expected)
        seen.add(flipped.flipped[0])
    assert seen == {True, False}


# --- latent cache ---------------------------------------------------------------------------------


@pytest.fixture
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()
    model.calls = 0
    encode = model.encode

    def counting_encode(x, *args, **kwargs):
        model.calls += x.shape[0]
        return encode(x, *args, **kwargs)

    model.encode = counting_encode
    return model


def test_latent_cache_encodes_once_and_loader_returns_latents(tmp_path, vae):
    ds = dataset(tmp_path, flip_aug=True)
    progress = []
    cache = ds.cache_latents(vae, on_progress=lambda done, total: progress.append((done, total)))
    assert vae.calls == 10 and cache.encoded == 10  # 5 images x (plain, flipped)
    assert progress[-1] == (10, 10) and progress[0] == (0, 10)
    assert cache.build(ds.cache_requests()) == 0 and vae.calls == 10
    items = next(b for b in ds.epoch_batches(0) if b[0].bucket == (256, 64))
    batch = ds.load_batch(items, 0, 0)
    assert batch.pixels is None and batch.latents.shape == (len(items), 4, 8, 32)
    pixels = torch.from_numpy(im.load_image_array(items[0].path, (256, 64), flip=batch.flipped[0]))
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mean[0] * vae.config.scaling_factor
    assert torch.allclose(batch.latents[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be used with cached latents"):
        dataset(tmp_path, color_aug=True).attach_latent_cache(cache)


def test_latent_disk_cache_reused_and_invalidated(tmp_path, vae):
    ds = dataset(tmp_path)
    first = LatentCache(vae, to_disk=True)
    first.build(ds.cache_requests())
    image = tmp_path / "img" / "10_mychar" / "a.png"
    disk = LatentCache.disk_path(image, (128, 128))
    assert disk.name == "a.png.128x128.lora-latents.npz" and disk.is_file()
    assert vae.calls == 5
    second = LatentCache(vae, to_disk=True)
    assert second.build(ds.cache_requests()) == 0 and second.loaded_from_disk == 5 and vae.calls == 5
    assert torch.equal(second.get(image, (128, 128)), first.get(image, (128, 128)))
    make_image(image, (64, 64), seed=99)  # the image changes
    os.utime(image, ns=(1, 1))
    third = LatentCache(vae, to_disk=True)
    assert third.build(ds.cache_requests()) == 1 and third.loaded_from_disk == 4 and vae.calls == 6
    assert not torch.equal(third.get(image, (128, 128)), first.get(image, (128, 128)))
    # flip_aug now needs flipped latents that the files do not hold: encoded, files rewritten
    flips = dataset(tmp_path, flip_aug=True)
    assert LatentCache(vae, to_disk=True).build(flips.cache_requests()) == 10
    assert LatentCache(vae, to_disk=True).build(flips.cache_requests()) == 0
    # another resolution -> another bucket -> another file
    big = dataset(tmp_path, resolution="256", min_bucket_resolution=64, max_bucket_resolution=512)
    assert LatentCache(vae, to_disk=True).build(big.cache_requests()) == 5
    assert LatentCache.disk_path(image, (256, 256)).is_file()


# --- tags and summary -----------------------------------------------------------------------------


def test_tag_frequency_and_report_order(tmp_path):
    info = scan_dataset(make_parent_layout(tmp_path), repeats=1, trigger_words="sks")
    assert tag_frequency(info) == {
        "10_mychar": {"mychar": 4, "smiling": 1, "outdoors": 1, "sitting": 1},
        "2_other_thing": {"landscape": 1, "smiling": 1},
    }  # raw captions (missing -> class tokens), not multiplied by the 10 repeats, no trigger words
    report = write_tag_report(tmp_path / "tags.txt", info)
    assert report.read_text().splitlines() == [
        "mychar: 4", "smiling: 2", "landscape: 1", "outdoors: 1", "sitting: 1",
    ]  # fmt: skip
    write_tag_report(report, info, alphabetical=True)
    assert report.read_text().splitlines() == [
        "landscape: 1", "mychar: 4", "outdoors: 1", "sitting: 1", "smiling: 2",
    ]  # fmt: skip


def test_summary_for_gui_and_torch_free_imports(tmp_path):
    info = scan_dataset(make_parent_layout(tmp_path), repeats=1)
    small = BucketOptions((128, 128), buckets=True, min_bucket_resolution=64, max_bucket_resolution=256,
                          bucket_reso_steps=64, bucket_no_upscale=False)
    summary = dataset_summary(info, small, batch_size=3, validation_split=0.0, seed=7)
    mychar = summary.folders[0]
    assert (mychar.repeats, mychar.images, mychar.captions, len(mychar.without_captions)) == (10, 4, 2, 2)
    assert mychar.buckets == {(128, 128): 2, (192, 64): 1, (64, 192): 1}
    assert mychar.top_tags[0] == ("mychar", 4)
    assert summary.steps_per_epoch == 16 and summary.samples_per_epoch == 42
    assert "10_mychar" in summary.to_markdown()
    code = (
        "import sys, lora_gui.dataset.scan, lora_gui.dataset.buckets, lora_gui.dataset.images,"
        " lora_gui.dataset.captions, lora_gui.dataset.summary, lora_gui.engine.data;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
