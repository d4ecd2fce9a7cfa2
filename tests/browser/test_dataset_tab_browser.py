"""The Dataset tab in Debian's chromium: load a dataset, filter the images without captions and
caption them with a tiny WD14 tagger in the background worker, edit a caption, rename a tag in bulk
and see the frequency chart change, undo it, see an image's loss mask, run the checks, then start
training on the dataset and see a loss point. Its own server (the fixtures of
test_gui_browser), its own dataset folder; every process is reaped there."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

gui = pytest.importorskip("test_gui_browser")
server, page = gui.server, gui.page  # fixtures: one server for this module, a fresh profile per test
pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).parents[1] / "support"))
from tiny_tagger import BLUE, BLUE_TAGS, export_tiny_tagger  # noqa: E402


def make_dataset(root):
    for folder, n, caption in (("3_dogs", 4, "dog, brown, sitting"), ("2_cats", 2, "cat, sitting")):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            # Seeded by i alone: cats0/dogs0 and cats1/dogs1 are byte-identical (the checks find them).
            noise = np.random.default_rng(i).integers(0, 256, (96, 96 + 32 * i, 3)).astype(np.uint8)
            image = Image.new("RGB", (96, 96), BLUE) if folder == "3_dogs" and i == 3 else Image.fromarray(noise)
            image.save(root / folder / f"{folder[2:]}{i}.png")
            if not (folder == "3_dogs" and i == 3):
                (root / folder / f"{folder[2:]}{i}.txt").write_text(caption + "\n")


def chart(page) -> dict[str, int]:
    bars = page.locator("#ds-chart .ds-bar")
    return {bars.nth(i).get_attribute("data-tag"): int(bars.nth(i).get_attribute("data-count"))
            for i in range(bars.count())}


def test_filter_caption_rename_and_chart(page, server):
    data = server["cwd"] / "tabdata"
    make_dataset(data)
    gui.open_tab(page, "model", "Model and folders")
    gui.set_field(page, "model", "img_folder", str(data))
    gui.open_tab(page, "dataset", "Dataset")
    page.locator("#ds-load").click()
    gui.wait_text(page, "#ds-status", r"6 of 6 images.*1 without a caption")
    page.wait_for_function("() => document.querySelectorAll('#ds-chart .ds-bar').length > 0")
    assert chart(page) == {"sitting": 5, "dog": 3, "brown": 3, "cat": 2}
    # Filter the images without a caption and caption them with the tagger (a background job).
    page.locator("#ds-no-caption input").check()
    gui.wait_text(page, "#ds-status", r"1 of 6 images")
    page.locator("#ds-autocap button").first.click()
    page.locator("#ds-tagger input").fill(str(export_tiny_tagger(server["cwd"] / "tagger")))
    page.locator("#ds-caption-start").click()
    gui.wait_text(page, "#ds-job-status", r"Captioning finished", timeout=90)
    gui.wait_text(page, "#ds-status", r"0 of 6 images.*0 without a caption")
    assert (data / "3_dogs" / "dogs3.txt").read_text() == BLUE_TAGS + "\n"
    gui.shot(page, "20-dataset-autocaptioned")
    # Edit one caption by hand.
    page.locator("#ds-no-caption input").uncheck()
    gui.wait_text(page, "#ds-status", r"6 of 6 images")
    page.locator("#ds-gallery button.thumbnail-lg").first.click()
    page.wait_for_function("() => document.querySelector('#ds-caption textarea').value === 'cat, sitting'")
    page.wait_for_selector("#ds-image img")
    page.locator("#ds-caption textarea").fill("cat, sitting, lying")
    page.locator("#ds-save").click()
    gui.wait_text(page, "#ds-message", r"Changed 1 caption file")
    assert (data / "2_cats" / "cats0.txt").read_text() == "cat, sitting, lying\n"
    # Its loss mask (masked_loss): these images have no alpha channel, so all of it is trained.
    page.locator("#ds-show-mask input").check()
    gui.wait_text(page, "#ds-mask-note", r"cats0\.png has no alpha channel: with masked_loss the whole image")
    # Rename a tag in bulk: the chart follows.
    gui.choose(page, "ds-op", "rename tag everywhere")
    page.locator("#ds-op-tag input").fill("sitting")
    page.locator("#ds-op-new input").fill("seated")
    page.locator("#ds-apply").click()
    gui.wait_text(page, "#ds-message", r"Changed 5 caption file")
    page.wait_for_function("() => !!document.querySelector('#ds-chart .ds-bar[data-tag=\"seated\"]')")
    assert chart(page) == {"seated": 5, "dog": 3, "brown": 3, "cat": 2, "lying": 1, "hatsune miku": 1,
                           "blue theme": 1, "^_^": 1}
    assert (data / "2_cats" / "cats1.txt").read_text() == "cat, seated\n"
    gui.shot(page, "21-dataset-renamed")
    page.locator("#ds-undo").click()
    gui.wait_text(page, "#ds-message", r"Undid rename tag everywhere")
    page.wait_for_function("() => !!document.querySelector('#ds-chart .ds-bar[data-tag=\"sitting\"]')")
    assert chart(page)["sitting"] == 5 and "seated" not in chart(page)
    page.locator("#ds-checks-box button").first.click()
    page.locator("#ds-check").click()
    report = gui.wait_text(page, "#ds-report", r"Checked 6 images: 0 error\(s\), 2 warning\(s\)")
    assert "same image byte for byte (cats0.png, dogs0.png)" in report
    assert "same image byte for byte (cats1.png, dogs1.png)" in report
    gui.no_error_toasts(page)
    start_training_and_see_a_loss_point(page, server)


def start_training_and_see_a_loss_point(page, server) -> None:
    """The dataset just fixed trains (the demo model): a loss point is drawn, then the run stops."""
    gui.open_tab(page, "model", "Model and folders")
    gui.set_field(page, "model", "output_folder", "outputs/dataset-tab")
    gui.open_tab(page, "images", "Image processing")
    gui.set_field(page, "images", "max_steps", 200)
    page.locator("#run-start").click()
    gui.wait_text(page, "#run-progress", r"Step \d+ / 200", 240)
    page.wait_for_selector("#run-plot", state="visible", timeout=60_000)  # shown with its first loss point
    assert gui.step_of(page) >= 1
    gui.shot(page, "23-dataset-trains")
    page.locator("#run-stop").click()
    gui.wait_text(page, "#run-result", "LoRA ready", 120)


def test_import_and_export_a_dataset_config_toml(page, server):
    raw = server["cwd"] / "toml-raw"
    make_dataset(raw)  # 3_dogs and 2_cats, used as plain folders by the TOML
    toml = server["cwd"] / "two subsets.toml"
    toml.write_text(f"""[general]
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [320, 256]
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = "{raw / '3_dogs'}"
  num_repeats = 7
  class_tokens = "mydog dog"

  [[datasets.subsets]]
  image_dir = "{raw / '2_cats'}"
  num_repeats = 2
  class_tokens = "cat"
""")
    gui.open_tab(page, "dataset", "Dataset")
    page.locator("#ds-toml button").first.click()
    gui.upload(page, "ds-toml-upload", toml)
    gui.wait_text(page, "#ds-toml-notes", r"Imported into data/datasets/two_subsets")
    page.locator("#ds-load").click()
    gui.wait_text(page, "#ds-status", r"6 of 6 images")
    gui.choose(page, "ds-folder", "7_mydog dog")
    gui.wait_text(page, "#ds-status", r"4 of 6 images")
    gui.open_tab(page, "model", "Model and folders")
    assert gui.field(page, "model", "img_folder").input_value() == "data/datasets/two_subsets/img"
    gui.open_tab(page, "images", "Image processing")
    assert gui.field(page, "images", "resolution").input_value() == "320,256"
    gui.open_tab(page, "dataset", "Dataset")
    page.locator("#ds-toml-export").click()
    gui.wait_text(page, "#ds-toml-notes", r"Wrote .*dataset_config\.toml")
    page.wait_for_selector("#ds-toml-download", state="visible")
    exported = (server["cwd"] / "data" / "exports" / "dataset_config.toml").read_text()
    assert "num_repeats = 7" in exported and 'class_tokens = "mydog dog"' in exported
    assert "resolution = [320, 256]" in exported and "keep_tokens = 1" in exported
    gui.shot(page, "22-dataset-toml")
    gui.no_error_toasts(page)


def fill_cell(page, row: int, column: int, text: str) -> None:
    """Type into a cell of the folder table (0-based row and column): a double click edits it."""
    cell = page.locator(f'#ds-folder-rows [data-testid="cell-{row}-{column}"]')
    cell.dblclick()
    editor = cell.locator("input, textarea").first
    editor.wait_for(timeout=10_000)
    editor.fill(text)
    editor.press("Enter")
    page.wait_for_function("([sel, text]) => document.querySelector(sel)?.innerText.trim() === text",
                           arg=[f'#ds-folder-rows [data-testid="cell-{row}-{column}"] span[data-editable]', text],
                           timeout=10_000)


def test_folder_table_builds_a_multi_concept_dataset(page, server):
    raw = server["cwd"] / "concepts"
    make_dataset(raw)  # 3_dogs and 2_cats, used as plain folders with new repeats and tokens
    gui.open_tab(page, "dataset", "Dataset")
    page.locator("#ds-folders button").first.click()
    page.wait_for_selector('#ds-folder-rows [data-testid="cell-1-2"]')
    for row, (folder, repeats, tokens) in enumerate(((raw / "3_dogs", "4", "mydog dog"),
                                                      (raw / "2_cats", "9", "cat"))):
        fill_cell(page, row, 0, str(folder))
        fill_cell(page, row, 1, repeats)
        fill_cell(page, row, 2, tokens)
    page.locator("#ds-folders-name input").fill("concepts")
    page.locator("#ds-folders-build").click()
    gui.wait_text(page, "#ds-folders-note", r"Built data/datasets/concepts: 4_mydog dog, 9_cat\. The Image folder now points there")
    page.locator("#ds-load").click()
    gui.wait_text(page, "#ds-status", r"6 of 6 images")
    gui.choose(page, "ds-folder", "9_cat")
    gui.wait_text(page, "#ds-status", r"2 of 6 images")
    gui.open_tab(page, "model", "Model and folders")
    assert gui.field(page, "model", "img_folder").input_value() == "data/datasets/concepts/img"
    built = server["cwd"] / "data" / "datasets" / "concepts" / "img"
    assert sorted(p.name for p in (built / "4_mydog dog").iterdir())[:2] == ["dogs0.png", "dogs0.txt"]
    gui.shot(page, "24-dataset-folders")
    gui.no_error_toasts(page)
