"""`lora-gui dataset check|edit|tags|toml` run the workbench's code on a copy of the demo dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_gui.cli import main


@pytest.fixture
def data(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo.dataset_dir, tmp_path / "dataset"))


def test_dataset_check(data, capsys):
    assert main(["dataset", "check", str(data)]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "Checked 18 images" in out and "circles_05.png" in out and "bucket minimum (256 px)" in out
    cut = data / "5_shapes" / "shapes_02.png"
    cut.write_bytes(cut.read_bytes()[:200])
    assert main(["dataset", "check", str(data)]) == 1
    assert "cannot be decoded" in capsys.readouterr().out


def test_dataset_edit_bulk_and_undo(data, capsys):
    before = {p: p.read_bytes() for p in data.rglob("*.txt")}
    assert main(["dataset", "edit", str(data), "--op", "add tag (front)", "--tag", "shape",
                 "--no-caption"]) == 0
    out = capsys.readouterr().out
    assert "Changed 1 caption file(s)" in out
    assert (data / "3_circles" / "circles_05.txt").read_bytes() == b"shape\n"
    assert main(["dataset", "edit", str(data), "--undo"]) == 0
    assert not (data / "3_circles" / "circles_05.txt").exists()
    assert {p: p.read_bytes() for p in data.rglob("*.txt")} == before
    assert main(["dataset", "edit", str(data), "--op", "rename tag everywhere", "--tag", "large",
                 "--new", "big", "--in-folder", "3_circles"]) == 0  # a rename ignores the filter
    renamed = {p for p, b in before.items() if b"large" in b}
    assert {p for p in data.rglob("*.txt") if p.read_bytes() != before[p]} == renamed
    capsys.readouterr()
    assert main(["dataset", "tags", str(data), "--top", "1"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert main(["dataset", "edit", str(data), "--op", "remove tag"]) == 2
    assert "needs a tag" in capsys.readouterr().err


def test_dataset_toml_export_import(data, tmp_path, capsys):
    toml = tmp_path / "ds.toml"
    assert main(["dataset", "toml", "export", str(data), "-o", str(toml)]) == 0
    text = toml.read_text()
    assert text.count("[[datasets.subsets]]") == 2 and "num_repeats = 5" in text
    assert main(["dataset", "toml", "import", str(toml), "--out", str(tmp_path / "imp"),
                 "-o", str(tmp_path / "s.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "imp" / "img").iterdir()) == ["3_circles", "5_shapes"]
    assert '"img_folder": "' + str(tmp_path / "imp" / "img") in (tmp_path / "s.json").read_text()
    capsys.readouterr()
    assert main(["dataset", "toml", "import", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
