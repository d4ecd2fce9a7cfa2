"""kohya-ss/sd-scripts' ``--dataset_config`` TOML: read it, write it, and map it to lora-gui's
``N_name`` folders and settings so it trains the same.

Schema (sd-scripts ``library/config_util.py``, ``docs/config_README-en.md``): ``[general]``, then
``[[datasets]]`` each with ``[[datasets.subsets]]``. Subset keys: ``image_dir`` (required for a
DreamBooth-style subset), ``num_repeats`` (default 1), ``class_tokens``, ``is_reg``,
``caption_extension`` (default ".caption"), and the "ascendable" keys a subset inherits from its
dataset, then from ``[general]`` (``keep_tokens``, ``flip_aug``, ``color_aug``, ``random_crop``,
``shuffle_caption``). Dataset keys: ``resolution`` (one number or [w, h]), ``batch_size``,
``enable_bucket``, ``min_bucket_reso``, ``max_bucket_reso``, ``bucket_reso_steps``,
``bucket_no_upscale``, also allowed in ``[general]``.

lora-gui trains one dataset with one set of caption and augmentation settings, so a TOML maps to
one image folder of ``N_name`` subfolders (plus one for regularisation) and settings; what cannot be
expressed (several datasets, subsets that disagree on keep_tokens...) is said in a note. Relative
``image_dir`` paths are read relative to the TOML file's folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_gui.atomic import write_text
from lora_gui.dataset.scan import IMAGE_EXTENSIONS, DatasetError, DatasetInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, released separately before Python 3.11
    import tomli as tomllib

_UNSAFE_IN_NAME = re.compile(r'[\\/:*?"<>|]+')

# sd-scripts' defaults when neither the subset, its dataset nor [general] gives a value.
SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "class_tokens": "", "is_reg": False, "caption_extension": ".caption",
    "keep_tokens": 0, "shuffle_caption": False, "flip_aug": False, "color_aug": False,
    "random_crop": False,
}
DATASET_DEFAULTS: dict[str, Any] = {
    "resolution": None, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
}
# Subset keys that lora-gui has once for the whole dataset -> its setting.
SHARED_SUBSET_KEYS = {
    "caption_extension": "labels.caption_extension", "keep_tokens": "labels.keep_tokens",
    "shuffle_caption": "labels.shuffle_caption", "flip_aug": "images.flip_aug",
    "color_aug": "images.color_aug", "random_crop": "images.random_crop",
}
DATASET_KEYS = {
    "batch_size": "training.batch_size", "enable_bucket": "images.buckets",
    "min_bucket_reso": "images.min_bucket_resolution", "max_bucket_reso": "images.max_bucket_resolution",
    "bucket_reso_steps": "images.bucket_reso_steps", "bucket_no_upscale": "images.bucket_no_upscale",
}


@dataclass
class TomlSubset:
    image_dir: Path
    num_repeats: int
    class_tokens: str
    is_reg: bool
    caption_extension: str
    keep_tokens: int
    shuffle_caption: bool
    flip_aug: bool
    color_aug: bool
    random_crop: bool


@dataclass
class TomlDataset:
    resolution: tuple[int, int] | None
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: list[TomlSubset] = field(default_factory=list)


@dataclass
class DatasetConfig:
    datasets: list[TomlDataset]
    notes: list[str] = field(default_factory=list)


# --- reading ----------------------------------------------------------------------------------------


def _resolution(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise DatasetError(f"{where}: resolution must be a number (512) or [width, height], not {value!r}.")


def _typed(key: str, value: Any, default: Any, where: str) -> Any:
    if default is None or isinstance(value, type(default)) and not (
            isinstance(value, bool) and not isinstance(default, bool)):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    raise DatasetError(f"{where}: {key} must be {type(default).__name__}, not {value!r}: fix it in the TOML.")


def _pick(key: str, levels: list[dict], defaults: dict, where: str) -> Any:
    for level in levels:
        if key in level:
            return _typed(key, level[key], defaults[key], where)
    return defaults[key]


def _subset(raw: dict, levels: list[dict], base: Path, where: str) -> TomlSubset:
    if "metadata_file" in raw and "image_dir" not in raw:
        raise DatasetError(f"{where} is a fine-tuning subset (metadata_file): lora-gui reads image "
                           "folders with caption files; give it an image_dir instead.")
    if not isinstance(raw.get("image_dir"), str) or not raw["image_dir"]:
        raise DatasetError(f"{where} has no image_dir: every subset needs the folder of its images.")
    chain = [raw, *levels]
    values = {k: _pick(k, chain, SUBSET_DEFAULTS, where) for k in SUBSET_DEFAULTS}
    if not values["caption_extension"].startswith("."):
        values["caption_extension"] = "." + values["caption_extension"]
    return TomlSubset(image_dir=(base / raw["image_dir"]).resolve(), **values)


def parse_dataset_config(text: str, base: str | Path = ".", name: str = "the dataset config") -> DatasetConfig:
    """A dataset config from TOML text; relative image_dir paths are taken from ``base``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DatasetError(f"{name} is not valid TOML ({exc}): fix the line it names.") from None
    general = doc.get("general", {})
    raw_datasets = doc.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(raw_datasets, list) or not raw_datasets:
        raise DatasetError(f"{name} has no [[datasets]] tables: it needs at least one [[datasets]] "
                           "with [[datasets.subsets]].")
    datasets = []
    for d, raw in enumerate(raw_datasets, 1):
        where = f"{name}, dataset {d}"
        levels = [raw, general]
        values = {k: _pick(k, levels, DATASET_DEFAULTS, where) for k in DATASET_DEFAULTS if k != "resolution"}
        resolution = _resolution(raw.get("resolution", general.get("resolution")), where)
        subsets = [_subset(s, levels, Path(base), f"{where}, subset {i}")
                   for i, s in enumerate(raw.get("subsets", []), 1)]
        if not subsets:
            raise DatasetError(f"{where} has no [[datasets.subsets]]: add one per image folder.")
        datasets.append(TomlDataset(resolution=resolution, subsets=subsets, **values))
    return DatasetConfig(datasets)


def load_dataset_config(path: str | Path) -> DatasetConfig:
    path = Path(path)
    return parse_dataset_config(path.read_text(encoding="utf-8"), path.parent, str(path))


# --- writing ----------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A TOML basic string escapes like JSON (\" \\ \n \uXXXX); non-ASCII stays as it is.
    return json.dumps(str(value), ensure_ascii=False)


def dumps_dataset_config(config: DatasetConfig) -> str:
    """TOML that sd-scripts reads (every value written out, at the subset or dataset level)."""
    lines = ["# sd-scripts dataset config (--dataset_config), written by lora-gui", ""]
    for dataset in config.datasets:
        lines.append("[[datasets]]")
        for f in fields(TomlDataset):
            value = getattr(dataset, f.name)
            if f.name != "subsets" and value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        for subset in dataset.subsets:
            lines += ["", "  [[datasets.subsets]]"]
            for f in fields(TomlSubset):
                value = getattr(subset, f.name)
                lines.append(f"  {f.name} = {_toml_value(str(value) if f.name == 'image_dir' else value)}")
        lines.append("")
    return "\n".join(lines)


def save_dataset_config(config: DatasetConfig, path: str | Path) -> Path:
    return write_text(path, dumps_dataset_config(config))


def config_from_settings(info: DatasetInfo, settings) -> DatasetConfig:
    """The TOML equivalent of scanned ``N_name`` folders and the settings (``TrainingSettings``)."""
    img, labels = settings.images, settings.labels
    subsets = [
        TomlSubset(image_dir=s.folder.resolve(), num_repeats=s.repeats, class_tokens=s.class_tokens,
                   is_reg=s.is_reg, caption_extension=labels.caption_extension,
                   keep_tokens=labels.keep_tokens, shuffle_caption=labels.shuffle_caption,
                   flip_aug=img.flip_aug, color_aug=img.color_aug, random_crop=img.random_crop)
        for s in info.subsets
    ]
    dataset = TomlDataset(
        resolution=img.resolution_wh, batch_size=settings.training.batch_size, enable_bucket=img.buckets,
        min_bucket_reso=img.min_bucket_resolution, max_bucket_reso=img.max_bucket_resolution,
        bucket_reso_steps=img.bucket_reso_steps, bucket_no_upscale=img.bucket_no_upscale, subsets=subsets)
    return DatasetConfig([dataset])


# --- the equivalent folders and settings ----------------------------------------------------------


@dataclass
class FolderLayout:
    """What a dataset config becomes: folders of ``N_name`` subfolders and setting values
    (``"group.field": value``), with notes on what could not be kept."""

    img_folder: Path
    reg_folder: Path | None
    settings: dict[str, Any]
    notes: list[str]

    def apply(self, settings):
        """``settings`` (``TrainingSettings``) with these values; validated like a settings file."""
        from lora_gui.settings import io

        changes: dict[str, dict[str, Any]] = {}
        for key, value in {**self.settings, "model.img_folder": str(self.img_folder),
                           "model.reg_img_folder": str(self.reg_folder or "")}.items():
            group, name = key.split(".")
            changes.setdefault(group, {})[name] = value
        return io.validate_document(io.overlay(io.to_document(settings), changes))


def _shared_settings(dataset: TomlDataset, notes: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {DATASET_KEYS[k]: getattr(dataset, k) for k in DATASET_KEYS}
    if dataset.resolution:
        w, h = dataset.resolution
        values["images.resolution"] = str(w) if w == h else f"{w},{h}"
    first = next((s for s in dataset.subsets if not s.is_reg), dataset.subsets[0])
    for key, setting in SHARED_SUBSET_KEYS.items():
        values[setting] = getattr(first, key)
        others = sorted({str(getattr(s, key)) for s in dataset.subsets} - {str(values[setting])})
        if others and key != "caption_extension":  # captions are linked under one extension
            notes.append(f"The subsets disagree on {key} ({values[setting]} and {', '.join(others)}): "
                         f"lora-gui has one {setting} for all folders, {values[setting]} is used.")
    return values


def _folder_name(subset: TomlSubset) -> str:
    tokens = subset.class_tokens.strip() or subset.image_dir.name
    return f"{subset.num_repeats}_{_UNSAFE_IN_NAME.sub(' ', tokens).strip()}"


def _link(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise DatasetError(f"Two subsets both give {target.name} to the folder {target.parent}: give "
                           "them different class_tokens or num_repeats, or rename one of the files.")
    try:
        os.symlink(source, target)
    except OSError:  # a file system or Windows account without symlinks: copy
        shutil.copy2(source, target)


def _fill(folder: Path, subset: TomlSubset, extension: str) -> int:
    if not subset.image_dir.is_dir():
        raise DatasetError(f"The subset folder {subset.image_dir} does not exist: fix image_dir in the TOML.")
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for image in sorted(subset.image_dir.iterdir()):
        if image.name.startswith(".") or image.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        _link(image, folder / image.name)
        caption = image.with_name(image.stem + subset.caption_extension)
        if caption.is_file():  # renamed to the one caption extension lora-gui reads
            _link(caption, folder / (image.stem + extension))
        count += 1
    return count


def link_subsets(subsets: list[TomlSubset], dest: str | Path, extension: str) -> tuple[Path, Path | None]:
    """Build ``dest/img/N_name`` (and ``dest/reg/N_name``) folders of links to the subsets' images
    and captions (captions renamed to ``extension``); ``dest`` must be new or empty. Returns the
    image folder and the regularisation folder (None without regularisation subsets)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError(f"{dest} is not empty: choose a new folder for the dataset.")
    for subset in subsets:
        _fill(dest / ("reg" if subset.is_reg else "img") / _folder_name(subset), subset, extension)
    return dest / "img", (dest / "reg" if any(s.is_reg for s in subsets) else None)


def to_folder_layout(config: DatasetConfig, dest: str | Path) -> FolderLayout:
    """The first dataset of ``config`` as ``N_name`` folders of links in ``dest``
    (:func:`link_subsets`) and its settings. Edits through the links change the originals."""
    notes = list(config.notes)
    if len(config.datasets) > 1:
        notes.append(f"The config has {len(config.datasets)} [[datasets]]: lora-gui trains one, the "
                     "first is imported; import the others separately.")
    dataset = config.datasets[0]
    values = _shared_settings(dataset, notes)
    img, reg = link_subsets(dataset.subsets, dest, values["labels.caption_extension"])
    return FolderLayout(img, reg, values, notes)
