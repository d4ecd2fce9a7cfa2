"""The run's batches as one DataLoader: its (persistent) workers serve every epoch, and an epoch
sampler starts each epoch at a given batch, which is how a resumed run continues mid-epoch."""

from __future__ import annotations

import torch

from lora_gui.engine.data import TrainDataset


class RunBatches(torch.utils.data.Dataset):
    """All batches of the run, indexed epoch * batches_per_epoch + batch: one DataLoader (and its
    persistent workers) serves every epoch; an epoch sampler picks the indices."""

    def __init__(self, dataset: TrainDataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self._epoch, self._batches = -1, []
        # The same for every epoch; computed once (asking epoch 0 again would evict the cached epoch).
        self._per_epoch = len(dataset.epoch_batches(0)[rank::world])

    def batches(self, epoch: int) -> list:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.dataset.epoch_batches(epoch)[self.rank::self.world]
        return self._batches

    def per_epoch(self) -> int:
        return self._per_epoch

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, index: int):
        per = self.per_epoch()
        epoch, batch = divmod(index, per)
        return batch, self.dataset.load_batch(self.batches(epoch)[batch], epoch, batch)


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self, per_epoch: int):
        self.per_epoch, self.epoch, self.skip = per_epoch, 0, 0

    def __iter__(self):
        start = self.epoch * self.per_epoch
        return iter(range(start + self.skip, start + self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch - self.skip


def make_loader(run_batches: RunBatches, num_workers: int, persistent_workers: bool):
    """(loader, sampler): set ``sampler.epoch`` and ``sampler.skip`` before iterating an epoch."""
    sampler = EpochSampler(run_batches.per_epoch())
    loader = torch.utils.data.DataLoader(
        run_batches, batch_size=None, sampler=sampler, num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0, collate_fn=_identity)
    return loader, sampler


def _identity(batch):
    return batch
