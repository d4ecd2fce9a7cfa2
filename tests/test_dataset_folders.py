"""Per-folder repeats and class tokens (the Dataset tab's folder table): several folders become
``N_tokens`` folders of links that scan to the repeats and class tokens given, and train like the
hand-made folders; bad rows get a sentence naming the row."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_gui.dataset.folders import build_folders, parse_rows
from lora_gui.dataset.scan import DatasetError, scan_dataset


def folder(root: Path, n: int, caption: str | None) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / f"{root.name}{i}.png")
        if caption is not None:
            (root / f"{root.name}{i}.txt").write_text(caption)
    return root


def test_two_concepts_and_regularisation(tmp_path):
    dogs, cats, reg = folder(tmp_path / "dogs", 3, "a dog"), folder(tmp_path / "cats", 2, "a cat"), \
        folder(tmp_path / "people", 2, None)
    rows = [["dogs", 10, "mydog dog", False], ["", "", "", ""], [str(cats), "2", "cat", "false"],
            ["people", 1.0, "person", True]]
    entries = parse_rows(rows, tmp_path)
    img, reg_dir = build_folders(entries, tmp_path / "built", ".txt")
    assert sorted(p.name for p in img.iterdir()) == ["10_mydog dog", "2_cat"]
    assert sorted(p.name for p in reg_dir.iterdir()) == ["1_person"]
    linked = img / "10_mydog dog" / "dogs0.png"
    assert linked.resolve() == (dogs / "dogs0.png").resolve()
    assert (img / "2_cat" / "cats1.txt").read_bytes() == b"a cat"
    info = scan_dataset(img, reg_dir, repeats=1, caption_extension=".txt")
    by_folder = {s.folder.name: (s.repeats, s.class_tokens, s.is_reg, len(s.images)) for s in info.subsets}
    assert by_folder == {"10_mydog dog": (10, "mydog dog", False, 3), "2_cat": (2, "cat", False, 2),
                         "1_person": (1, "person", True, 2)}
    assert reg.is_dir()


@pytest.mark.parametrize("rows,message", [
    ([["nowhere", 1, "", False]], "Folder row 1: nowhere is not a folder"),
    ([["dogs", "ten", "", False]], "Folder row 1: repeats must be a whole number, not 'ten'"),
    ([["", 1, "", False], ["dogs", 0, "", False]], "Folder row 2: repeats must be between 1 and 10000"),
    ([["dogs", 1, "", True]], "Add at least one image folder"),
    ([["empty", 1, "", False]], "Folder row 1: empty holds no images"),
])
def test_bad_rows_get_a_sentence(tmp_path, rows, message):
    folder(tmp_path / "dogs", 1, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=message):
        parse_rows(rows, tmp_path)


def test_the_destination_must_be_new(tmp_path):
    folder(tmp_path / "dogs", 1, None)
    entries = parse_rows([["dogs", 2, "dog", False]], tmp_path)
    (tmp_path / "built").mkdir()
    (tmp_path / "built" / "x").write_text("")
    with pytest.raises(DatasetError, match="is not empty: choose a new folder"):
        build_folders(entries, tmp_path / "built", ".txt")
