"""A training state folder in formats that cannot run code when read: safetensors for every tensor,
JSON for everything else. Nothing here unpickles.

accelerate's ``save_state``/``load_state`` pickle the optimizer, scheduler, RNG and custom objects
(``custom_checkpoint_*.pkl`` is even read with ``weights_only=False``), so a crafted state folder
would run code on resume. This module writes and reads the same pieces itself, through the public
``state_dict``/``load_state_dict`` of each object and accelerate's public ``step`` counter:

    state.json           format marker, run position, accelerate's step, and the structure of the
                         optimizer / scheduler / grad-scaler state dicts (tensors by reference)
    state.safetensors    the tensors those state dicts hold
    lora.safetensors     the LoRA weights (float32)
    rng_<process>.json   python and numpy RNG states (+ ``rng_<process>.safetensors``: torch's)

A folder in accelerate's pickle format (``optimizer.bin``, ``*.pkl``) is refused with a sentence.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_gui.atomic import atomic_path, write_json
from lora_gui.engine.errors import EngineError
from lora_gui.settings.io import loads_bounded

FORMAT = "lora-gui-state"
VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
STATE_LORA = "lora.safetensors"
PICKLED = ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")
MAX_STATE_JSON = 64 * 1024**2  # the structure only; the tensors are elsewhere
SETTING = "model.load_previous_save_state"


class StateFileError(EngineError):
    """A state folder that cannot be read back; the message names the folder and the file."""


# --- encoding: any state dict as (JSON tree, tensors) ---------------------------------------------

def pack(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-ready tree for ``value``; tensors go into ``tensors`` under ``prefix``-based keys.
    dict keys that are not strings (optimizer states are keyed by int) and tuples keep their type.
    One tensor object referenced twice (bitsandbytes shares its quantisation maps between
    parameters) is stored once and comes back shared."""
    seen = {id(v): k for k, v in tensors.items()}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in seen:
                seen[id(value)] = f"{prefix}#{len(tensors)}"
                tensors[seen[id(value)]] = value
            return {"$tensor": seen[id(value)]}
        if isinstance(value, np.ndarray):
            return {"$ndarray": walk(torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, dict):
            return {"$dict": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"$tuple": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise EngineError(f"the training state holds a {type(value).__name__}, which cannot be saved "
                          "without pickle: turn model.save_state off for this optimizer or scheduler")

    return walk(value)


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``pack``; a ValueError on anything ``pack`` does not write."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if len(tree) != 1:
            raise ValueError(f"unexpected object with keys {sorted(tree)[:5]}")
        (tag, inner), = tree.items()
        if tag == "$tensor":
            if not isinstance(inner, str) or inner not in tensors:
                raise ValueError(f"tensor {inner!r} is missing from {STATE_TENSORS}")
            return tensors[inner]
        if tag == "$ndarray":
            return unpack(inner, tensors).numpy()
        if tag == "$tuple" and isinstance(inner, list):
            return tuple(unpack(v, tensors) for v in inner)
        if tag == "$dict" and isinstance(inner, list) and all(
                isinstance(kv, list) and len(kv) == 2 for kv in inner):
            return {_key(unpack(k, tensors)): unpack(v, tensors) for k, v in inner}
        raise ValueError(f"unexpected entry {tag!r}")
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise ValueError(f"unexpected value of type {type(tree).__name__}")


def _key(key: Any) -> Any:
    if isinstance(key, list):  # a tuple key would come back as a list: not hashable
        raise ValueError("a list cannot be a key")
    return key


# --- the pieces of a state ------------------------------------------------------------------------

def _stateful(t) -> dict[str, Any]:
    """Name -> object with state_dict/load_state_dict, as in every state of this run."""
    parts = {"progress": t.progress, "optimizer": t.optimizer, "scheduler": t.lr_scheduler}
    scaler = getattr(t.acc, "scaler", None)
    if scaler is not None:
        parts["scaler"] = scaler
    return parts


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two on the same storage (views are copied)."""
    out, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in storages and value.numel() else value
        storages.add(ptr)
    return out


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    tree = {"python": pack(random.getstate(), tensors, "python"),
            "numpy": pack(np.random.get_state(), tensors, "numpy")}
    return tree, _unshared(tensors)


def _set_rng_state(tree: dict, tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(unpack(tree["python"], tensors))
    np.random.set_state(unpack(tree["numpy"], tensors))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --- save and load --------------------------------------------------------------------------------

def save_state(t, folder: Path) -> None:
    """Write the state of run ``t`` into ``folder`` (every process its RNG, the main one the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    t.acc.wait_for_everyone()
    rng_tree, rng_tensors = _rng_state()
    index = t.acc.process_index
    _save_tensors(rng_tensors, folder / f"rng_{index}.safetensors")
    write_json(folder / f"rng_{index}.json", rng_tree, indent=None)
    if t.is_main:
        tensors: dict[str, torch.Tensor] = {}
        parts = {name: pack(obj.state_dict(), tensors, name) for name, obj in _stateful(t).items()}
        _save_tensors(_network_tensors(t.network), folder / STATE_LORA)
        _save_tensors(_unshared(tensors), folder / STATE_TENSORS)
        doc = {"format": FORMAT, "version": VERSION, "accelerator_step": t.acc.step, **parts}
        write_json(folder / STATE_JSON, doc, indent=None)  # last: marks the folder complete
    t.acc.wait_for_everyone()


def _network_tensors(network) -> dict[str, torch.Tensor]:
    if hasattr(network, "state_dict_exact"):
        return network.state_dict_exact()
    return network.state_dict_kohya(torch.float32)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_state(t, folder: Path) -> None:
    """Restore run ``t`` from ``folder``; a ``StateFileError`` sentence for anything else."""
    doc = _read_doc(folder)
    tensors = _read_tensors(folder, STATE_TENSORS)
    lora = _read_tensors(folder, STATE_LORA)
    rng_json = folder / f"rng_{t.acc.process_index}.json"
    rng_tree = _read_json(rng_json)
    rng_tensors = _read_tensors(folder, rng_json.with_suffix(".safetensors").name)
    try:
        # A network whose file is not its exact training state (LyCORIS Full) keeps what resuming
        # needs besides (network_lycoris.state_dict_exact).
        if hasattr(t.network, "load_state_dict_exact"):
            t.network.load_state_dict_exact(lora)
        else:
            t.network.load_state_dict_kohya(lora)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise StateFileError(f"{SETTING}: the LoRA in {folder / STATE_LORA} does not match these "
                             f"settings ({exc}): use the network settings of the run that saved it."
                             ) from None
    for name, obj in _stateful(t).items():
        if name not in doc:
            raise _damaged(folder / STATE_JSON, f"it has no {name} state")
        try:
            obj.load_state_dict(unpack(doc[name], tensors))
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise StateFileError(f"{SETTING}: the {name} state in {folder} does not match these "
                                 f"settings ({exc}): resume with the settings of the run that saved "
                                 "it.") from None
    try:
        _set_rng_state(rng_tree, rng_tensors)
        t.acc.step = int(doc["accelerator_step"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise _damaged(rng_json, f"the random state cannot be restored: {exc}") from None


def _damaged(path: Path, why: str) -> StateFileError:
    return StateFileError(f"{SETTING}: {path} is damaged ({why}): choose another saved state, or "
                          "start from its LoRA file with model.lora_model_for_resume.")


def _read_doc(folder: Path) -> dict:
    if not (folder / STATE_JSON).is_file():
        pickled = [name for name in PICKLED if (folder / name).exists()]
        if pickled:
            raise StateFileError(
                f"{SETTING}: {folder} is a state in accelerate's pickle format ({', '.join(pickled)}), "
                "which can run code when it is read, so it is not read: start from its LoRA file "
                "with model.lora_model_for_resume instead.")
        raise StateFileError(f"{SETTING}: {folder} is not a saved state (no {STATE_JSON} inside): "
                             "choose a NAME-state folder written by a run with model.save_state.")
    doc = _read_json(folder / STATE_JSON)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _damaged(folder / STATE_JSON, "it is not a lora-gui state description")
    if doc.get("version") != VERSION:
        raise _damaged(folder / STATE_JSON, f"state format version {doc.get('version')!r}, this "
                                            f"lora-gui reads version {VERSION}")
    return doc


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_STATE_JSON:
            raise _damaged(path, f"larger than {MAX_STATE_JSON // 1024**2} MiB")
        return loads_bounded(path.read_bytes(), str(path), max_depth=64)
    except FileNotFoundError:
        raise _damaged(path.parent, f"{path.name} is missing") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _damaged(path, f"not JSON: {exc}") from None


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / name
    if not path.is_file():
        raise _damaged(folder, f"{name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, f"not a safetensors file: {exc}") from None
