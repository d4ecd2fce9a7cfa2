"""sd-scripts' dataset_config TOML: a config with two subsets (different folders, repeats, class
tokens, caption extension) round-trips, and maps to N_name folders and settings that plan the same
training as the equivalent hand-made folders (same images, captions, repeats, buckets, steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.kohya_toml import (
    config_from_settings,
    dumps_dataset_config,
    load_dataset_config,
    parse_dataset_config,
    to_folder_layout,
)
from lora_gui.dataset.scan import DatasetError, scan_dataset
from lora_gui.dataset.summary import dataset_summary
from lora_gui.settings import TrainingSettings, io

TOML = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [320, 256]
batch_size = 2
enable_bucket = true
min_bucket_reso = 128
max_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = "raw/cats"
  num_repeats = 4
  class_tokens = "mycat cat"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "raw/dogs"
  num_repeats = 2
  class_tokens = "dog"
  caption_extension = ".caption"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "raw/reg"
  is_reg = true
  class_tokens = "animal"
"""


def make_images(root: Path) -> None:
    sizes = {"cats": [(200, 300), (300, 200), (256, 256)], "dogs": [(400, 200), (150, 150)],
             "reg": [(256, 256)]}
    for name, dims in sizes.items():
        folder = root / "raw" / name
        folder.mkdir(parents=True)
        for i, size in enumerate(dims):
            Image.new("RGB", size, (i * 50, len(name) * 20, 9)).save(folder / f"{name}{i}.png")
            ext = ".caption" if name == "dogs" else ".txt"
            if name != "reg" and i != 1:
                (folder / f"{name}{i}{ext}").write_text(f"{name} tag{i}, other\n")


def test_two_subsets_round_trip(tmp_path):
    make_images(tmp_path)
    (tmp_path / "ds.toml").write_text(TOML)
    config = load_dataset_config(tmp_path / "ds.toml")
    [dataset] = config.datasets
    assert dataset.resolution == (320, 256) and dataset.batch_size == 2 and dataset.min_bucket_reso == 128
    cats, dogs, reg = dataset.subsets
    assert (cats.image_dir, cats.num_repeats, cats.class_tokens) == (tmp_path / "raw/cats", 4, "mycat cat")
    assert (cats.keep_tokens, cats.shuffle_caption, cats.caption_extension) == (1, True, ".txt")
    assert (dogs.caption_extension, dogs.num_repeats, dogs.flip_aug) == (".caption", 2, True)
    assert (reg.is_reg, reg.num_repeats, reg.flip_aug, reg.keep_tokens) == (True, 1, False, 1)
    text = dumps_dataset_config(config)
    again = parse_dataset_config(text)
    assert again == config
    assert dumps_dataset_config(again) == text


def test_toml_trains_like_the_equivalent_folders(tmp_path):
    make_images(tmp_path)
    (tmp_path / "ds.toml").write_text(TOML)
    layout = to_folder_layout(load_dataset_config(tmp_path / "ds.toml"), tmp_path / "imported")
    # The same dataset made by hand: N_name folders, every caption as .txt, and the settings.
    hand = tmp_path / "hand"
    for src, dst in (("cats", "img/4_mycat cat"), ("dogs", "img/2_dog"), ("reg", "reg/1_animal")):
        (hand / dst).mkdir(parents=True)
        for f in (tmp_path / "raw" / src).iterdir():
            shutil.copy(f, hand / dst / f.name.replace(".caption", ".txt"))
    base = TrainingSettings()
    imported = layout.apply(base)
    by_hand = io.apply_overrides(base, [
        f"model.img_folder={hand / 'img'}", f"model.reg_img_folder={hand / 'reg'}",
        "images.resolution=320,256", "images.buckets=true", "images.min_bucket_resolution=128",
        "images.max_bucket_resolution=512", "images.flip_aug=true", "labels.shuffle_caption=true",
        "labels.keep_tokens=1", "training.batch_size=2"])
    for field in ("images", "labels", "training"):
        assert getattr(imported, field) == getattr(by_hand, field), field
    assert layout.notes == ["The subsets disagree on flip_aug (True and False): lora-gui has one "
                            "images.flip_aug for all folders, True is used."]

    def plan(settings):
        info = scan_dataset(settings.model.img_folder, settings.model.reg_img_folder, repeats=1,
                            caption_extension=settings.labels.caption_extension)
        summary = dataset_summary(info, BucketOptions.from_settings(settings), batch_size=2,
                                  validation_split=0.0, seed=1)
        images = sorted((s.name, s.repeats, s.is_reg, i.path.name, i.caption, i.width, i.height)
                        for s in info.subsets for i in s.images)
        return images, summary.epoch_buckets, summary.steps_per_epoch

    assert plan(imported) == plan(by_hand)
    images, buckets, steps = plan(imported)
    assert ("2_dog", 2, False, "dogs0.png", "dogs tag0, other", 400, 200) in images
    assert ("2_dog", 2, False, "dogs1.png", None, 150, 150) in images
    assert sum(buckets.values()) == 2 * (3 * 4 + 2 * 2)  # train samples + as many reg samples


def test_export_then_import_gives_the_same_folders(demo, tmp_path):
    settings = TrainingSettings()
    info = scan_dataset(demo.dataset_dir, demo.reg_dir, repeats=10)
    config = config_from_settings(info, settings)
    layout = to_folder_layout(parse_dataset_config(dumps_dataset_config(config)), tmp_path / "out")
    back = scan_dataset(layout.img_folder, layout.reg_folder, repeats=10)
    assert [(s.name, s.repeats, s.is_reg, len(s.images)) for s in back.subsets] == [
        (s.name, s.repeats, s.is_reg, len(s.images)) for s in info.subsets]
    assert [i.caption for s in back.subsets for i in s.images] == [
        i.caption for s in info.subsets for i in s.images]


@pytest.mark.parametrize("text,message", [
    ("[[datasets]]\nresolution = 'big'\n[[datasets.subsets]]\nimage_dir='x'", "resolution must be"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file='m.json'", "fine-tuning subset"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='x'\nnum_repeats='3'", "num_repeats must be int"),
    ("[general]\n", "no [[datasets]]"),
    ("[[datasets]\n", "not valid TOML"),
])
def test_bad_configs_get_a_sentence(text, message):
    with pytest.raises(DatasetError, match=message.replace("[", r"\[")):
        parse_dataset_config(text)
