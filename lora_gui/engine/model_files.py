"""Reading checkpoint files without executing code: ``.safetensors`` and pickled ``.ckpt`` files.

A pickled file is read with torch's weights-only loader, and when that refuses it, with a restricted
unpickler that resolves only the globals needed to rebuild tensors; every other global becomes an
inert stub, so nothing named in a user's file is ever called.
"""

from __future__ import annotations

import json
import pickle
import types
from collections.abc import Mapping
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(ValueError):
    """A base model or VAE could not be loaded; the message is one sentence for the user."""


class _Inert:
    """Stands in for any non-tensor object in a pickled checkpoint (callbacks, configs...)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # pickle's SETITEMS on a stubbed dict subclass
        pass

    def append(self, item):  # pickle's APPENDS on a stubbed list subclass
        pass

    def extend(self, items):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()


_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("torch", "float64"),
}
_STORAGE_NAMES = {
    "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage", "TypedStorage",
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; every other global becomes an inert stub class,
    so nothing named in the file is ever called."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED or (
            module in ("torch", "torch.storage") and name in _STORAGE_NAMES
        ):
            return super().find_class(module, name)
        return type(f"Inert_{name}", (_Inert,), {"__module__": "lora_gui.inert"})


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# ``torch.load(pickle_module=...)`` needs a module-like object with ``Unpickler`` and ``load``.
_restricted_pickle = types.ModuleType("lora_gui_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def _damaged(path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{path} could not be read ({exc.__class__.__name__}): the file is damaged or incomplete, download it again."
    )


def _read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``.ckpt``: torch's weights-only loader first, then the restricted unpickler."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - weights_only refuses files holding non-tensor objects
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, exc) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{path} holds no weights dictionary: choose a Stable Diffusion checkpoint file."
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _is_safetensors(path: Path) -> bool:
    """Sniff the content (users rename files): safetensors starts with a u64 header length and '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return (
            len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
        )
    except OSError as exc:
        raise _damaged(path, exc) from exc


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".safetensors", ".sft", *PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{path} is neither a .safetensors nor a .ckpt file: choose a diffusers folder or a single-file checkpoint."
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or pickled (``.ckpt``/``.pt``/``.pth``/``.bin``) file, on the CPU."""
    path = Path(path)
    _check_suffix(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, JSON errors
            raise _damaged(path, exc) from exc
    return _read_ckpt(path)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape; for safetensors from the header only (no tensor data is read)."""
    _check_suffix(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, exc) from exc
    return {k: tuple(v.shape) for k, v in _read_ckpt(path).items()}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} could not be read ({exc.__class__.__name__}): repair or replace the file."
        ) from exc
