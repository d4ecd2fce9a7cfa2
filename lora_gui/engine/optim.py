"""Optimizers and learning-rate schedulers, by the names users know from kohya_ss."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from lora_gui.settings import TrainingSettings


class OptimizerSettingError(ValueError):
    """A sentence naming the optimizer setting that is wrong."""


def _adamw8bit():
    import bitsandbytes as bnb

    # min_8bit_size=0: small tensors (LoRA layers are small) also get 8-bit state.
    return bnb.optim.AdamW8bit, {"min_8bit_size": 0}


def _lion():
    import bitsandbytes as bnb

    return bnb.optim.Lion, {}


def _prodigy():
    import prodigyopt

    return prodigyopt.Prodigy, {}


def _dadapt_adam():
    import dadaptation

    return dadaptation.DAdaptAdam, {}


def _adafactor():
    from transformers.optimization import Adafactor

    return Adafactor, {"relative_step": False, "scale_parameter": False, "warmup_init": False}


# The schema's training.optimizer choices -> (optimizer class, fixed keyword arguments), imported
# only when chosen. tests/test_engine_tables.py checks the keys against the schema.
OPTIMIZERS = {
    "AdamW": lambda: (torch.optim.AdamW, {}),
    "AdamW8bit": _adamw8bit,
    "Lion": _lion,
    "SGDNesterov": lambda: (torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),
    "Prodigy": _prodigy,
    "DAdaptAdam": _dadapt_adam,
    "Adafactor": _adafactor,
}


def _optimizer_class(name: str):
    if name not in OPTIMIZERS:
        raise OptimizerSettingError(f"training.optimizer: {name!r} is not supported")
    return OPTIMIZERS[name]()


def build_optimizer(settings: TrainingSettings, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``groups`` are torch param groups with their own ``lr``."""
    name = settings.training.optimizer
    cls, kwargs = _optimizer_class(name)
    user = dict(settings.optimizer_kwargs)
    if name == "Adafactor" and settings.training.lr_scheduler == "adafactor":
        # Adafactor's own schedule: relative steps, the LR comes from the optimizer itself.
        kwargs.update(relative_step=True, scale_parameter=True, warmup_init=True)
        groups = [{**g, "lr": None} for g in groups]
    kwargs.update(user)
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in user if k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise OptimizerSettingError(
            f"training.optimizer_args: {name} has no argument {', '.join(map(repr, unknown))}: "
            f"remove it (accepted: {', '.join(k for k in accepted if k not in ('self', 'params'))})")
    try:
        return cls(groups, lr=groups[0]["lr"], **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptimizerSettingError(f"training.optimizer_args: {name} refused the arguments "
                                    f"({exc}): check their names and values") from None


def build_scheduler(settings: TrainingSettings, optimizer, total_steps: int, num_processes: int = 1):
    t = settings.training
    if t.lr_scheduler == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr=t.learning_rate)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        t.lr_scheduler, optimizer,
        num_warmup_steps=settings.warmup_steps(total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
        num_cycles=t.lr_scheduler_num_cycles, power=t.lr_scheduler_power)


def clip_gradients(acc, params: list, max_norm: float) -> None:
    """``accelerate.clip_grad_norm_``; on the CPU the same computation (torch's total norm, then
    every gradient times clamp(max_norm / (norm + eps), max=1)) without the multiplication when
    the factor is exactly 1 (x * 1.0 == x): the usual case, and ~1 % of a small model's step.
    Reading the norm is free on the CPU; on a GPU it would wait for the device, so the GPU path
    is accelerate's."""
    utils = torch.nn.utils
    if acc.device.type != "cpu" or not hasattr(utils, "clip_grads_with_norm_"):
        acc.clip_grad_norm_(params, max_norm)
        return
    total = utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
    # Skipped only when the factor is certainly above 1 (whatever eps <= 1e-5 torch uses);
    # never for a norm that is not finite.
    if not float(total) + 1e-5 + 1e-3 * max_norm <= max_norm:
        utils.clip_grads_with_norm_(params, max_norm, total)
