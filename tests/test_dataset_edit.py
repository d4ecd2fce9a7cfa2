"""Caption editing on a copy of the demo dataset: each edit and bulk operation changes exactly the
caption files it should (compared byte for byte with every other file), undo restores them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lora_gui.dataset.browse import RowFilter, dataset_rows, filter_rows, tag_counts
from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.edit import (
    CaptionEditor,
    CaptionError,
    add_tag,
    dedupe_tags,
    remove_tag,
    replace_tag,
    sort_tags,
    triggers_first,
)
from lora_gui.dataset.scan import scan_dataset

OPTIONS = BucketOptions((512, 512), True, 256, 1024, 64, False)


@pytest.fixture
def data(demo, tmp_path) -> Path:
    """A private copy of the demo dataset (5_shapes: 12 captioned, 3_circles: 6, one uncaptioned)."""
    return Path(shutil.copytree(demo.dataset_dir, tmp_path / "dataset"))


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def changed_files(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def rows(root: Path, row_filter: RowFilter = RowFilter()):
    info = scan_dataset(root, repeats=1)
    return filter_rows(dataset_rows(info, OPTIONS), row_filter)


def test_set_caption_changes_one_file_and_undo_restores(data):
    editor = CaptionEditor(data)
    before = snapshot(data)
    image = data / "5_shapes" / "shapes_03.png"
    result = editor.set_caption(image, "  my  caption,   two ")
    after = snapshot(data)
    assert changed_files(before, after) == {"5_shapes/shapes_03.txt"}
    assert after["5_shapes/shapes_03.txt"] == b"my caption, two\n"
    assert result.changed == [data / "5_shapes" / "shapes_03.txt"]
    assert editor.can_undo() == "the caption of shapes_03.png"
    editor.undo()
    assert snapshot(data) == before
    assert editor.can_undo() is None
    assert "Nothing to undo" in editor.undo().message


def test_add_tag_to_filtered_set(data):
    editor = CaptionEditor(data)
    before = snapshot(data)
    circles = rows(data, RowFilter(folder="3_circles"))
    assert len(circles) == 6
    editor.bulk([r.path for r in circles], [add_tag("round", front=True)], "add round")
    after = snapshot(data)
    # The five captioned circles get the tag first; the uncaptioned one gets a new caption file.
    expected = {f"3_circles/circles_{i:02d}.txt" for i in range(6)}
    assert changed_files(before, after) == expected
    for i in range(5):
        name = f"3_circles/circles_{i:02d}.txt"
        assert after[name] == b"round, " + before[name]
    assert after["3_circles/circles_05.txt"] == b"round\n"
    editor.undo()
    assert snapshot(data) == before
    assert not (data / "3_circles" / "circles_05.txt").exists()


def test_bulk_operations_byte_exact(data):
    editor = CaptionEditor(data)
    original = snapshot(data)
    texts = {k: v.decode() for k, v in original.items() if k.endswith(".txt")}
    large = [r.path for r in rows(data, RowFilter(tag="large"))]
    assert large and all("large" in r.tags for r in rows(data, RowFilter(tag="large")))
    cases = [
        ([add_tag("zz", front=False)], large,
         lambda t: t.rstrip("\n") + ", zz\n" if "large" in t else t),
        ([remove_tag("large")], large,
         lambda t: t.replace(", large", "") if "large" in t else t),
        ([replace_tag("large", "big")], [r.path for r in rows(data)],
         lambda t: t.replace(", large", ", big")),
        ([triggers_first("mytoken")], large,
         lambda t: "mytoken, " + t if "large" in t else t),
        ([sort_tags(keep=1)], [r.path for r in rows(data)],
         lambda t: _sorted_after_first(t)),
    ]
    for ops, images, expect in cases:
        result = editor.bulk(images, ops, "case")
        now = snapshot(data)
        for name, text in texts.items():
            assert now[name].decode() == expect(text), (name, ops)
        assert set(map(str, result.changed)) == {
            str(data / k) for k in changed_files(original, now)}
        editor.undo()
        assert snapshot(data) == original


def _sorted_after_first(text: str) -> str:
    tags = [t.strip() for t in text.strip().split(",")]
    return ", ".join(tags[:1] + sorted(tags[1:], key=lambda t: (t.lower(), t))) + "\n"


def test_rename_dedupe_and_kept_file_layout(data):
    editor = CaptionEditor(data)
    odd = data / "5_shapes" / "shapes_00.txt"
    odd.write_bytes("\ufeffmytoken, red, red, mytoken , x\r\nsecond line\r\n".encode())
    before = snapshot(data)
    editor.bulk([r.path for r in rows(data)], [dedupe_tags], "dedupe")
    after = snapshot(data)
    assert changed_files(before, after) == {"5_shapes/shapes_00.txt"}
    assert after["5_shapes/shapes_00.txt"] == "\ufeffmytoken, red, x\r\nsecond line\r\n".encode()
    # Rename everywhere: red -> crimson in every caption that has it as a whole tag, nowhere else.
    editor.bulk([r.path for r in rows(data)], [replace_tag("red", "crimson")], "rename")
    renamed = snapshot(data)
    assert renamed["5_shapes/shapes_00.txt"] == "\ufeffmytoken, crimson, x\r\nsecond line\r\n".encode()
    assert changed_files(after, renamed) == {"5_shapes/shapes_00.txt"}  # "red circle" is not "red"
    editor.undo()
    assert snapshot(data) == after


def test_a_file_that_is_not_utf8_stops_the_operation(data):
    editor = CaptionEditor(data)
    bad = data / "5_shapes" / "shapes_04.txt"
    bad.write_bytes("caf\xe9, red".encode("latin-1"))
    before = snapshot(data)
    with pytest.raises(CaptionError, match=r"shapes_04\.txt is not UTF-8.*re-save it as UTF-8"):
        editor.bulk([r.path for r in rows(data)], [add_tag("new")], "add")
    assert snapshot(data) == before
    with pytest.raises(CaptionError, match="not UTF-8"):
        editor.set_caption(data / "5_shapes" / "shapes_04.png", "x")
    assert editor.can_undo() is None


def test_filters_and_tag_counts(data):
    all_rows = rows(data)
    assert len(all_rows) == 18
    missing = rows(data, RowFilter(no_caption=True))
    assert [r.path.name for r in missing] == ["circles_05.png"]
    counts = tag_counts(all_rows)
    by_hand = sum(1 for p in data.rglob("*.txt") if "large" in p.read_text().strip().split(", "))
    assert counts["large"] == by_hand
    bucket = all_rows[0].bucket_label
    assert all(r.bucket_label == bucket for r in rows(data, RowFilter(bucket=bucket)))
