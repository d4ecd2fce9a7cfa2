"""Issue 11, reliability: bad files and full disks end in sentences, never tracebacks or raw
errno text; every fault is reproduced first (each test fails on the code before the fix)."""

from __future__ import annotations

import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

from lora_gui.ui.files import BrowseError, extract_dataset_zip


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name" is what one test wants
        for name, data in members:
            if name.endswith("/"):
                z.mkdir(name.rstrip("/"))
            else:
                z.writestr(name, data)
    return path


@pytest.mark.parametrize(("members", "sentence"), [
    ([("10_cat/a.txt", b"x"), ("10_cat/a.txt", b"y")], "holds 10_cat/a.txt twice"),
    ([("10_cat/a", b"x"), ("10_cat/a/b.txt", b"y")], "both a file and a folder named 10_cat/a"),
    ([("10_cat/a/b.txt", b"y"), ("10_cat/a", b"x")], "both a file and a folder named 10_cat/a"),
    ([("10_cat/", b""), ("10_cat", b"x")], "both a file and a folder named 10_cat"),
    ([("10_cat/" + "n" * 300 + ".png", b"x")], "longer than 255 bytes"),
    ([("/".join(["d" * 200] * 20) + "/a.png", b"x")], "path longer than"),
], ids=["duplicate", "file-then-folder", "folder-then-file", "dir-entry-clash", "long-name",
        "long-path"])
def test_bad_zips_get_sentences_and_write_nothing(tmp_path, members, sentence):
    bad = _zip(tmp_path / "bad.zip", members)
    with pytest.raises(BrowseError, match=sentence):
        extract_dataset_zip(bad, tmp_path / "datasets", "bad.zip")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_zip_with_a_bad_crc_gets_a_sentence(tmp_path):
    good = _zip(tmp_path / "crc.zip", [("10_cat/a.txt", b"a cat sitting on a mat")])
    data = bytearray(good.read_bytes())
    at = data.index(b"a cat sitting")
    data[at] = ord("A")  # stored, not deflated: the content changes, the CRC does not
    good.write_bytes(bytes(data))
    with pytest.raises(BrowseError, match="10_cat/a.txt is damaged.*zip the folder again"):
        extract_dataset_zip(good, tmp_path / "datasets", "crc.zip")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_zip_of_a_folder_holding_its_own_name_is_unwrapped(tmp_path):
    z = _zip(tmp_path / "set.zip", [("set/set/a.txt", b"x"), ("set/10_cat/b.txt", b"y")])
    dest = extract_dataset_zip(z, tmp_path / "datasets", "set.zip")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "10_cat", "10_cat/b.txt", "set", "set/a.txt"]


# --- item 9: deeply nested JSON ----------------------------------------------------------------------

def _deep(path: Path, levels: int) -> Path:
    path.write_text('{"model": ' * levels + "1" + "}" * levels)
    return path


@pytest.mark.parametrize("levels", [40, 5000])
@pytest.mark.parametrize("command", [["config", "validate"], ["train"]])
def test_deeply_nested_json_gets_a_sentence_on_the_command_line(tmp_path, command, levels):
    deep = _deep(tmp_path / "deep.json", levels)
    proc = subprocess.run([sys.executable, "-m", "lora_gui.cli", *command, str(deep)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert f"{deep} nests lists or objects" in proc.stderr and "levels deep" in proc.stderr


def test_json_depth_is_measured_without_recursion():
    from lora_gui.settings.io import json_depth, loads_bounded

    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    value = []
    for _ in range(100_000):  # deeper than any recursion limit
        value = [value]
    assert json_depth(value) == 100_001
    with pytest.raises(ValueError, match="the queue file nests lists or objects 33 levels deep"):
        loads_bounded("[" * 33 + "]" * 33, "the queue file")
