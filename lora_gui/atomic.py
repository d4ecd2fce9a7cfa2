"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

The one way this project writes a file that someone may read at the same time or that must survive
a crash (settings, run status, LoRA files, latent caches, tag reports, sample images): write a
temporary file in the same folder (so the rename stays on one file system), flush and ``fsync`` it,
then ``os.replace`` it over the target (atomic on POSIX and Windows). On any failure, an exception
or Ctrl+C, the temporary file is removed and the target is left as it was.

Bottom layer: standard library only, importable from settings, dataset, engine and worker alike.
Temporary names start with a dot (``.<name>.<pid>.<random>.tmp``), so folder scans skip them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "write_bytes", "write_json", "write_text"]


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows refuses fsync on a read-only descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that need a file name (``save_file``,
    ``Image.save``); when the block ends without an error it is synced and renamed over ``path``.

    The temporary file does not exist yet when the block starts; a block that writes nothing
    raises ``FileNotFoundError`` and leaves ``path`` untouched.
    """
    path = Path(path)
    tmp = _temp_name(path)  # the folder must exist: a write never re-creates a deleted run folder
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield an open file (``"wb"`` or ``"w"``) whose content replaces ``path`` when the block ends
    without an error (``torch.save(obj, f)``, ``np.savez(f, ...)``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}.")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        # "x": the name is new and random, so an existing file there is someone else's; never reuse it.
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as handle:
            yield handle
            handle.flush()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; returns the path."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically; returns the path."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Replace ``path`` with ``data`` as UTF-8 JSON (non-ASCII kept as is) atomically."""
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")
