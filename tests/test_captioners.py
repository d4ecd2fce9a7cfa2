"""BLIP, Florence-2 and Qwen2-VL captioners: a tiny randomly initialised model of each kind, built
from its transformers config and saved with save_pretrained (with a tiny tokenizer built in the
test, no download), loaded through the same code path as a real folder by the caption job; the
skip/prepend/append/overwrite rules are checked per file (bytes), and missing files get a
sentence that names them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_gui.dataset.autocaption import CAPTIONERS, CaptionJob
from lora_gui.dataset.edit import CaptionEditor
from lora_gui.dataset.scan import DatasetError

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "support"))
from tiny_captioners import BUILDERS, MAX_WORDS, MIN_WORDS, PLAIN_WORDS  # noqa: E402

KINDS = list(BUILDERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


def images(root: Path) -> dict[str, Path]:
    """Four images of different colours and sizes; two already have captions."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, colour, size, caption in (("a", (40, 70, 220), (40, 40), None),
                                        ("b", (220, 40, 40), (50, 30), b"old, tag\n"),
                                        ("c", (30, 200, 60), (30, 60), b"old\r\n"),
                                        ("d", (250, 250, 250), (64, 48), None)):
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)
        made[name] = root / f"{name}.png"
    return made


def captions(root: Path) -> dict[str, bytes | None]:
    return {p.stem: (p.with_suffix(".txt").read_bytes() if p.with_suffix(".txt").exists() else None)
            for p in sorted(root.glob("*.png"))}


def make_job(kind: str, folder: Path, paths, **kw) -> CaptionJob:
    return CaptionJob(images=[str(p) for p in paths], tagger_dir=str(folder), captioner=kind,
                      batch_size=3, max_new_tokens=MAX_WORDS, **kw)


def one_by_one(kind: str, folder: Path, paths) -> dict[str, str]:
    """Each image captioned alone (a batch of one, no padding): the sentences the batched job
    must write."""
    from lora_gui.engine.captioners import load_captioner

    captioner = load_captioner(make_job(kind, folder, paths).check())
    out = {}
    for path in paths:
        (sentence,) = captioner.caption([path])
        out[path.stem] = sentence[0]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_captioner_writes_captions_by_the_rules(kind, folders, tmp_path):
    from lora_gui.events import CommandQueue
    from lora_gui.worker.caption_job import caption_images

    made = images(tmp_path / "set")
    alone = one_by_one(kind, folders[kind], list(made.values()))
    for sentence in alone.values():  # plain words of the tiny vocabulary, as many as generation allows
        words = sentence.split()
        assert MIN_WORDS <= len(words) <= MAX_WORDS and set(words) <= set(PLAIN_WORDS[kind]), sentence
    before = captions(tmp_path / "set")
    for rule in ("skip", "prepend", "append", "overwrite"):
        events = []
        caption_images(make_job(kind, folders[kind], made.values(), rule=rule,
                                undo_root=str(tmp_path / "set")).check(), events.append, CommandQueue())
        assert events[-1].kind == "finished" and [e.step for e in events if e.kind == "progress"] == [3, 4]
        a, b, c, d = (alone[k] for k in "abcd")
        want = {"skip": {"a": a, "b": "old, tag", "c": "old", "d": d},
                "prepend": {"a": a, "b": f"{b}, old, tag", "c": f"{c}, old", "d": d},
                "append": {"a": a, "b": f"old, tag, {b}", "c": f"old, {c}", "d": d},
                "overwrite": {"a": a, "b": b, "c": c, "d": d}}[rule]
        ending = {"c": b"\r\n"}  # an existing file keeps its line ending
        got = captions(tmp_path / "set")
        for name, text in want.items():
            assert got[name] == text.encode() + ending.get(name, b"\n"), (kind, rule, name)
        if rule == "skip":
            assert got["b"] == before["b"] and got["c"] == before["c"]  # untouched, byte for byte
        CaptionEditor(tmp_path / "set").undo()
        assert captions(tmp_path / "set") == before, (kind, rule)


@pytest.mark.slow
def test_blip_matches_transformers_directly(folders, tmp_path):
    """The BLIP captioner gives what transformers' own processor + generate give for the folder."""
    import torch
    from transformers import AutoProcessor, BlipForConditionalGeneration

    made = images(tmp_path / "set")
    processor = AutoProcessor.from_pretrained(folders["blip"], local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(folders["blip"], local_files_only=True).eval()
    pics = [Image.open(p).convert("RGB") for p in made.values()]
    with torch.no_grad():
        out = model.generate(**processor(images=pics, return_tensors="pt"), max_new_tokens=MAX_WORDS,
                             do_sample=False)
    direct = [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]
    assert list(one_by_one("blip", folders["blip"], list(made.values())).values()) == direct


@pytest.mark.parametrize("kind", KINDS)
def test_missing_files_get_a_sentence(kind, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    job = CaptionJob(images=["x.png"], tagger_dir=str(tmp_path), captioner=kind)
    what, example, _ = CAPTIONERS[kind]
    with pytest.raises(DatasetError) as err:
        job.check()
    message = str(err.value)
    assert f"The {what} folder {tmp_path} must hold config.json, model.safetensors or " in message
    assert example in message
    assert message.endswith("missing: model.safetensors or model.safetensors.index.json; tokenizer.json or "
                            "tokenizer_config.json; preprocessor_config.json or processor_config.json (a "
                            "pytorch_model.bin is a pickle and is not read: convert it to model.safetensors).")
    with pytest.raises(DatasetError, match="captioner must be one of wd14, blip, florence2, qwen2vl"):
        CaptionJob(images=["x.png"], tagger_dir=str(tmp_path), captioner="llava").check()


@pytest.mark.slow
def test_qwen_folder_of_another_model_gets_a_sentence(folders, tmp_path):
    from lora_gui.engine.captioners import load_captioner

    made = images(tmp_path / "set")
    with pytest.raises(DatasetError, match="holds a 'blip' model, not Qwen2-VL"):
        load_captioner(make_job("qwen2vl", folders["blip"], made.values()).check())


@pytest.mark.slow
def test_cli_background_job_with_florence2(folders, tmp_path, capsys):
    """``lora-gui dataset caption --captioner florence2``: the job process loads the folder and
    writes the sentences the captioner gives, under the rule (the filter leaves b and c alone)."""
    from lora_gui.cli import main

    made = images(tmp_path / "set" / "3_thing")
    alone = one_by_one("florence2", folders["florence2"], list(made.values()))
    before = captions(made["a"].parent)
    code = main(["dataset", "caption", str(tmp_path / "set"), "--captioner", "florence2", "--model",
                 str(folders["florence2"]), "--prompt", "<CAPTION>", "--max-new-tokens", str(MAX_WORDS),
                 "--no-caption", "--rule", "overwrite", "--jobs-dir", str(tmp_path / "jobs"), "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Wrote 2 caption file(s) for 2 of 2 images." in out
    after = captions(made["a"].parent)
    assert after["a"] == (alone["a"] + "\n").encode() and after["d"] == (alone["d"] + "\n").encode()
    assert after["b"] == before["b"] and after["c"] == before["c"]
