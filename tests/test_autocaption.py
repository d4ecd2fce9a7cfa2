"""Auto-captioning with a tiny WD14-style tagger exported from torch to ONNX in the test (with its
selected_tags.csv), loaded through the same code path as a real tagger folder: thresholds, rating
tags left out, underscores, excluded tags, and the skip/prepend/append/overwrite rules per file
(byte-checked), in process and as a background job that can be undone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_gui.dataset.autocaption import CaptionJob, TagEntry, choose_tags, merge_caption
from lora_gui.dataset.edit import CaptionEditor
from lora_gui.dataset.scan import DatasetError

pytest.importorskip("torch")
pytest.importorskip("onnx")  # torch's ONNX exporter writes through it
pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).parent / "support"))
from tiny_tagger import BLUE, BLUE_TAGS, RED, RED_TAGS, export_tiny_tagger  # noqa: E402


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return export_tiny_tagger(tmp_path_factory.mktemp("wd14"))


def images(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, colour, caption in (("a_blue", BLUE, None), ("b_blue", BLUE, b"old, blue theme\n"),
                                  ("c_red", RED, b"old\r\n"), ("d_red", RED, None)):
        Image.new("RGB", (40, 40), colour).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)
        made[name] = root / f"{name}.png"
    return made


def job(tagger_dir: Path, paths, **kw) -> CaptionJob:
    return CaptionJob(images=[str(p) for p in paths], tagger_dir=str(tagger_dir), batch_size=3, **kw)


def run_in_process(j: CaptionJob):
    from lora_gui.events import CommandQueue
    from lora_gui.worker.caption_job import caption_images

    events = []
    caption_images(j.check(), events.append, CommandQueue())
    return events


def captions(root: Path) -> dict[str, bytes | None]:
    return {p.stem: (p.with_suffix(".txt").read_bytes() if p.with_suffix(".txt").exists() else None)
            for p in sorted(root.glob("*.png"))}


@pytest.mark.parametrize("rule,expected", [
    ("skip", {"a_blue": BLUE_TAGS, "b_blue": None, "c_red": None, "d_red": RED_TAGS}),
    ("overwrite", {"a_blue": BLUE_TAGS, "b_blue": BLUE_TAGS, "c_red": RED_TAGS, "d_red": RED_TAGS}),
    ("prepend", {"a_blue": BLUE_TAGS, "b_blue": BLUE_TAGS + ", old", "c_red": RED_TAGS + ", old",
                 "d_red": RED_TAGS}),
    ("append", {"a_blue": BLUE_TAGS, "b_blue": "old, blue theme, hatsune miku, ^_^",
                "c_red": "old, " + RED_TAGS, "d_red": RED_TAGS}),
])
def test_rules_per_file(tagger_dir, tmp_path, rule, expected):
    made = images(tmp_path / "data")
    before = captions(tmp_path / "data")
    events = run_in_process(job(tagger_dir, made.values(), rule=rule, undo_root=str(tmp_path / "data")))
    after = captions(tmp_path / "data")
    ending = {"c_red": b"\r\n"}  # an existing file keeps its line ending
    for name, text in expected.items():
        want = before[name] if text is None else (text.encode() + ending.get(name, b"\n"))
        assert after[name] == want, (rule, name)
    assert events[-1].kind == "finished" and not events[-1].stopped
    assert [e.step for e in events if e.kind == "progress"] == [3, 4]
    CaptionEditor(tmp_path / "data").undo()
    assert captions(tmp_path / "data") == before


def test_choices_thresholds_exclusions_underscores():
    tags = [TagEntry("general", "9"), TagEntry("long_hair", "0"), TagEntry("^_^", "0"),
            TagEntry("some_one", "4")]
    base = dict(images=["x"], tagger_dir="t")
    assert choose_tags([0.99, 0.5, 0.4, 0.9], tags, CaptionJob(**base)) == ["some one", "long hair", "^_^"]
    assert choose_tags([0.99, 0.5, 0.4, 0.8], tags, CaptionJob(**base)) == ["long hair", "^_^"]
    assert choose_tags([0.99, 0.5, 0.4, 0.9], tags, CaptionJob(**base, general_threshold=0.45,
                       exclude=["some one"], underscores_to_spaces=False)) == ["long_hair"]
    assert merge_caption("a, b", ["b", "c"], "prepend") == "b, c, a"
    assert merge_caption("", ["x"], "skip") == "x"
    with pytest.raises(DatasetError, match="different releases"):
        choose_tags([0.5], tags, CaptionJob(**base))


def test_missing_tagger_files_get_a_sentence(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"must hold model\.onnx and selected_tags\.csv.*missing: "
                                           r"selected_tags\.csv"):
        CaptionJob(images=["x.png"], tagger_dir=str(tmp_path)).check()
    with pytest.raises(DatasetError, match="caption rule must be one of skip, prepend"):
        CaptionJob(images=["x.png"], tagger_dir=str(tmp_path), rule="merge").check()


@pytest.mark.slow
def test_background_job_writes_captions_and_is_undone(tagger_dir, tmp_path):
    from lora_gui.worker.caption_job import start_caption_job
    from lora_gui.worker.client import WorkerClient

    made = images(tmp_path / "data")
    before = captions(tmp_path / "data")
    paths, popen = start_caption_job(tmp_path / "jobs", job(tagger_dir, made.values(), rule="skip",
                                                     undo_root=str(tmp_path / "data")))
    client = WorkerClient(tmp_path / "jobs")
    try:
        info = client.attach(paths.run_id).wait(120)
        assert info.state.value == "finished", paths.log.read_text()
    finally:
        client.close()
        popen.wait(30)
    assert popen.returncode == 0
    after = captions(tmp_path / "data")
    assert after["a_blue"] == (BLUE_TAGS + "\n").encode() and after["d_red"] == (RED_TAGS + "\n").encode()
    assert after["b_blue"] == before["b_blue"] and after["c_red"] == before["c_red"]
    assert "Undid auto-caption (skip)" in CaptionEditor(tmp_path / "data").undo().message
    assert captions(tmp_path / "data") == before


@pytest.mark.slow
def test_cli_captions_the_images_without_captions(tagger_dir, tmp_path, capsys):
    from lora_gui.cli import main

    root = tmp_path / "set" / "2_thing"
    images(root)
    before = captions(root)
    code = main(["dataset", "caption", str(tmp_path / "set"), "--tagger", str(tagger_dir), "--no-caption",
                 "--rule", "overwrite", "--exclude", "^_^", "--jobs-dir", str(tmp_path / "jobs"),
                 "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Captioning 2 images" in out and "Wrote 2 caption file(s) for 2 of 2 images." in out
    after = captions(root)
    assert after["a_blue"] == b"hatsune miku, blue theme\n" and after["d_red"] == b"red theme\n"
    assert after["b_blue"] == before["b_blue"] and after["c_red"] == before["c_red"]  # filtered out
    assert main(["dataset", "caption", str(tmp_path / "set"), "--tagger", str(tmp_path)]) == 2
    assert "must hold model.onnx" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_job_writes_nothing_more(tagger_dir, tmp_path):
    from lora_gui.worker.caption_job import start_caption_job
    from lora_gui.worker.client import WorkerClient

    made = images(tmp_path / "data")
    before = captions(tmp_path / "data")
    paths, popen = start_caption_job(tmp_path / "jobs", job(tagger_dir, made.values(), rule="overwrite"))
    client = WorkerClient(tmp_path / "jobs")
    try:
        run = client.attach(paths.run_id)
        run.stop()  # in the inbox before the job reads it (after loading the tagger)
        info = run.wait(120)
    finally:
        client.close()
        popen.wait(30)
    assert info.state.value == "stopped", paths.log.read_text()
    assert info.message == "Stopped: wrote 0 caption file(s) for 0 of 4 images."
    assert captions(tmp_path / "data") == before
