"""lora_gui.atomic: the one atomic-write helper (temp file beside the target, fsync, os.replace)."""

from __future__ import annotations

import json
import os

import pytest

from lora_gui.atomic import atomic_open, atomic_path, write_bytes, write_json, write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writers_write_exact_content_and_leave_no_temporary_file(tmp_path):
    assert write_text(tmp_path / "a.txt", "héllo\n") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    write_bytes(tmp_path / "b.bin", b"\x00\x01\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    write_json(tmp_path / "c.json", {"é": [1, 2]}, indent=None)
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == '{"é": [1, 2]}\n'
    with pytest.raises(FileNotFoundError):  # folders are never created (a deleted run stays deleted)
        write_text(tmp_path / "gone" / "status.json", "x")
    assert _names(tmp_path) == ["a.txt", "b.bin", "c.json"]


def test_replaces_an_existing_file_with_normal_permissions(tmp_path):
    target = tmp_path / "s.json"
    target.write_text("old")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_open(target, "wb") as handle:
            handle.write(b"partial new cont")
            handle.flush()
            assert target.read_bytes() == b"old"  # readers never see the partial file
            assert len(_names(tmp_path)) == 2  # the target and one hidden temporary
            raise error()
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["lora.safetensors"]


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    target = tmp_path / "img.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".img.png.") and not tmp.exists()
        tmp.write_bytes(b"png")
        assert not target.exists()
    assert target.read_bytes() == b"png" and _names(tmp_path) == ["img.png"]
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("boom")
    assert target.read_bytes() == b"png" and _names(tmp_path) == ["img.png"]
    with pytest.raises(FileNotFoundError):  # a writer that wrote nothing changes nothing
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"png" and _names(tmp_path) == ["img.png"]


def test_atomic_open_refuses_modes_that_are_not_a_new_file(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "ab"):
            pass
    assert _names(tmp_path) == []
