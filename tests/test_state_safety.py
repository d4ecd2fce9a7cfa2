"""Issue 11 item 2: a state folder is read without running code. Each file of a real saved state is
replaced in turn by a pickle that would create a file when unpickled; accelerate's own pickle files
(``custom_checkpoint_0.pkl`` was read with ``weights_only=False``) are never read."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from lora_gui import events as ev
from lora_gui.engine import state_files
from lora_gui.engine.state_files import StateFileError, load_state
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io

pytestmark = pytest.mark.slow

MARKER = "pwned.txt"


class Payload:
    """Unpickling this opens (creates) a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _settings(demo, out: Path, *extra: str):
    return io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0", "images.max_steps=2",
        "model.save_state=true", *extra])


@pytest.fixture(scope="module")
def saved(demo, tmp_path_factory) -> Path:
    result = run_training(_settings(demo, tmp_path_factory.mktemp("saved")), lambda e: None)
    assert result.status == "finished", result.message
    return result.state_dir


@pytest.fixture(scope="module")
def trainer(demo, tmp_path_factory) -> Trainer:
    t = Trainer(_settings(demo, tmp_path_factory.mktemp("resume")), lambda e: None,
                ev.CommandQueue())
    t.t_start = time.time()
    t._setup()
    t.close()
    return t


def _malicious(path: Path, marker: Path) -> None:
    torch.save(Payload(marker), path)  # the zip-pickle format accelerate writes


def test_a_saved_state_holds_no_pickle(saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "lora.safetensors", "rng_0.json", "rng_0.safetensors", "state.json", "state.safetensors"]
    for path in saved.iterdir():
        assert not path.read_bytes().startswith((b"\x80", b"PK\x03\x04")), path  # pickle / torch zip


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "lora.safetensors",
                                  "rng_0.json", "rng_0.safetensors"])
def test_a_malicious_file_in_each_position_runs_no_code(saved, trainer, tmp_path, name):
    folder = tmp_path / "state"
    shutil.copytree(saved, folder)
    marker = tmp_path / MARKER
    _malicious(folder / name, marker)
    with pytest.raises(StateFileError) as err:
        load_state(trainer, folder)
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith("model.load_previous_save_state: ") and name in message
    assert "is damaged" in message or "does not match" in message


def test_accelerate_pickles_beside_a_state_are_never_read(saved, trainer, tmp_path):
    folder = tmp_path / "state"
    shutil.copytree(saved, folder)
    marker = tmp_path / MARKER
    for name in state_files.PICKLED:
        _malicious(folder / name, marker)
    load_state(trainer, folder)
    assert not marker.exists()
    assert trainer.progress.step == 2


def test_a_state_in_accelerates_pickle_format_is_refused_with_a_sentence(demo, saved, trainer,
                                                                        tmp_path):
    """The folder an older lora-gui wrote: valid optimizer and scheduler files, and a crafted
    custom_checkpoint_0.pkl, which accelerate unpickles with weights_only=False."""
    folder = tmp_path / "old-state"
    folder.mkdir()
    shutil.copy(saved / "lora.safetensors", folder)
    torch.save(trainer.optimizer.state_dict(), folder / "optimizer.bin")
    torch.save(trainer.lr_scheduler.state_dict(), folder / "scheduler.bin")
    marker = tmp_path / MARKER
    _malicious(folder / "random_states_0.pkl", marker)
    _malicious(folder / "custom_checkpoint_0.pkl", marker)
    result = run_training(_settings(demo, tmp_path / "out",
                                    f"model.load_previous_save_state={folder}"), lambda e: None)
    assert not marker.exists()
    assert result.status == "failed"
    assert f"{folder} is a state in accelerate's pickle format" in result.message
    assert "model.lora_model_for_resume" in result.message


def test_a_folder_that_is_not_a_state_gets_a_sentence(trainer, tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(StateFileError, match=r"photos is not a saved state \(no state.json inside\)"):
        load_state(trainer, tmp_path / "photos")


def test_the_codec_round_trips_optimizer_states_with_shared_tensors():
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=16)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors: dict = {}
    tree = state_files.pack(opt.state_dict(), tensors, "optimizer")
    back = state_files.unpack(tree, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple stays a tuple
    assert set(back["state"]) == {0, 1}  # int keys stay ints
    quant = [back["state"][i]["__bnb_optimizer_quant_state__"] for i in (0, 1)]
    shared = [k for k, v in quant[0].items() if isinstance(v, torch.Tensor) and v is quant[1][k]]
    assert shared  # bitsandbytes' shared quantisation maps come back shared
    with pytest.raises(ValueError):
        state_files.unpack({"$eval": "__import__('os')"}, tensors)
