"""The training step's shortcuts around accelerate, the DataLoader and TensorBoard do what the
long way did: the same optimizer calls, the same batches, the same scalars on disk."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_gui.engine.loader import EpochSampler, InProcessLoader
from lora_gui.engine.train import plain_optimizer


def _wrapped(scaler=None):
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    param = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([param], lr=0.1)
    return acc, AcceleratedOptimizer(inner, scaler=scaler), inner


def test_plain_optimizer_is_the_inner_one_only_when_accelerate_adds_nothing():
    acc, wrapped, inner = _wrapped()
    assert plain_optimizer(acc, wrapped) is inner
    assert plain_optimizer(acc, inner) is None  # not accelerate's wrapper: use it as it is
    wrapped.scaler = torch.amp.GradScaler("cpu")  # fp16: the scaler may skip a step
    assert plain_optimizer(acc, wrapped) is None
    from accelerate.utils import DistributedType

    xla = SimpleNamespace(distributed_type=DistributedType.XLA)
    assert plain_optimizer(xla, _wrapped()[1]) is None


class _Batches:
    def __init__(self, per_epoch: int) -> None:
        self.n = per_epoch

    def per_epoch(self) -> int:
        return self.n

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, index: int):
        epoch, batch = divmod(index, self.n)
        return batch, {"epoch": epoch, "items": [index * 10, index * 10 + 1]}, 2


@pytest.mark.parametrize("epoch, skip", [(0, 0), (2, 3)])
def test_in_process_loader_yields_what_a_dataloader_without_workers_does(epoch, skip):
    batches = _Batches(5)
    sampler = EpochSampler(5)
    sampler.epoch, sampler.skip = epoch, skip
    reference = torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=0,
                                            collate_fn=lambda b: b)
    loader = InProcessLoader(batches, sampler)
    assert list(loader) == list(reference) and len(loader) == len(reference) == 5 - skip
    assert [b for b, _, _ in loader] == list(range(skip, 5))
    assert next(iter(loader))[1]["epoch"] == epoch


def test_tensorboard_scalars_of_a_step_read_back_one_by_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lora_gui.engine.trackers import Trackers

    trackers = Trackers([SummaryWriter(str(tmp_path))])
    trackers.add_scalars({"loss/train": 0.5, "lr": 1e-4}, 1)
    trackers.add_scalars({"loss/train": 0.25, "lr": 2e-4, "max_norm/keys_scaled": 3.0}, 2)
    trackers.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert [(e.step, e.value) for e in acc.Scalars("max_norm/keys_scaled")] == [(2, 3.0)]
