"""Checks before training on a copy of the demo dataset: the duplicate finder finds a resized and
re-encoded copy (and an exact copy) and no false pair; truncated images, small images, captions in
another encoding, missing and orphan captions and a dominant folder are reported with their files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.checks import check_dataset
from lora_gui.dataset.dedupe import fingerprint, near_groups

OPTIONS = BucketOptions((512, 512), True, 256, 1024, 64, False)
SMALL_OK = BucketOptions((64, 64), True, 32, 256, 64, False)  # demo images are 48..160 px


@pytest.fixture
def data(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo.dataset_dir, tmp_path / "dataset"))


def check(root: Path, options: BucketOptions = SMALL_OK):
    return check_dataset(root, repeats=1, buckets=options)


def test_demo_set_has_no_duplicates(data):
    report = check(data)
    assert report.images_checked == 18
    assert report.of_kind("duplicate") == [] and report.of_kind("near-duplicate") == []
    assert [f.kind for f in report.findings] == ["no-caption"]
    assert report.of_kind("no-caption")[0].files == [data / "3_circles" / "circles_05.png"]


@pytest.mark.parametrize("scale,quality", [(0.5, 70), (2.0, 85), (0.75, 60)])
def test_resized_reencoded_copy_is_found(data, scale, quality):
    source = data / "5_shapes" / "shapes_07.png"
    with Image.open(source) as image:
        w, h = image.size
        copy = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    copy.save(data / "3_circles" / "copy_of_07.jpg", quality=quality)
    report = check(data)
    near = report.of_kind("near-duplicate")
    assert [f.files for f in near] == [[data / "3_circles" / "copy_of_07.jpg", source]]
    assert report.of_kind("duplicate") == []


def test_every_demo_image_finds_its_copy_and_nothing_else(data, tmp_path):
    originals = sorted(data.rglob("*.png"))
    prints = [fingerprint(p) for p in originals]
    for path in originals:
        with Image.open(path) as image:
            w, h = image.size
            copy = image.convert("RGB").resize((w // 2, h // 2), Image.Resampling.BICUBIC)
        target = tmp_path / f"{path.stem}_copy.jpg"
        copy.save(target, quality=75)
        groups = near_groups([*prints, fingerprint(target)])
        assert groups == [sorted([path, target])], path.name


def test_exact_copy_truncated_image_and_encodings(data):
    shapes = data / "5_shapes"
    shutil.copy(shapes / "shapes_01.png", shapes / "shapes_01_again.png")
    cut = shapes / "shapes_02.png"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (shapes / "shapes_03.txt").write_bytes("caf\xe9, red".encode("latin-1"))
    (shapes / "lonely.txt").write_text("no image")
    report = check(data)
    dup = report.of_kind("duplicate")
    assert [f.files for f in dup] == [[shapes / "shapes_01.png", shapes / "shapes_01_again.png"]]
    unreadable = report.of_kind("unreadable")
    assert unreadable[0].files == [cut] and unreadable[0].severity == "error"
    assert report.of_kind("encoding")[0].files == [shapes / "shapes_03.txt"]
    assert report.of_kind("orphan-caption")[0].files == [shapes / "lonely.txt"]
    md = report.to_markdown()
    assert "Fix: re-export or re-download" in md and "`5_shapes/shapes_02.png`" in md


def test_small_images_and_a_dominant_folder(tmp_path):
    root = tmp_path / "data"
    for folder, n, size in (("10_big", 10, (512, 512)), ("1_few", 2, (200, 600))):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (i * 20, 100 if folder == "1_few" else 0, 0)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text("x")
    report = check(root, OPTIONS)
    small = report.of_kind("small")
    assert small[0].files == [root / "1_few" / "0.png", root / "1_few" / "1.png"]
    assert "shorter than the bucket minimum (256 px)" in small[0].message
    dominant = report.of_kind("dominant-folder")
    assert len(dominant) == 1 and dominant[0].files == [root / "10_big"]
    assert "98%" in dominant[0].message  # 100 of 102 samples
    assert "1_big, 5_few" in dominant[0].fix
    missing = check_dataset(tmp_path / "nope", repeats=1, buckets=OPTIONS)
    assert missing.errors and "does not exist" in missing.errors[0].message
