"""Issue 11 items 8 and 9 (disk full): files in a dataset that used to kill a run or change it
silently are found by the scan (so the preview shows them), skipped with a warning naming them (or
refused before training with images.strict_dataset), and a full disk ends in a sentence."""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_gui import events as ev
from lora_gui.dataset.scan import DatasetError, scan_dataset
from lora_gui.settings import io as settings_io


def _png(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def _truncated(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype("uint8")).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100)
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "data"
    cats = root / "4_cat"
    cats.mkdir(parents=True)
    _png(cats / "good.png")
    (cats / "good.txt").write_bytes("a café on a street".encode("cp1252"))
    _truncated(cats / "cut.jpg", "JPEG")
    _truncated(cats / "cut.png", "PNG")
    _animated(cats / "moving.webp", "WEBP")
    _animated(cats / "moving.gif", "GIF")
    (cats / "scan.tiff").write_bytes(b"II*\x00")
    (root / "0_dog").mkdir()
    _png(root / "0_dog" / "d.png")
    (root / "horses").mkdir()
    (root / "99999_owl").mkdir()
    return root


def test_the_scan_finds_every_problem_and_names_each_file(messy):
    info = scan_dataset(messy, repeats=1)
    cats = messy / "4_cat"
    assert [image.path.name for image in info.subsets[0].images] == ["good.png", "moving.webp"]
    text = "\n".join(info.warnings)
    assert f"Skipped {cats / 'cut.jpg'}: it is cut short or damaged (image file is truncated" in text
    assert f"Skipped {cats / 'cut.png'}: it is cut short or damaged" in text
    assert f"{cats / 'moving.webp'} is animated: only its first frame is trained on." in text
    assert f"Skipped 2 files in {cats} that are not images lora-gui trains on (moving.gif, scan.tiff)" \
        in text
    assert f"The caption {cats / 'good.txt'} is not UTF-8 text (byte 0xe9 at position 5)" in text
    assert "0_dog: 0 repeats means it is never used" in text
    assert "99999_owl: 99999 repeats is more than 10000" in text
    assert "without an N_ prefix (horses)" in text
    # The caption is read as the Windows-1252 it is, not with U+FFFD in the metadata.
    assert info.subsets[0].images[0].caption == "a café on a street"
    assert len(info.problems) == 3


def test_strict_refuses_the_dataset_naming_the_files(messy):
    with pytest.raises(DatasetError) as err:
        scan_dataset(messy, repeats=1, strict=True)
    message = str(err.value)
    assert message.startswith("The dataset has 3 problem(s) and images.strict_dataset is on:")
    for name in ("cut.jpg", "cut.png", "good.txt"):
        assert name in message
    assert "turn strict_dataset off" in message


def test_a_folder_of_only_unusable_folders_names_them(tmp_path):
    root = tmp_path / "data"
    (root / "0_cat").mkdir(parents=True)
    _png(root / "0_cat" / "a.png")
    (root / "cats").mkdir()
    _png(root / "cats" / "b.png")
    with pytest.raises(DatasetError) as err:
        scan_dataset(root, repeats=1)
    message = str(err.value)
    assert "0_cat (0 repeats means it is never used" in message
    assert "cats (no N_ prefix: rename it like 10_cats)" in message
    (root / "0_cat" / "a.png").unlink()
    shutil.rmtree(root / "0_cat")
    with pytest.raises(DatasetError, match=r"It holds cats \(no N_ prefix"):
        scan_dataset(root, repeats=1)


def test_a_complete_jpeg_with_data_after_its_end_is_not_truncated(tmp_path):
    from lora_gui.dataset.images import image_problem

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "JPEG")
    path = tmp_path / "motion.jpg"
    path.write_bytes(buf.getvalue() + b"\0ftypmp42" + bytes(20000))  # a phone's "motion photo"
    assert image_problem(path) is None


# --- the engine on the demo model ----------------------------------------------------------------

def _settings(demo, data: Path, out: Path, *extra: str):
    return settings_io.apply_overrides(settings_io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={data}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0", "images.max_steps=2",
        *extra])


def _with_a_truncated_image(demo, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo.dataset_dir, data)
    _truncated(data / "5_shapes" / "broken.jpg", "JPEG")
    return data


@pytest.mark.slow
def test_training_skips_a_truncated_image_with_a_warning(demo, tmp_path):
    from lora_gui.engine.train import run_training

    data = _with_a_truncated_image(demo, tmp_path)
    events: list = []
    result = run_training(_settings(demo, data, tmp_path / "out"), events.append)
    assert result.status == "finished", result.message
    warnings = [e.message for e in events if isinstance(e, ev.Log) and e.level == "warning"]
    assert any(str(data / "5_shapes" / "broken.jpg") in w and "cut short" in w for w in warnings)


@pytest.mark.slow
def test_strict_stops_before_training(demo, tmp_path):
    from lora_gui.engine.train import run_training

    data = _with_a_truncated_image(demo, tmp_path)
    events: list = []
    result = run_training(_settings(demo, data, tmp_path / "out", "images.strict_dataset=true"),
                          events.append)
    assert result.status == "failed" and "broken.jpg" in result.message
    assert "images.strict_dataset is on" in result.message
    assert not [e for e in events if isinstance(e, ev.Started)]


@pytest.mark.slow
def test_an_image_damaged_past_the_scan_fails_naming_it(demo, tmp_path):
    from lora_gui.engine.train import run_training

    data = tmp_path / "data"
    shutil.copytree(demo.dataset_dir, data)
    target = data / "3_circles" / "circles_00.png"
    raw = bytearray(target.read_bytes())
    at = raw.index(b"IDAT") + 20
    raw[at:at + 30] = bytes(30)  # the data stream breaks; the end marker is still there
    target.write_bytes(bytes(raw))
    result = run_training(_settings(demo, data, tmp_path / "out"), lambda e: None)
    assert result.status == "failed"
    assert result.message.startswith(f"The image {target} cannot be read")


@pytest.mark.slow
def test_a_full_disk_names_the_folder_and_the_intact_checkpoint(demo, tmp_path, monkeypatch):
    from lora_gui.engine import network, reporting
    from lora_gui.engine.train import run_training

    real_open = network.atomic_open
    calls = []

    def filling_disk(path, mode="wb", encoding=None):
        calls.append(path)
        if len(calls) == 1:
            return real_open(path, mode, encoding)
        return _Full(real_open(path, mode, encoding))

    monkeypatch.setattr(network, "atomic_open", filling_disk)
    monkeypatch.setattr(reporting, "REPORT_INTERVAL_S", 0.0)  # the loss of step 2 at once
    commands = ev.CommandQueue()

    def save_at_step_2(event):
        if isinstance(event, ev.LossReported) and event.step == 2:
            commands.put(ev.SaveNow())

    out = tmp_path / "out"
    result = run_training(_settings(demo, demo.dataset_dir, out, "images.max_steps=4"),
                          save_at_step_2, commands)
    first = out / "demo-lora-step000002.safetensors"
    assert result.status == "failed", result.message
    assert result.message.startswith(f"The disk is full: lora-gui could not write in {out} ")
    assert f"The last LoRA saved before, {first}, is complete and intact" in result.message
    assert "[Errno 28]" not in result.message
    assert first.is_file() and sorted(p.name for p in out.glob("*.safetensors")) == [first.name]


class _Full:
    """An atomic_open context whose file refuses to be written, as on a full disk."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        handle = self.inner.__enter__()

        class Handle:
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)
