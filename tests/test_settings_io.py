"""Saving, loading, the skip-list, presets, foreign import, the config CLI and import boundaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_gui.cli import main as cli_main
from lora_gui.settings import FIELD_GROUPS, SettingsError, TrainingSettings, io
from lora_gui.settings.foreign import convert, looks_foreign

FIXTURES = Path(__file__).parent / "fixtures"


def custom() -> TrainingSettings:
    return io.validate_document({
        "model": {"base_model": "/models/a.safetensors", "img_folder": "/data/a", "output_name": "mine",
                  "training_comment": "first"},
        "training": {"learning_rate": 3e-4, "unet_lr": 2e-4, "network_dim": 32,
                     "optimizer_args": "weight_decay=0.1"},
        "images": {"resolution": "768,512", "max_bucket_resolution": 1024},
        "samples": {"sample_prompts": "a cat\na dog --w 512 --h 768"},
    })


def test_save_load_round_trip_is_equal(tmp_path):
    s = custom()
    before = s.model_dump()
    path = io.save_settings(s, tmp_path / "s.json")
    assert s.model_dump() == before  # saving never changes the live settings
    doc = json.loads(path.read_text())
    assert doc["settings_version"] == io.SETTINGS_VERSION
    assert io.load_settings(path) == s
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_sparse_save_round_trips(tmp_path):
    s = custom()
    io.save_settings(s, tmp_path / "sparse.json", sparse=True)
    doc = json.loads((tmp_path / "sparse.json").read_text())
    assert "advanced" not in doc and doc["training"]["network_dim"] == 32
    assert io.load_settings(tmp_path / "sparse.json") == s


def test_skip_listed_keys_survive_a_load(tmp_path):
    theirs = custom()
    io.save_settings(theirs, tmp_path / "theirs.json")
    mine = io.validate_document({"model": {"base_model": "/my/model", "img_folder": "/my/images",
                                           "output_name": "keepme"}})
    loaded = io.load_settings(tmp_path / "theirs.json", current=mine)
    assert loaded.model.base_model == "/my/model"
    assert loaded.model.img_folder == "/my/images"
    assert loaded.model.output_name == "keepme"
    assert loaded.model.training_comment == ""  # skip-listed: mine (empty) kept
    assert loaded.training.network_dim == 32  # not skip-listed: taken from the file
    # an empty skip-list takes everything
    open_mind = mine.model_copy(update={"runs": mine.runs.model_copy(update={"json_load_skip_list": []})})
    assert io.load_settings(tmp_path / "theirs.json", current=open_mind).model.base_model == \
        "/models/a.safetensors"


def test_a_file_cannot_set_the_skip_list(tmp_path):
    doc = io.to_document(custom())
    doc["runs"]["json_load_skip_list"] = []
    (tmp_path / "evil.json").write_text(json.dumps(doc))
    mine = io.validate_document({"model": {"base_model": "/my/model"}})
    loaded = io.load_settings(tmp_path / "evil.json", current=mine)
    assert loaded.runs.json_load_skip_list == mine.runs.json_load_skip_list
    assert loaded.model.base_model == "/my/model"
    assert io.load_settings(tmp_path / "evil.json").runs.json_load_skip_list == \
        TrainingSettings().runs.json_load_skip_list


def test_skip_list_rejects_unknown_names():
    with pytest.raises(SettingsError, match="base_modle"):
        io.validate_document({"runs": {"json_load_skip_list": ["base_modle"]}})


def test_file_errors_are_settings_errors(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        io.load_settings(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(SettingsError, match="line 1"):
        io.load_settings(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SettingsError, match="JSON object"):
        io.load_settings(tmp_path / "list.json")
    (tmp_path / "new.json").write_text('{"settings_version": 99}')
    with pytest.raises(SettingsError, match="newer lora-gui"):
        io.load_settings(tmp_path / "new.json")


def test_migrations_run_by_version(monkeypatch):
    monkeypatch.setattr(io, "SETTINGS_VERSION", 2)
    monkeypatch.setitem(io.MIGRATIONS, 1, lambda d: {**d, "training": {"network_dim": 7}})
    assert io.load_document({"settings_version": 1}).training.network_dim == 7


def test_every_shipped_preset_validates_and_is_sparse():
    presets = io.list_presets()
    assert {"demo-tiny-cpu", "sd15-character", "sd15-style", "sd2-768-v"} <= set(presets)
    for name, path in presets.items():
        doc = json.loads(path.read_text())
        settings = io.load_preset(name)
        assert io.to_document(settings, sparse=True) == doc, f"{name} is not sparse"
    assert io.load_preset("sd2-768-v").model.v_parameterization


def test_preset_keeps_current_paths_it_does_not_set():
    mine = io.validate_document({"model": {"img_folder": "/my/images", "base_model": "/my/model"}})
    s = io.load_preset("sd15-character", current=mine)
    assert s.model.img_folder == "/my/images" and s.training.optimizer == "AdamW8bit"
    demo = io.load_preset("demo-tiny-cpu", current=mine)
    assert demo.model.img_folder == "demo/dataset"  # the preset sets it explicitly
    with pytest.raises(SettingsError, match="no preset named"):
        io.load_preset("nope")


def test_overrides():
    s = io.apply_overrides(TrainingSettings(), ["training.learning_rate=0.0002", "flip_aug=true",
                                                "model.output_name=abc"])
    assert s.training.learning_rate == 2e-4 and s.images.flip_aug and s.model.output_name == "abc"
    with pytest.raises(SettingsError, match="not a setting"):
        io.apply_overrides(TrainingSettings(), ["training.lr=1"])


# --- foreign import ---------------------------------------------------------------------------

def test_kohya_ss_config_imports_with_expected_values_and_ignored_keys():
    doc = json.loads((FIXTURES / "kohya_ss_config.json").read_text())
    assert looks_foreign(doc)
    s, report = convert(doc)
    assert s.model.base_model == "/models/v1-5-pruned.safetensors"
    assert s.model.img_folder == "/data/char/img" and s.model.reg_img_folder == "/data/char/reg"
    assert s.model.output_folder == "/data/char/model" and s.model.output_name == "char-v1"
    assert s.model.lora_model_for_resume == ""
    assert s.training.learning_rate == 1e-4 and s.training.unet_lr == 1e-4
    assert s.training.text_encoder_lr == 5e-5
    assert s.training.lr_scheduler == "cosine_with_restarts"
    assert s.training.lr_scheduler_num_cycles == 3
    assert s.training.lr_warmup_steps == pytest.approx(0.1)  # 10 percent
    assert s.training.optimizer == "AdamW8bit"  # use_8bit_adam
    assert s.training.optimizer_args == "weight_decay=0.1 betas=0.9,0.99"
    assert s.training.batch_size == 2 and s.images.epochs == 8 and s.images.max_steps == 0
    assert s.images.resolution == "512,512" and s.images.buckets
    assert (s.images.min_bucket_resolution, s.images.max_bucket_resolution) == (256, 1024)
    assert s.training.clip_skip == 2 and s.labels.shuffle_caption and s.labels.keep_tokens == 1
    assert s.advanced.attention == "xformers" and s.advanced.conv_dim == 8
    assert s.advanced.conv_alpha == 4 and s.advanced.noise_offset == 0.05
    assert s.training.mixed_precision == "fp16" and s.model.save_precision == "fp16"
    assert s.labels.max_token_length == 150 and s.samples.sample_sampler == "euler_a"
    assert s.advanced.min_snr_gamma == 5 and s.training.gradient_checkpointing
    assert s.training.network_dim == 32 and s.training.network_alpha == 16
    # stop_text_encoder_training (a percentage in kohya_ss), use_wandb and the empty
    # additional_parameters are settings now; the W&B key is a secret lora-gui does not keep.
    assert sorted(report.ignored) == ["wandb_api_key"]
    assert report.mapped["stop_text_encoder_training"] == "training.stop_text_encoder_training"
    assert report.mapped["use_wandb"] == "model.log_with" and s.model.log_with == "tensorboard"
    assert report.mapped["use_8bit_adam"] == "training.optimizer"
    assert report.mapped["LoRA_type"] == "advanced.network_type" and s.advanced.network_type == "LoRA"


def test_seed_001_config_imports_with_expected_values_and_ignored_keys():
    doc = json.loads((FIXTURES / "seed001_config.json").read_text())
    s, report = convert(doc)
    assert s.model.base_model == "/sd/models/model.ckpt" and s.model.img_folder == "/sd/img"
    assert s.model.output_folder == "/sd/out" and s.model.output_name == "ezlora"
    assert s.training.network_dim == 64 and s.training.network_alpha == 32
    assert s.training.lr_scheduler == "cosine_with_restarts" and s.training.lr_scheduler_num_cycles == 4
    assert s.training.lr_scheduler_power == 1.0
    assert s.training.lr_warmup_steps == pytest.approx(0.05)
    assert s.images.epochs == 12 and s.images.resolution == "640" and s.images.max_steps == 0
    assert s.labels.shuffle_caption and s.labels.keep_tokens == 2
    assert s.labels.max_token_length == 225
    assert s.training.gradient_accumulation_steps == 2 and s.training.batch_size == 3
    assert s.training.optimizer == "AdamW8bit" and s.training.mixed_precision == "bf16"
    assert s.model.save_precision == "fp16" and s.model.save_as == "safetensors"
    assert s.advanced.attention == "xformers" and s.training.unet_only
    assert s.samples.test_seed == 23 and s.advanced.prior_loss_weight == 1.0
    assert s.model.vae == "" and s.model.load_previous_save_state == ""
    assert sorted(report.ignored) == ["json_load_skip_list", "load_previous_save_state",
                                      "some_future_key"]
    assert "vae" in report.defaulted and report.mapped["change_output_name"] == "model.output_name"
    # the skip-list of a foreign file is never loaded either
    assert s.runs.json_load_skip_list == TrainingSettings().runs.json_load_skip_list


def test_foreign_import_never_aborts_on_bad_values():
    s, report = convert({"learning_rate": "fast", "train_batch_size": "2", "lr_scheduler": "weird",
                         "output_name": "ok"})
    assert s.training.batch_size == 2 and s.training.learning_rate == 1e-4
    assert "learning_rate" in report.ignored and "lr_scheduler" in report.ignored


# --- property test ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
field_names = st.sampled_from(sorted(FIELD_GROUPS))


@st.composite
def documents(draw):
    doc = {}
    for name in draw(st.lists(field_names, max_size=6)):
        doc.setdefault(FIELD_GROUPS[name], {})[name] = draw(json_values)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=8))] = draw(json_values)
    if draw(st.booleans()):
        doc["settings_version"] = draw(json_values)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents())
def test_loader_returns_settings_or_our_error(doc):
    try:
        result = io.load_document(doc, TrainingSettings())
    except SettingsError as exc:
        assert exc.issues and all(i.path and i.message for i in exc.issues)
    else:
        assert isinstance(result, TrainingSettings)


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(sorted(FIELD_GROUPS) + ["epoch", "net_dim", "xformers",
                                                                    "LoRA_type", "lr_warmup",
                                                                    "use_8bit_adam", "odd"]),
                           json_values, max_size=8))
def test_foreign_import_returns_settings_or_our_error(doc):
    try:
        s, _ = convert(doc)
    except SettingsError as exc:
        assert exc.issues
    else:
        assert isinstance(s, TrainingSettings)


# --- CLI --------------------------------------------------------------------------------------

def test_cli_convert_then_validate(tmp_path, capsys):
    out = tmp_path / "ours.json"
    assert cli_main(["config", "convert", str(FIXTURES / "kohya_ss_config.json"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pretrained_model_name_or_path -> model.base_model" in text
    assert "Not applicable 1 keys" in text and "wandb_api_key" in text
    assert cli_main(["config", "validate", str(out)]) == 0
    assert "valid lora-gui settings" in capsys.readouterr().out


def test_cli_validate_reports_every_error(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"training": {"batch_size": 0, "lr": 1}}))
    assert cli_main(["config", "validate", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "training.batch_size" in err and "training.lr" in err
    assert cli_main(["config", "validate", str(FIXTURES / "kohya_ss_config.json")]) == 2
    assert "config convert" in capsys.readouterr().err


def test_cli_show_preset(capsys):
    assert cli_main(["config", "show", "--preset", "sd2-768-v", "--sparse"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["v_parameterization"] is True


def test_settings_package_imports_neither_torch_nor_gradio():
    code = ("import sys, lora_gui.settings, lora_gui.settings.io, lora_gui.settings.foreign, "
            "lora_gui.cli, lora_gui.events\n"
            "bad = [m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- the one settings copy (save_json_only, save_json_folder) and the one "ours or foreign?" ----------

def test_settings_copy_goes_to_save_json_folder_with_the_flag_off_and_never_overwrites(
        tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = io.validate_document({"model": {"output_folder": str(tmp_path / "out"), "output_name": "cat"},
                              "runs": {"save_json_only": True, "save_json_folder": "~/saved"}})
    first = io.save_settings_copy(s)
    assert first == tmp_path / "home" / "saved" / "cat.json"  # ~ expanded
    copy = io.load_settings(first)
    assert not copy.runs.save_json_only  # the copy trains when it is run later
    assert copy.model_dump() == s.model_copy(update={"runs": copy.runs}).model_dump()
    assert io.save_settings_copy(s) == first  # the same settings again: the same file
    changed = io.apply_overrides(s, ["training.network_dim=8"])
    second = io.save_settings_copy(changed)
    assert second.parent == first.parent and second.name.startswith("cat-") and second != first
    assert io.load_settings(first).training.network_dim == s.training.network_dim  # kept
    assert io.load_settings(second).training.network_dim == 8
    third = io.save_settings_copy(io.apply_overrides(s, ["training.network_dim=4"]))
    assert len({first, second, third}) == 3  # two in the same second do not collide either
    # without save_json_folder: the output folder; a run saving under another name passes it
    plain = io.validate_document({"model": {"output_folder": str(tmp_path / "out"),
                                            "output_name": "cat"}})
    assert io.save_settings_copy(plain, name="cat-2") == tmp_path / "out" / "cat-2.json"


def test_load_any_tells_ours_from_a_foreign_config():
    from lora_gui.settings.foreign import load_any

    ours, report = load_any({"training": {"network_dim": 12}})
    assert report is None and ours.training.network_dim == 12
    kohya = json.loads((FIXTURES / "seed001_config.json").read_text())
    theirs, report = load_any(kohya)
    assert report is not None and report.mapped and theirs == convert(kohya)[0]
    current = io.validate_document({"model": {"img_folder": "/mine"}})
    kept, _ = load_any({"model": {"img_folder": "/theirs"}}, current)
    assert kept.model.img_folder == "/mine"  # the skip-list of the current settings holds
    with pytest.raises(SettingsError, match="training.network_dim"):
        load_any({"training": {"network_dim": -3}})


def test_cli_train_with_save_json_only_writes_the_one_copy(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"model": {"output_folder": str(tmp_path / "o"), "output_name": "n"},
                                "runs": {"save_json_only": True}}))
    assert cli_main(["train", str(path)]) == 0
    assert f"wrote {tmp_path / 'o' / 'n.json'} and did not train" in capsys.readouterr().out
    assert not io.load_settings(tmp_path / "o" / "n.json").runs.save_json_only
