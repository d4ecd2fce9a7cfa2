"""A run on several processes (``accelerate launch``): what the processes share.

The LoRA's gradients are averaged with accelerate's ``reduce`` at each optimizer step (after the
local accumulation: one collective per step, whatever the accumulation), rather than by wrapping
the U-Net in DistributedDataParallel: the family's forward calls the plain modules, a process with
an empty slice of a global batch needs no forward at all, and the result is the same average.
Commands (Stop, Save now, Sample now) are read by process 0 and broadcast, so every process obeys
them at the same step. The caches are computed once, by process 0, and sent to the others.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_gui.engine.errors import EngineError


def average_gradients(acc, params: list) -> None:
    """Every process's gradients become the mean over the processes (a process that trained no
    sample in this step contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast(acc, obj):
    """``obj`` of process 0 on every process (pickled; tensors must be on the CPU)."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def shared_commands(t) -> list:
    """The commands process 0 read from its inbox, on every process at the same step."""
    commands = list(t.commands.poll()) if t.is_main else []
    return broadcast(t.acc, commands)


def share_text_cache(t, compute) -> dict:
    """``compute()`` on process 0 only; its tensors sent to every process."""
    if t.acc.num_processes == 1:
        return compute()
    cache = {k: _to(v, "cpu") for k, v in compute().items()} if t.is_main else None
    return {k: _to(v, t.device) for k, v in broadcast(t.acc, cache).items()}


def share_latent_cache(t, build) -> None:
    """``build()`` (which encodes the dataset's latents and attaches the cache) on process 0; the
    other processes receive its latents and attach them without touching the VAE."""
    if t.acc.num_processes == 1:
        build()
        return
    from lora_gui.engine.data import LatentCache

    memory = {k: v.cpu() for k, v in build().memory.items()} if t.is_main else None
    memory = broadcast(t.acc, memory)
    if not t.is_main:
        t.dataset.attach_latent_cache(LatentCache(t.vae, memory=memory))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def check_state_processes(acc, state_dir: Path) -> None:
    """A state resumes bit for bit only with the number of processes that saved it (each process
    has its own random state, ``rng_<process>.json``, and its own slice of every batch)."""
    saved = len(list(Path(state_dir).glob("rng_*.json")))
    if saved and saved != acc.num_processes:
        raise EngineError(
            f"model.load_previous_save_state: the state in {state_dir} was saved by a run on {saved} "
            f"process(es) and this run has {acc.num_processes}: set num_processes to {saved} to "
            "resume it (or start a new run from its LoRA with lora_model_for_resume).")
