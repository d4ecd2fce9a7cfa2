"""Optimizers, learning-rate schedulers and LoRA parameter groups, by the names kohya_ss users know.

Follows kohya-ss/sd-scripts ``library/train_util.py`` (``get_optimizer``, ``get_scheduler_fix``) and
``networks/lora.py`` (``LoRANetwork.prepare_optimizer_params``; the blocks are ``engine.blocks``) for what each name builds and with which defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lora_gui.engine.blocks import SD_BLOCKS, BlockLayout
from lora_gui.settings import TrainingSettings


class OptimizerSettingError(ValueError):
    """A sentence naming the optimizer setting that is wrong."""


# The schema's training.optimizer choices (sd-scripts' names, in the schema's order) -> (module,
# class, defaults that sd-scripts adds when optimizer_args do not set them), imported only when
# chosen; tests/test_engine_tables.py checks the keys against the schema. "Lion" is the 32-bit Lion
# of bitsandbytes (same update and defaults as lion_pytorch's, which sd-scripts imports).
_NESTEROV = {"nesterov": True, "momentum": 0.9}
OPTIMIZERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "AdamW": ("torch.optim", "AdamW", {}),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", {}),
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW", {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", {}),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit", {}),
    "Lion": ("bitsandbytes.optim", "Lion", {}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", {}),
    "SGDNesterov": ("torch.optim", "SGD", _NESTEROV),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit", _NESTEROV),
    "Prodigy": ("prodigyopt", "Prodigy", {}),
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", {}),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad", {}),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan", {}),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP", {}),
    "DAdaptLion": ("dadaptation", "DAdaptLion", {}),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD", {}),
    "Adafactor": ("transformers.optimization", "Adafactor", {}),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", {}),
    "RAdamScheduleFree": ("schedulefree", "RAdamScheduleFree", {}),
    "SGDScheduleFree": ("schedulefree", "SGDScheduleFree", {}),
    "CAME": ("pytorch_optimizer", "CAME", {}),
}
# A dotted class path ("pytorch_optimizer.CAME", as kohya_ss's dropdown offers) is imported only
# from these packages: an optimizer name must never be a way to import arbitrary code.
ALLOWED_OPTIMIZER_PACKAGES = ("torch.optim", "bitsandbytes.optim", "pytorch_optimizer", "schedulefree",
                              "prodigyopt", "prodigyplus", "dadaptation", "transformers.optimization",
                              "lion_pytorch", "came_pytorch")
ALLOWED_SCHEDULER_PACKAGES = ("torch.optim.lr_scheduler", "transformers.optimization",
                              "diffusers.optimization", "pytorch_optimizer")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def import_allowed(path: str, default_module: str, allowed: Iterable[str], setting: str):
    """The class named by ``path``: a plain name from ``default_module`` (as sd-scripts takes a bare
    optimizer name from torch.optim), or ``package.module.Class`` from an allow-listed package."""
    if "." not in path:
        module_name, attr = default_module, path
    elif _DOTTED.match(path):
        module_name, attr = path.rsplit(".", 1)
    else:
        raise OptimizerSettingError(f"{setting}: {path!r} is not a class name or a dotted class path.")
    if not any(module_name == p or module_name.startswith(p + ".") for p in allowed):
        raise OptimizerSettingError(
            f"{setting}: {path!r} is not in a known optimizer package; use a class from "
            f"{', '.join(allowed)}.")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError:
        raise OptimizerSettingError(f"{setting}: the package {module_name.split('.')[0]} of {path!r} "
                                    "is not installed: install it or choose another one.") from None
    except AttributeError:
        raise OptimizerSettingError(f"{setting}: {module_name} has no {attr!r}: check the name "
                                    "(it is case-sensitive).") from None
    if not inspect.isclass(cls):
        raise OptimizerSettingError(f"{setting}: {path!r} is not a class.")
    return cls


def optimizer_class(name: str):
    """The optimizer class and sd-scripts' default arguments for a name of OPTIMIZERS or a
    dotted class path."""
    if name in OPTIMIZERS:
        module, attr, defaults = OPTIMIZERS[name]
        return import_allowed(f"{module}.{attr}", "", ALLOWED_OPTIMIZER_PACKAGES,
                              "training.optimizer"), dict(defaults)
    cls = import_allowed(name, "torch.optim", ALLOWED_OPTIMIZER_PACKAGES, "training.optimizer")
    if not issubclass(cls, torch.optim.Optimizer):
        raise OptimizerSettingError(f"training.optimizer: {name!r} is not a torch optimizer.")
    return cls, {}


def adafactor_arguments(user: dict[str, Any]) -> dict[str, Any]:
    """Adafactor's arguments as sd-scripts ``get_optimizer`` completes them: ``relative_step``
    defaults to True (Adafactor then computes its own step size, min(1e-2, 1/sqrt(step)) x RMS of
    the parameter, and ignores the learning rate), and ``warmup_init=True`` forces it on.
    ``scale_parameter`` and ``warmup_init`` keep transformers' defaults (True, False)."""
    kwargs = dict(user)
    kwargs.setdefault("relative_step", True)
    if kwargs.get("warmup_init", False):
        kwargs["relative_step"] = True
    return kwargs


def is_relative_step_adafactor(optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


# The schedule-free optimizers' two mode methods (a method call on the optimizer, not Python's eval).
SCHEDULE_FREE_MODES = {True: "train", False: "eval"}


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers (Defazio et al. 2024) keep two points and must be switched between
    their training and averaged modes (their methods named ``SCHEDULE_FREE_MODES``) around training and
    evaluation (sd-scripts ``get_optimizer_train_eval_fn``). ``optimizer`` may be accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return all(callable(getattr(inner, name, None)) for name in SCHEDULE_FREE_MODES.values())


def set_optimizer_mode(optimizer, train: bool) -> None:
    """Put a schedule-free optimizer's parameters at its training point (``train``) or at the
    averaged point that is evaluated and saved; other optimizers have one point only."""
    if is_schedule_free(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)
        getattr(inner, SCHEDULE_FREE_MODES[train])()


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Inside: a schedule-free optimizer's parameters at the averaged point (what is evaluated and
    saved). Afterwards the training point comes back bit for bit (the eval/train interpolations
    would round), so evaluating or saving never changes the course of training."""
    if not is_schedule_free(optimizer):
        yield
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    snapshot = [p.detach().clone() for p in params]
    set_optimizer_mode(optimizer, False)
    try:
        yield
    finally:
        set_optimizer_mode(optimizer, True)
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)


def _check_arguments(cls, name: str, user: dict[str, Any]) -> None:
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [k for k in user if k not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise OptimizerSettingError(
            f"training.optimizer_args: {name} has no argument {', '.join(map(repr, unknown))}: "
            f"remove it (accepted: {', '.join(k for k in accepted if k not in ('self', 'params'))})")


def optimizer_record(settings: TrainingSettings) -> str:
    """``ss_optimizer`` as sd-scripts ``get_optimizer`` writes it: the class's module and name, then
    in brackets the arguments it passed besides the learning rate (sd-scripts' completions and the
    user's optimizer_args), 'key=value' joined by commas (SGDNesterov's nesterov=True is passed
    apart from them there, so it is not listed)."""
    name = settings.training.optimizer
    cls, defaults = optimizer_class(name)
    user = dict(settings.optimizer_kwargs)
    if name == "Adafactor":
        kwargs = adafactor_arguments(user)
    else:
        kwargs = {**{k: v for k, v in defaults.items() if k != "nesterov"}, **user}
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def build_optimizer(settings: TrainingSettings, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (torch param groups, each with its own ``lr``), as sd-scripts
    ``get_optimizer``: the user's ``optimizer_args`` over sd-scripts' defaults for that name."""
    name = settings.training.optimizer
    cls, kwargs = optimizer_class(name)
    user = dict(settings.optimizer_kwargs)
    _check_arguments(cls, name, user)
    kwargs.update(user)
    lr = groups[0]["lr"] if groups else settings.training.learning_rate
    if name == "Adafactor":
        kwargs = adafactor_arguments(user)
        if kwargs["relative_step"]:
            # The step size is Adafactor's own; sd-scripts drops every group's LR.
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
            lr = None
    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptimizerSettingError(f"training.optimizer_args: {name} refused the arguments "
                                    f"({exc}): check their names and values") from None
    set_optimizer_mode(optimizer, True)
    return optimizer


def build_scheduler(settings: TrainingSettings, optimizer, total_steps: int, num_processes: int = 1):
    """The LR scheduler, as sd-scripts ``get_scheduler_fix``: a relative-step Adafactor always gets
    its own schedule (whatever ``lr_scheduler`` says), a schedule-free optimizer a constant one (it
    warms up itself), ``lr_scheduler_type`` a class of torch (or an allow-listed package) built with
    ``lr_scheduler_args``, any other name diffusers' or transformers' scheduler of that name."""
    t = settings.training
    warmup = settings.warmup_steps(total_steps) * num_processes
    extra = scheduler_arguments(settings)
    if is_relative_step_adafactor(optimizer):
        from transformers.optimization import AdafactorSchedule

        if warmup:
            raise OptimizerSettingError(
                "training.lr_warmup_steps: Adafactor with relative steps makes its own schedule, which "
                "has no warm-up: set the warm-up to 0, or add relative_step=False to optimizer_args.")
        return AdafactorSchedule(optimizer, initial_lr=t.learning_rate)
    if t.lr_scheduler == "adafactor":
        raise OptimizerSettingError("training.lr_scheduler: 'adafactor' is the schedule of Adafactor with "
                                    "relative_step=True: remove relative_step=False from optimizer_args "
                                    "or choose another scheduler.")
    if type(optimizer).__name__.endswith("ScheduleFree"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    custom = t.lr_scheduler_type.strip()
    if custom:
        cls = import_allowed(custom, "torch.optim.lr_scheduler", ALLOWED_SCHEDULER_PACKAGES,
                             "training.lr_scheduler_type")
        return _construct(cls, optimizer, extra, "training.lr_scheduler_args")
    return _named_scheduler(t, optimizer, warmup, total_steps * num_processes, extra)


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


def scheduler_arguments(settings: TrainingSettings) -> dict[str, Any]:
    """``lr_scheduler_args`` read as sd-scripts reads them: key=value pairs, literal values."""
    from lora_gui.settings.schema import parse_optimizer_args

    try:
        return parse_optimizer_args(settings.training.lr_scheduler_args)
    except ValueError as exc:
        raise OptimizerSettingError(f"training.lr_scheduler_args: {exc}") from None


def _construct(factory: Callable, optimizer, kwargs: dict[str, Any], setting: str):
    try:
        return factory(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise OptimizerSettingError(f"{setting}: the scheduler refused the arguments ({exc}): check "
                                    "their names and values") from None


def _named_scheduler(t, optimizer, warmup: int, total: int, extra: dict[str, Any]):
    """sd-scripts' arguments per scheduler name (``get_scheduler_fix``), plus ``extra`` (the
    lr_scheduler_args, e.g. piecewise_constant's ``step_rules``)."""
    from diffusers import optimization as dif
    from transformers import optimization as tra

    name = t.lr_scheduler
    if name == "constant":
        if warmup:
            raise OptimizerSettingError("training.lr_warmup_steps: 'constant' has no warm-up: choose "
                                        "constant_with_warmup or set the warm-up to 0.")
        return _construct(tra.get_constant_schedule, optimizer, extra, "training.lr_scheduler_args")
    if name == "piecewise_constant":
        return _construct(dif.get_piecewise_constant_schedule, optimizer, extra, "training.lr_scheduler_args")
    min_lr_ratio = t.lr_scheduler_min_lr_ratio or 0.0
    args: dict[str, Any] = {"num_warmup_steps": warmup}
    if name not in ("constant_with_warmup", "inverse_sqrt"):
        args["num_training_steps"] = total
    if name == "cosine_with_restarts":
        args["num_cycles"] = t.lr_scheduler_num_cycles
    elif name == "polynomial":
        args["power"] = t.lr_scheduler_power
    elif name == "inverse_sqrt":
        args["timescale"] = t.lr_scheduler_timescale
    elif name == "cosine_with_min_lr":  # sd-scripts halves the cycles here
        args.update(num_cycles=t.lr_scheduler_num_cycles / 2, min_lr_rate=min_lr_ratio)
    elif name == "warmup_stable_decay":
        d = t.lr_decay_steps
        decay = int(d * total) if d < 1 else int(d)
        args = {"num_warmup_steps": warmup, "num_decay_steps": decay,
                "num_stable_steps": total - warmup - decay, "num_cycles": t.lr_scheduler_num_cycles / 2,
                "min_lr_ratio": min_lr_ratio}
    functions = {"linear": dif.get_linear_schedule_with_warmup, "cosine": dif.get_cosine_schedule_with_warmup,
                 "cosine_with_restarts": dif.get_cosine_with_hard_restarts_schedule_with_warmup,
                 "polynomial": dif.get_polynomial_decay_schedule_with_warmup,
                 "constant_with_warmup": dif.get_constant_schedule_with_warmup,
                 "inverse_sqrt": tra.get_inverse_sqrt_schedule,
                 "cosine_with_min_lr": tra.get_cosine_with_min_lr_schedule_with_warmup,
                 "warmup_stable_decay": tra.get_wsd_schedule}
    if name not in functions:
        raise OptimizerSettingError(f"training.lr_scheduler: {name!r} is not a known scheduler.")
    return _construct(functions[name], optimizer, {**args, **extra}, "training.lr_scheduler_args")


# --- LoRA parameter groups ---------------------------------------------------------------------

def lora_param_groups(modules: dict[str, tuple[list, list]], part: str, lr: float, *,
                      plus_ratio: float = 0.0, block_weights: list[float] | None = None,
                      layout: BlockLayout = SD_BLOCKS) -> list[dict[str, Any]]:
    """Optimizer param groups of one model part (sd-scripts ``prepare_optimizer_params``).

    ``modules``: kohya name -> (lora_down params, lora_up params). With LoRA+ (Hayou et al. 2024,
    "LoRA+: Efficient Low Rank Adaptation of Large Models") the lora_up weights get lr x plus_ratio;
    with block weights each U-Net block (numbered as ``layout`` says) gets lr x its factor. Groups whose LR is 0 are left out (those
    weights are not trained), as sd-scripts does. Each group carries a ``name`` for the logs.
    """
    by_block: dict[int, list[str]] = {}
    for kohya_name in modules:
        key = layout.index(kohya_name) if block_weights is not None else -1
        by_block.setdefault(key, []).append(kohya_name)
    groups = []
    for block, names in sorted(by_block.items()):
        block_lr = lr * (block_weights[block] if block_weights is not None and block >= 0 else 1.0)
        label = f"{part}_block{block}" if block_weights is not None else part
        if plus_ratio:
            down = [p for n in names for p in modules[n][0]]
            up = [p for n in names for p in modules[n][1]]
            candidates = [(label, down, block_lr), (f"{label} plus", up, block_lr * plus_ratio)]
        else:  # module by module, down then up (the order of the network's parameters)
            candidates = [(label, [p for n in names for p in (*modules[n][0], *modules[n][1])], block_lr)]
        groups += [{"params": params, "lr": group_lr, "name": group_name}
                   for group_name, params, group_lr in candidates if params and group_lr]
    return groups
