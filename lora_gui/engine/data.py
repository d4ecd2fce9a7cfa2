"""The training dataset: repeats, regularisation, validation split, batches, latent cache.

Everything the web process needs (scan, buckets, captions, summary) lives in the torch-free package
:mod:`lora_gui.dataset`. This module imports torch lazily, inside the functions that build tensors,
so importing it stays cheap.

Determinism: the batches of an epoch are a pure function of (seed, epoch), and every random choice
for a sample (flip, crop, hue, caption shuffle/dropout) comes from an RNG seeded with
(seed, epoch, batch_index, position). A resumed run that skips the first k batches of an epoch sees
exactly the data it would have seen, whatever was loaded before and however many workers load it.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_gui.atomic import atomic_open
from lora_gui.dataset.buckets import Bucket, BucketOptions
from lora_gui.dataset.captions import CaptionOptions
from lora_gui.dataset.images import (
    crop_top_left,
    find_mask,
    load_image_array,
    load_mask_array,
    random_hue_shift,
)
from lora_gui.dataset.scan import DatasetInfo, ImageEntry, Subset
from lora_gui.dataset.summary import (
    DatasetSummary,
    count_batches,
    dataset_summary,
    derive_seed,
    plan_buckets,
    reg_schedule,
    split_validation,
)

if TYPE_CHECKING:
    import torch

    from lora_gui.settings import TrainingSettings

__all__ = ["Batch", "DataOptions", "EpochView", "Item", "LatentCache", "TrainDataset", "summarize"]

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class DataOptions:
    """The data settings of a run, built from the settings by :meth:`from_settings` only: the bucket
    and caption options, and the settings of the same name from ``images`` and ``training``.

    No defaults and no checks of its own: the schema declares and checks every value.
    """

    buckets: BucketOptions
    captions: CaptionOptions
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    batch_size: int
    seed: int
    validation_split: float
    masked_loss: bool
    mask_folder: Path | None  # None: the images' alpha channels are the masks
    image_root: Path | None  # the image folder, which the mask folder mirrors

    @classmethod
    def from_settings(cls, settings: TrainingSettings) -> DataOptions:
        paths = {"mask_folder": settings.advanced.mask_folder, "image_root": settings.model.img_folder}
        same = {f.name: settings.get(f.name) for f in fields(cls)
                if f.name not in ("buckets", "captions", *paths)}
        return cls(buckets=BucketOptions.from_settings(settings),
                   captions=CaptionOptions.from_settings(settings),
                   **{k: Path(v).expanduser() if v.strip() else None for k, v in paths.items()}, **same)


@dataclass(frozen=True)
class Item:
    """One sample of an epoch (an image with its bucket and raw caption). Cheap to pickle."""

    path: Path
    caption: str
    bucket: Bucket
    is_reg: bool
    trigger_words: str = ""
    size: tuple[int, int] = (0, 0)  # the image's upright (width, height) before resizing


@dataclass
class Batch:
    """A loaded batch: ``pixels`` [B,3,H,W] in [-1, 1], or ``latents`` [B,4,H/8,W/8] (scaled)."""

    captions: list[str]
    is_reg: torch.Tensor
    bucket: Bucket
    paths: list[Path]
    flipped: list[bool]
    pixels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [B,1,H,W] in [0, 1] with masked_loss
    # Where each sample's pixels came from (SDXL conditions on them): the image's (height, width)
    # before resizing and the (top, left) pixels cut from the resized image, as the sample shows it.
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crop_top_lefts: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Draw:
    """The random choices for one sample."""

    flip: bool
    crop_position: tuple[float, float] | None
    hue_shift: float
    caption: str


class TrainDataset:
    """Items, per-epoch batches and batch loading for a scanned dataset."""

    def __init__(self, info: DatasetInfo, options: DataOptions) -> None:
        self.info = info
        self.options = options
        self.bucket_of = plan_buckets(info, options.buckets)
        train_images = [(s, i) for s in info.train_subsets for i in s.images]
        self.held_out = split_validation(
            [i.path for _, i in train_images], options.validation_split, options.seed
        )
        self.warnings: list[str] = []
        if options.validation_split > 0 and not self.held_out:
            self.warnings.append(
                "No validation images were held out: a validation split needs at least 2 images."
            )
        trigger = info.trigger_words
        self.train_items = [
            self._item(s, i, trigger)
            for s, i in train_images
            if i.path not in self.held_out
            for _ in range(s.repeats)
        ]
        reg = [(self._item(s, i, ""), s.repeats) for s in info.reg_subsets for i in s.images]
        self.reg_items = reg_schedule(reg, len(self.train_items))  # sd-scripts' order and repeats
        self._validation = [self._item(s, i, trigger) for s, i in train_images if i.path in self.held_out]
        self._masks = self._find_masks() if options.masked_loss and options.mask_folder else {}
        self._step_plan: tuple[int, int, int] | None = None
        self.latent_cache: LatentCache | None = None

    def set_step_plan(self, steps_per_epoch: int, accumulation: int, total_steps: int) -> None:
        """The run's step plan, so that a batch knows its optimizer step (epoch x steps per epoch +
        batch // accumulation): the tag warm-up depends on it, and a resumed run computes the same."""
        self._step_plan = (steps_per_epoch, accumulation, total_steps)

    def _find_masks(self) -> dict[Path, Path]:
        """image -> mask file below the mask folder, for every training image (regularisation
        images have no masks there: their loss counts everywhere)."""
        from lora_gui.dataset.scan import IMAGE_EXTENSIONS, DatasetError

        o, masks = self.options, {}
        for subset in self.info.train_subsets:
            for image in subset.images:
                try:
                    relative = image.path.relative_to(o.image_root)
                except ValueError:
                    relative = Path(image.path.name)
                mask = find_mask(o.mask_folder, relative, IMAGE_EXTENSIONS)
                if mask is None:
                    raise DatasetError(f"advanced.mask_folder: there is no mask for {image.path.name} (expected "
                                       f"{o.mask_folder / relative}, any image format): add it or clear the "
                                       "mask folder to use the images' alpha channels.")
                masks[image.path] = mask
        return masks

    def _mask(self, item: Item, draw: _Draw):
        """The loss mask of one sample: from the mask folder, or the image's alpha channel."""
        if self.options.mask_folder is None:
            return load_mask_array(item.path, item.bucket, alpha=True, flip=draw.flip,
                                   crop_position=draw.crop_position)
        if item.path not in self._masks:  # a regularisation image: everywhere
            return np.ones((1, item.bucket[1], item.bucket[0]), dtype=np.float32)
        return load_mask_array(self._masks[item.path], item.bucket, alpha=False, flip=draw.flip,
                               crop_position=draw.crop_position)

    def _item(self, subset: Subset, image: ImageEntry, trigger: str) -> Item:
        return Item(image.path, subset.caption_for(image), self.bucket_of[image.path], subset.is_reg, trigger,
                    (image.width, image.height))

    # --- plans ------------------------------------------------------------------------------------

    def bucket_counts(self) -> dict[Bucket, int]:
        """Samples per bucket in every epoch (train + reg)."""
        counts: dict[Bucket, int] = defaultdict(int)
        for item in self.train_items + self.reg_items:
            counts[item.bucket] += 1
        return dict(counts)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return count_batches(self.bucket_counts(), self.options.batch_size)

    @property
    def num_train_images(self) -> int:
        return len({item.path for item in self.train_items})

    @property
    def num_reg_images(self) -> int:
        return self.info.num_reg_images

    def epoch_batches(self, epoch: int, batch_size: int | None = None) -> list[list[Item]]:
        """The batches of ``epoch``: a pure function of (seed, epoch, batch size).

        Items are shuffled, grouped by bucket (a batch never mixes buckets), cut into batches (the
        last batch of a bucket may be short), and the batches are shuffled. ``batch_size``: the
        global batch of a run on several processes (batch_size x processes), else the setting.
        """
        rng = random.Random(derive_seed(self.options.seed, "epoch", epoch))
        by_bucket: dict[Bucket, list[Item]] = defaultdict(list)
        for item in self.train_items + self.reg_items:
            by_bucket[item.bucket].append(item)
        size = batch_size or self.options.batch_size
        batches = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            batches += [items[i : i + size] for i in range(0, len(items), size)]
        rng.shuffle(batches)
        return batches

    def validation_items(self) -> list[Item]:
        """The held-out images, one item each (no repeats)."""
        return list(self._validation)

    def validation_batches(self) -> list[list[Item]]:
        """Validation items grouped by bucket into batches, in a fixed order."""
        by_bucket: dict[Bucket, list[Item]] = defaultdict(list)
        for item in self._validation:
            by_bucket[item.bucket].append(item)
        size = self.options.batch_size
        return [
            items[i : i + size]
            for bucket, items in sorted(by_bucket.items())
            for i in range(0, len(items), size)
        ]

    def epoch_view(self, epoch: int, skip_batches: int = 0) -> EpochView:
        """A map-style dataset of loaded batches (for ``DataLoader(view, batch_size=None)``)."""
        return EpochView(self, epoch, skip_batches)

    # --- loading ----------------------------------------------------------------------------------

    def _draw(self, item: Item, epoch: int, batch_index: int, position: int) -> _Draw:
        o = self.options
        rng = random.Random(derive_seed(o.seed, "sample", epoch, batch_index, position))
        flip = o.flip_aug and rng.random() < 0.5
        crop = (rng.random(), rng.random()) if o.random_crop else None
        hue = random_hue_shift(rng) if o.color_aug else 0.0
        step = None
        if self._step_plan is not None:  # the optimizer step this batch is trained at (tag warm-up)
            steps_per_epoch, accumulation, total = self._step_plan
            step = epoch * steps_per_epoch + batch_index // accumulation
        caption = o.captions.apply(item.caption, item.trigger_words, epoch, rng, step,
                                   self._step_plan[2] if self._step_plan else 0)
        return _Draw(flip, crop, hue, caption)

    def fixed_caption(self, item: Item) -> str:
        """The caption as used without randomness (validation, and the text-encoder cache)."""
        return self._fixed_draw(item).caption

    def _fixed_draw(self, item: Item) -> _Draw:
        caption = self.options.captions.plain(item.caption, item.trigger_words)
        return _Draw(False, None, 0.0, caption)

    def load_batch(
        self, items: Sequence[Item], epoch: int = 0, batch_index: int = 0, *, augment: bool = True,
        first_position: int = 0,
    ) -> Batch:
        """Load one batch. ``augment=False`` (validation): fixed caption, centre crop, no flip.
        ``first_position``: the first item's place in its global batch (one process's slice of it),
        so a sample's random choices do not depend on how the batch is split between processes."""
        import torch

        if not items:
            raise ValueError("load_batch needs at least one item.")
        buckets = {item.bucket for item in items}
        if len(buckets) != 1:
            raise ValueError(f"a batch must not mix buckets (got {sorted(buckets)}).")
        draws = [
            self._draw(item, epoch, batch_index, pos) if augment else self._fixed_draw(item)
            for pos, item in enumerate(items, start=first_position)
        ]
        batch = Batch(
            captions=[d.caption for d in draws],
            is_reg=torch.tensor([item.is_reg for item in items], dtype=torch.bool),
            bucket=items[0].bucket,
            paths=[item.path for item in items],
            flipped=[d.flip for d in draws],
            original_sizes=[(i.size[1], i.size[0]) for i in items],
            crop_top_lefts=[crop_top_left(i.size, i.bucket, d.crop_position, d.flip) for i, d in zip(items, draws)],
        )
        if self.latent_cache is not None:
            batch.latents = torch.stack(
                [self.latent_cache.get(i.path, i.bucket, d.flip) for i, d in zip(items, draws)]
            )
        else:
            arrays = [
                load_image_array(
                    i.path, i.bucket, flip=d.flip, crop_position=d.crop_position, hue_shift=d.hue_shift
                )
                for i, d in zip(items, draws)
            ]
            batch.pixels = torch.from_numpy(np.stack(arrays))
        if self.options.masked_loss:
            batch.mask = torch.from_numpy(np.stack([self._mask(i, d) for i, d in zip(items, draws)]))
        return batch

    # --- latent cache -----------------------------------------------------------------------------

    def cache_requests(self) -> list[tuple[Path, Bucket, bool]]:
        """Every (image, bucket, flip) a run can ask for: flipped too with flip_aug."""
        flips = (False, True) if self.options.flip_aug else (False,)
        seen: dict[tuple[Path, Bucket, bool], None] = {}
        for item in self.train_items + self.reg_items:
            for flip in flips:
                seen[(item.path, item.bucket, flip)] = None
        for item in self._validation:
            seen[(item.path, item.bucket, False)] = None
        return list(seen)

    def _check_cacheable(self) -> None:
        # The settings layer refuses this combination first; this guards direct engine use.
        if self.options.color_aug or self.options.random_crop:
            raise ValueError(
                "color_aug and random_crop change the pixels every time and cannot be used with "
                "cached latents: turn them off or turn off cache_latents."
            )

    def attach_latent_cache(self, cache: LatentCache) -> None:
        """Load latents from ``cache`` instead of pixels (which must hold :meth:`cache_requests`)."""
        self._check_cacheable()
        self.latent_cache = cache

    def cache_latents(
        self, vae: Any, *, to_disk: bool = False, on_progress: ProgressCallback | None = None, **kwargs: Any
    ) -> LatentCache:
        """Build a :class:`LatentCache` for this dataset with ``vae`` and attach it."""
        self._check_cacheable()
        cache = LatentCache(vae, to_disk=to_disk, **kwargs)
        cache.build(self.cache_requests(), on_progress=on_progress)
        self.attach_latent_cache(cache)
        return cache


class EpochView:
    """Batches of one epoch as a sequence, from ``skip_batches`` on (resume mid-epoch)."""

    def __init__(self, dataset: TrainDataset, epoch: int, skip_batches: int = 0) -> None:
        self.dataset, self.epoch, self.skip = dataset, epoch, skip_batches
        self.batches = dataset.epoch_batches(epoch)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch_index = index + self.skip
        return self.dataset.load_batch(self.batches[batch_index], self.epoch, batch_index)


# --- latent cache ---------------------------------------------------------------------------------

_CACHE_VERSION = 1
_CACHE_SUFFIX = ".lora-latents.npz"


def latent_normalise(vae: Any, latents):
    """What the denoiser sees: (latents - shift) * scale, with the VAE's own shift (Flux's VAE has
    one, 0.1159; SD's has none) and scaling factor."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _vae_fingerprint(vae: Any) -> str:
    """Cheap identity of a VAE's weights (first and last parameter tensors + scaling factor)."""
    import hashlib

    params = list(vae.parameters())
    digest = hashlib.sha256(str(vae.config.scaling_factor).encode())
    if getattr(vae.config, "shift_factor", None):
        digest.update(str(vae.config.shift_factor).encode())
    for p in (params[0], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(eq=False)
class LatentCache:
    """VAE latents of each (image, bucket, flip), encoded once, kept in memory, optionally on disk.

    Latents are ``latent_dist.mean * scaling_factor`` (deterministic) by default; with
    ``sample_seed`` they are a sample, mean + std * noise, the noise seeded per (image, bucket,
    flip) so it does not depend on batching. On disk each (image, bucket) is one file next to the
    image, ``<image file name>.<w>x<h>.lora-latents.npz``, holding the latent (and the flipped one)
    with the image's size and mtime, the VAE's fingerprint and the mode; any mismatch re-encodes.
    """

    vae: Any
    to_disk: bool = False
    sample_seed: int | None = None
    batch_size: int = 4
    memory: dict[tuple[str, Bucket, bool], Any] = field(default_factory=dict)
    encoded: int = 0
    loaded_from_disk: int = 0
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fingerprint = _vae_fingerprint(self.vae)
        self.mode = "mean" if self.sample_seed is None else f"sample:{self.sample_seed}"
        self._resolved: dict[Any, str] = {}  # path -> resolved path string, for get()

    @staticmethod
    def disk_path(path: str | Path, bucket: Bucket) -> Path:
        path = Path(path)
        return path.with_name(f"{path.name}.{bucket[0]}x{bucket[1]}{_CACHE_SUFFIX}")

    @staticmethod
    def _key(path: str | Path, bucket: Bucket, flip: bool) -> tuple[str, Bucket, bool]:
        return (str(Path(path).resolve()), tuple(bucket), bool(flip))  # type: ignore[return-value]

    def __contains__(self, request: tuple[Path, Bucket, bool]) -> bool:
        return self._key(*request) in self.memory

    def get(self, path: str | Path, bucket: Bucket, flip: bool = False) -> torch.Tensor:
        # Training asks for the same paths every epoch; resolving one is a file-system call (~35 us),
        # so each path is resolved once.
        resolved = self._resolved.get(path)
        if resolved is None:
            resolved = self._resolved[path] = self._key(path, bucket, flip)[0]
        try:
            return self.memory[(resolved, tuple(bucket), bool(flip))]
        except KeyError:
            raise KeyError(
                f"no cached latent for {path} at {bucket[0]}x{bucket[1]} (flip={flip}): build the cache "
                "for every item first."
            ) from None

    def _meta(self, path: Path, bucket: Bucket) -> dict[str, Any]:
        stat = path.stat()
        return {
            "version": _CACHE_VERSION,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "bucket": list(bucket),
            "vae": self.fingerprint,
            "mode": self.mode,
        }

    def _load_disk(self, path: Path, bucket: Bucket, flips: Sequence[bool]) -> bool:
        """Load (path, bucket) from disk when the file is current and holds every flip asked for."""
        import torch

        file = self.disk_path(path, bucket)
        if not file.is_file():
            return False
        try:
            with np.load(file) as data:
                if json.loads(str(data["meta"])) != self._meta(path, bucket):
                    return False
                names = {False: "latent", True: "latent_flipped"}
                if any(names[f] not in data.files for f in flips):
                    return False
                for flip in (False, True):
                    if names[flip] in data.files:
                        self.memory[self._key(path, bucket, flip)] = torch.from_numpy(
                            data[names[flip]].copy()
                        )
        except (OSError, ValueError, KeyError):
            return False  # damaged or foreign file: encode again
        return True

    def _save_disk(self, path: Path, bucket: Bucket) -> None:
        arrays = {"meta": np.array(json.dumps(self._meta(path, bucket)))}
        for flip, name in ((False, "latent"), (True, "latent_flipped")):
            latent = self.memory.get(self._key(path, bucket, flip))
            if latent is not None:
                arrays[name] = latent.numpy()
        file = self.disk_path(path, bucket)
        try:
            with atomic_open(file, "wb") as handle:
                np.savez(handle, **arrays)
        except OSError as exc:
            self.warnings.append(
                f"Could not write the latent cache file {file} ({exc}): kept in memory only."
            )

    def _encode(self, requests: Sequence[tuple[Path, Bucket, bool]]) -> None:
        import torch

        param = next(self.vae.parameters())
        pixels = torch.from_numpy(np.stack([load_image_array(p, b, flip=f) for p, b, f in requests]))
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist
            latents = dist.mean
            if self.sample_seed is not None:
                noise = torch.stack(
                    [
                        torch.randn(
                            latents.shape[1:],
                            generator=torch.Generator().manual_seed(
                                derive_seed(self.sample_seed, str(p), b, f) % 2**63
                            ),
                        )
                        for p, b, f in requests
                    ]
                )
                latents = latents + dist.std * noise.to(latents.device, latents.dtype)
            latents = latent_normalise(self.vae, latents).float().cpu()
        for request, latent in zip(requests, latents):
            self.memory[self._key(*request)] = latent.clone()
        self.encoded += len(requests)

    def build(
        self, requests: Iterable[tuple[Path, Bucket, bool]], on_progress: ProgressCallback | None = None
    ) -> int:
        """Make sure every (image, bucket, flip) is cached; returns how many were encoded now."""
        groups: dict[tuple[Path, Bucket], list[bool]] = defaultdict(list)
        for path, bucket, flip in requests:
            if flip not in groups[(Path(path), tuple(bucket))]:
                groups[(Path(path), tuple(bucket))].append(flip)  # type: ignore[index]
        total = sum(len(flips) for flips in groups.values())
        done, before = 0, self.encoded
        todo: dict[Bucket, list[tuple[Path, Bucket, bool]]] = defaultdict(list)
        for (path, bucket), flips in groups.items():
            missing = [f for f in flips if self._key(path, bucket, f) not in self.memory]
            if missing and self.to_disk and self._load_disk(path, bucket, missing):
                self.loaded_from_disk += len(missing)
                missing = []
            todo[bucket] += [(path, bucket, f) for f in missing]
            done += len(flips) - len(missing)
        if on_progress:
            on_progress(done, total)
        for bucket in sorted(todo):
            requests_ = todo[bucket]
            for i in range(0, len(requests_), self.batch_size):
                chunk = requests_[i : i + self.batch_size]
                self._encode(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done, total)
            if self.to_disk:
                for path in dict.fromkeys(p for p, _, _ in requests_):
                    self._save_disk(path, bucket)
        return self.encoded - before


def summarize(info: DatasetInfo, options: DataOptions) -> DatasetSummary:
    """:func:`dataset_summary` with the same options as a :class:`TrainDataset`."""
    return dataset_summary(info, options.buckets, batch_size=options.batch_size,
                           validation_split=options.validation_split, seed=options.seed)
