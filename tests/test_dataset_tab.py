"""The Dataset tab's server side without a browser: the grid of a filter and page (thumbnails,
paths, status, choices) and the tag chart, on a copy of the demo dataset."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lora_gui.dataset.browse import RowFilter
from lora_gui.dataset.buckets import BucketOptions
from lora_gui.dataset.workbench import Workbench

pytest.importorskip("gradio")
from lora_gui.ui.dataset_tab import PER_PAGE, chart_html, grid  # noqa: E402


@pytest.fixture
def bench(demo, tmp_path) -> Workbench:
    data = Path(shutil.copytree(demo.dataset_dir, tmp_path / "dataset"))
    return Workbench(data, demo.reg_dir, 1, ".txt", BucketOptions((64, 64), True, 64, 128, 64, False))


def test_grid_pages_filters_and_chart(bench):
    shown = grid(bench, RowFilter(), 1)
    assert len(shown["gallery"]) == min(PER_PAGE, 22)  # 18 training + 4 regularisation images
    assert shown["status"].startswith("**22 of 22 images** match the filter (page 1 of 1); 5 without")
    assert shown["folders"] == ["(all)", "3_circles", "5_shapes", "1_shape"]
    assert all(re.fullmatch(r"\d+x\d+", b) for b in shown["buckets"][1:])
    missing = grid(bench, RowFilter(no_caption=True), 3)  # clamped to the only page
    assert missing["page"] == 1
    assert [Path(p).name for p in missing["paths"]] == [
        "circles_05.png", "shape_00.png", "shape_01.png", "shape_02.png", "shape_03.png"]
    assert "circles_05.png · 3_circles ×3" in missing["gallery"][0][1]
    assert "(no caption)" in missing["gallery"][0][1]
    html = shown["chart"]
    counts = dict((t, int(n)) for t, n in re.findall(r'data-tag="([^"]+)" data-count="(\d+)"', html))
    by_hand: dict[str, int] = {}
    for caption in bench.img_folder.rglob("*.txt"):
        for tag in dict.fromkeys(t.strip() for t in caption.read_text().split(",")):
            by_hand[tag] = by_hand.get(tag, 0) + 1
    top = sorted(by_hand.items(), key=lambda kv: (-kv[1], kv[0]))[:25]
    assert list(counts.items()) == top
    assert "No tags yet" in chart_html({}, 3)


def test_folder_table_builds_the_layout_and_points_the_form_at_it(tmp_path, monkeypatch):
    from PIL import Image

    from lora_gui.dataset.scan import DatasetError, scan_dataset
    from lora_gui.ui.dataset_folders import build_from_rows

    monkeypatch.chdir(tmp_path)
    for name, n in (("dogs", 2), ("cats", 1)):
        (tmp_path / "raw" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / "raw" / name / f"{name}{i}.png")
            (tmp_path / "raw" / name / f"{name}{i}.caption").write_text(f"a {name}")
    rows = [["raw/dogs", 6, "sks dog", False], ["raw/cats", 2, "cat", False], ["", None, "", False]]
    values, note = build_from_rows(rows, "my set", {"labels.caption_extension": ".caption"},
                                   tmp_path / "data" / "datasets")
    assert values == {"model.img_folder": "data/datasets/my_set/img", "model.reg_img_folder": ""}
    assert note == "Built `data/datasets/my_set`: `2_cat`, `6_sks dog`. The Image folder now points there."
    info = scan_dataset(Path(values["model.img_folder"]), None, repeats=1, caption_extension=".caption")
    assert {s.folder.name: (s.repeats, s.class_tokens, len(s.images)) for s in info.subsets} == {
        "6_sks dog": (6, "sks dog", 2), "2_cat": (2, "cat", 1)}
    again, _ = build_from_rows(rows, "my set", {}, tmp_path / "data" / "datasets")  # never into a used folder
    assert again["model.img_folder"] == "data/datasets/my_set-2/img"
    with pytest.raises(DatasetError, match="Folder row 1: raw/birds is not a folder"):
        build_from_rows([["raw/birds", 1, "", False]], "x", {}, tmp_path / "data" / "datasets")
