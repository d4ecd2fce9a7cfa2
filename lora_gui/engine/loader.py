"""The run's batches as one DataLoader: its (persistent) workers serve every epoch, and an epoch
sampler starts each epoch at a given batch, which is how a resumed run continues mid-epoch."""

from __future__ import annotations

import torch

from lora_gui.engine.data import TrainDataset


class RunBatches(torch.utils.data.Dataset):
    """All batches of the run, indexed epoch * batches_per_epoch + batch: one DataLoader (and its
    persistent workers) serves every epoch; an epoch sampler picks the indices.

    On ``world`` processes the epoch is cut into global batches of batch_size x world (per bucket,
    exactly as one process with that batch size would cut it) and process ``rank`` loads the
    slice ``[rank * batch_size, (rank + 1) * batch_size)`` of each: every process makes the same
    number of steps, every sample is seen exactly once per epoch, and batch 1 x 2 processes sees
    the same data as batch 2 x 1 process. A bucket's short last batch may leave a process an empty
    slice (item ``None``): it then contributes no gradient to that step.
    """

    def __init__(self, dataset: TrainDataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.batch_size = dataset.options.batch_size
        self._epoch, self._batches = -1, []
        # The same for every epoch; computed once (asking epoch 0 again would evict the cached epoch).
        self._per_epoch = len(self.global_batches(0))

    def global_batches(self, epoch: int) -> list:
        return self.dataset.epoch_batches(epoch, self.batch_size * self.world)

    def batches(self, epoch: int) -> list:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.global_batches(epoch)
        return self._batches

    def slice(self, global_batch: list) -> list:
        return global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def per_epoch(self) -> int:
        return self._per_epoch

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, index: int):
        """(batch index, this process's loaded slice or None, the global batch's size)."""
        epoch, batch = divmod(index, self.per_epoch())
        whole = self.batches(epoch)[batch]
        items = self.slice(whole)
        first = self.rank * self.batch_size
        loaded = self.dataset.load_batch(items, epoch, batch, first_position=first) if items else None
        return batch, loaded, len(whole)


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self, per_epoch: int):
        self.per_epoch, self.epoch, self.skip = per_epoch, 0, 0

    def __iter__(self):
        start = self.epoch * self.per_epoch
        return iter(range(start + self.skip, start + self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch - self.skip


class InProcessLoader:
    """What a DataLoader with no workers, ``batch_size=None`` and an identity collate yields
    (``run_batches[i]`` for each index of the sampler), without its per-batch bookkeeping (a
    profiler record and fetcher calls, ~0.1 ms a step on a tiny model)."""

    def __init__(self, run_batches: RunBatches, sampler: EpochSampler):
        self.run_batches, self.sampler = run_batches, sampler

    def __iter__(self):
        return map(self.run_batches.__getitem__, iter(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(run_batches: RunBatches, num_workers: int, persistent_workers: bool):
    """(loader, sampler): set ``sampler.epoch`` and ``sampler.skip`` before iterating an epoch."""
    sampler = EpochSampler(run_batches.per_epoch())
    if num_workers == 0:
        return InProcessLoader(run_batches, sampler), sampler
    loader = torch.utils.data.DataLoader(
        run_batches, batch_size=None, sampler=sampler, num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0, collate_fn=_identity)
    return loader, sampler


def _identity(batch):
    return batch
