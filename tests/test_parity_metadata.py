"""kohya parity of what a run writes: the safetensors metadata (read back as A1111's LoRA card reads
it) and the sample prompts (kohya's prompt-line flags). Numbers are computed by hand from
sd-scripts' formulas, named in each docstring."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from lora_gui import events as ev
from lora_gui.engine.metadata import model_hash, sha256_file
from lora_gui.engine.sampling import PromptLineError, SamplePrompt, image_seed, parse_prompt_line
from lora_gui.engine.train import run_training
from lora_gui.settings import io

D = SamplePrompt(prompt="", width=512, height=512, cfg_scale=7.0, steps=20)


# --- sample prompts -------------------------------------------------------------------------------

def test_kohya_flags_in_any_case_and_sizes_rounded_down_to_8():
    """sd-scripts train_util.line_to_prompt_dict (re.IGNORECASE) and sample_image_inference
    (side = max(64, side - side % 8); steps clamped to 1..1000)."""
    p = parse_prompt_line("a cat --W 517 --H 70 --D 9 --L 4.5 --S 5000 --N dog --SS K_EULER", D)
    assert (p.prompt, p.negative, p.width, p.height) == ("a cat", "dog", 512, 64)
    assert (p.seed, p.cfg_scale, p.steps, p.sampler) == (9, 4.5, 1000, "euler")
    small = parse_prompt_line("x --w 20 --h 0", D)
    assert (small.width, small.height) == (64, 64)
    assert p.notes == ()


def test_flags_for_other_families_are_accepted_with_a_note():
    p = parse_prompt_line("a cat --cn pose.png --g 3.5 --ctr 0.5 --rcfg 1 --fs 3 --ss ddpm", D)
    assert p.prompt == "a cat" and p.sampler is None
    assert p.guidance == 3.5  # --g is Flux's guidance (a family of its own here)
    assert [n.split(":")[0] for n in p.notes] == ["--cn pose.png", "--ctr 0.5", "--rcfg 1",
                                                  "--fs 3", "--ss ddpm"]
    assert "ControlNet" in p.notes[0] and "run's sampler" in p.notes[-1]
    with pytest.raises(PromptLineError, match="--zz is not a sample option"):
        parse_prompt_line("a --zz 1", D)
    with pytest.raises(PromptLineError, match="seed"):
        parse_prompt_line("a --d 99999999999", D)


def test_a_prompt_without_a_seed_gets_a_random_one_unless_a_base_seed_is_set():
    assert image_seed(SamplePrompt("a", seed=5), None, 3) == 5
    assert image_seed(SamplePrompt("a"), 100, 3) == 103
    seeds = {image_seed(SamplePrompt("a"), None, 0) for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


# --- a run with hand-made images --------------------------------------------------------------------

def _image(path: Path, size: tuple[int, int], caption: str | None) -> None:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """2_Shapes: 128x128, 96x64, 64x128 (2 repeats); 1_circles: 128x128, 64x64 (1 repeat);
    reg 1_shape: 128x128, 100x100 (no captions: the class token 'shape')."""
    root = tmp_path_factory.mktemp("parity-data")
    shapes, circles, reg = root / "img" / "2_Shapes", root / "img" / "1_circles", root / "reg" / "1_shape"
    for folder in (shapes, circles, reg):
        folder.mkdir(parents=True)
    _image(shapes / "a.png", (128, 128), "Red Square, White Background")
    _image(shapes / "b.png", (96, 64), "red square, blue background")
    _image(shapes / "c.png", (64, 128), "RED SQUARE")
    _image(circles / "d.png", (128, 128), "red circle, white background")
    _image(circles / "e.png", (64, 64), "Red Circle")
    _image(reg / "f.png", (128, 128), None)
    _image(reg / "g.png", (100, 100), None)
    return root


def _settings(demo, dataset: Path, out: Path, *extra: str):
    s = io.load_preset("demo-tiny-cpu")
    return io.apply_overrides(s, [
        f"model.base_model={demo.single_file}", f"model.img_folder={dataset / 'img'}",
        f"model.reg_img_folder={dataset / 'reg'}", f"model.output_folder={out}",
        "images.resolution=128,128", "images.min_bucket_resolution=64", "images.max_bucket_resolution=128",
        "images.flip_aug=false", "labels.shuffle_caption=false", "samples.sample_every_n_epochs=0",
        "samples.sample_prompts=", "training.validation_split=0", "training.validation_every_n_steps=0",
        "triggers.trigger_words=", *extra])


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def a1111_card(metadata: dict[str, str]) -> dict:
    """What AUTOMATIC1111's extensions-builtin/Lora/ui_edit_user_metadata.py shows, reading the
    metadata as its read_metadata_from_safetensors does (values starting with '{' parsed as JSON)."""
    md = {k: (json.loads(v) if v.startswith("{") else v) for k, v in metadata.items()}
    card = {label: md[key] for key, label in (("ss_output_name", "Output name"),
                                              ("ss_sd_model_name", "Model"),
                                              ("ss_clip_skip", "Clip skip"),
                                              ("ss_network_module", "Kohya module"))
            if md.get(key) not in (None, "None")}
    card["Date trained"] = float(md["ss_training_started_at"])
    resolutions: dict[str, int] = {}
    for bucket in md["ss_bucket_info"]["buckets"].values():
        resolution = bucket["resolution"]
        key = f"{resolution[1]}x{resolution[0]}"
        resolutions[key] = resolutions.get(key, 0) + int(bucket["count"])
    card["Resolutions"] = resolutions
    card["Dataset size"] = sum(int(p.get("img_count", 0)) for p in md["ss_dataset_dirs"].values())
    tags: dict[str, int] = {}
    for tag_counts in md["ss_tag_frequency"].values():
        for tag, count in tag_counts.items():
            tags[tag.strip()] = tags.get(tag.strip(), 0) + int(count)
    card["Tags"] = tags
    return card


@pytest.fixture(scope="module")
def run(demo, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity-run")
    s = _settings(demo, dataset, out, "images.epochs=2", "images.save_every_n_epochs=1",
                  "model.metadata_title=Red things", "model.metadata_author=Ann",
                  "model.metadata_license=creativeml-openrail-m", "model.metadata_tags=red, shapes",
                  "advanced.min_timestep=100", "advanced.rank_dropout=0.1")
    events: list[ev.Event] = []
    result = run_training(s, events.append)
    assert result.status == "finished", result.message
    return out, result, events


def test_a1111_card_reads_every_field_from_a_saved_file(run, demo):
    out, result, _ = run
    card = a1111_card(_metadata(result.output_path))
    assert card["Output name"] == "demo-lora" and card["Model"] == "model.safetensors"
    assert card["Clip skip"] == "1" and card["Kohya module"] == "networks.lora"
    # A1111 prints h x w. (128,128): a x2, d, e (64x64, aspect 1) and the 8 reg samples that
    # match the 8 training samples; (128,64): b x2; (64,128): c x2
    assert card["Resolutions"] == {"128x128": 2 + 1 + 1 + 8, "64x128": 2, "128x64": 2}
    assert card["Dataset size"] == 5  # training images (ss_dataset_dirs has no reg folders)
    assert card["Tags"] == {"red square": 3, "white background": 2, "blue background": 1,
                            "red circle": 2, "shape": 2}
    assert card["Date trained"] > 1.7e9


def test_dataset_numbers_as_sd_scripts_records_them(run):
    """train_util.DreamBoothDataset: num_train_images / num_reg_images = sum(repeats x images);
    train_network.py: ss_dataset_dirs / ss_reg_dataset_dirs apart, ss_num_batches_per_epoch =
    len(train_dataloader), ss_total_batch_size = batch x processes x accumulation."""
    _, result, _ = run
    md = _metadata(result.output_path)
    assert md["ss_num_train_images"] == str(3 * 2 + 2 * 1)
    assert md["ss_num_reg_images"] == str(2 * 1)
    assert json.loads(md["ss_dataset_dirs"]) == {"2_Shapes": {"n_repeats": 2, "img_count": 3},
                                                 "1_circles": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_shape": {"n_repeats": 1, "img_count": 2}}
    # 16 samples per epoch (8 train + 8 reg), batches never mix buckets: 1 + 1 + ceil(12 / 2) = 8
    assert md["ss_num_batches_per_epoch"] == "8" and md["ss_total_batch_size"] == "2"
    assert md["ss_steps"] == "16" and md["ss_epoch"] == "2"


def test_bucket_info_has_sd_scripts_structure(run):
    """train_util.BaseDataset.make_buckets: {"buckets": {i: {"resolution", "count"}},
    "mean_img_ar_error"}: used buckets sorted, counts with repeats, error = bucket w/h - image
    w/h averaged over the images: only b (96x64 -> 128x64) is off, by 2 - 1.5, over 7 images."""
    _, result, _ = run
    info = json.loads(_metadata(result.output_path)["ss_bucket_info"])
    assert info["buckets"] == {"0": {"resolution": [64, 128], "count": 2},
                               "1": {"resolution": [128, 64], "count": 2},
                               "2": {"resolution": [128, 128], "count": 12}}
    assert info["mean_img_ar_error"] == pytest.approx(0.5 / 7)


def test_model_hashes_network_args_and_modelspec(run, demo):
    """train_util.model_hash (sha256 of the 64 KiB at 1 MiB, 8 hex) and calculate_sha256 of the base
    file; ss_network_args only with network args; ModelSpec from the metadata_* settings and
    get_sai_model_spec's timestep range."""
    _, result, _ = run
    md = _metadata(result.output_path)
    data = demo.single_file.read_bytes()
    assert md["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert (model_hash(demo.single_file), sha256_file(demo.single_file)) == \
        (md["ss_sd_model_hash"], md["ss_new_sd_model_hash"])
    assert "ss_vae_name" not in md
    assert json.loads(md["ss_network_args"]) == {"rank_dropout": "0.1"}
    assert md["modelspec.title"] == "Red things" and md["modelspec.author"] == "Ann"
    assert md["modelspec.license"] == "creativeml-openrail-m" and md["modelspec.tags"] == "red, shapes"
    assert md["modelspec.timestep_range"] == "100,1000" and md["modelspec.encoder_layer"] == "1"
    assert "modelspec.description" not in md
    assert re.fullmatch(r"[0-9a-f]{64}", md["sshs_model_hash"])


def test_every_save_records_when_it_finished(run):
    out, result, events = run
    saves = [e for e in events if isinstance(e, ev.CheckpointSaved)]
    assert len(saves) == 2
    first, final = (_metadata(Path(e.path)) for e in saves)
    assert first["ss_epoch"] == "1" and first["ss_steps"] == "8"
    assert float(first["ss_training_started_at"]) <= float(first["ss_training_finished_at"]) \
        <= float(final["ss_training_finished_at"])


def test_no_meta_keeps_modelspec_and_hashes_and_no_network_args_key(demo, dataset, tmp_path):
    """train_network.py: minimum metadata (SS_METADATA_MINIMUM_KEYS) + the sai model spec, and
    LoRANetwork.save_weights' sshs hashes; no ss_network_args key without network args."""
    s = _settings(demo, dataset, tmp_path, "images.max_steps=1", "model.no_meta=true")
    result = run_training(s, lambda e: None)
    assert result.status == "finished", result.message
    md = _metadata(result.output_path)
    ss = {k for k in md if k.startswith("ss_")}
    assert ss == {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_v2",
                  "ss_base_model_version"}
    assert md["modelspec.title"] == "demo-lora" and "modelspec.architecture" in md
    assert {"sshs_model_hash", "sshs_legacy_hash"} <= set(md)


def test_sample_png_of_a_prompt_without_seed_carries_the_random_seed(demo, dataset, tmp_path):
    s = _settings(demo, dataset, tmp_path, "images.max_steps=1", "samples.sample_every_n_steps=1",
                  "samples.sample_prompts=red square --W 67 --H 75 --SS ddim --cn pose.png --s 2\n"
                  "red circle --s 2")
    events: list[ev.Event] = []
    result = run_training(s, events.append)
    assert result.status == "finished", result.message
    samples = [e for e in events if isinstance(e, ev.SampleReady)]
    square, circle = (Image.open(e.path) for e in samples[-2:])
    assert square.size == (64, 72)
    text = square.text["parameters"]
    assert "Sampler: ddim" in text and "Size: 64x72" in text
    seeds = [int(re.search(r"Seed: (\d+)", Image.open(e.path).text["parameters"]).group(1))
             for e in samples]
    assert len(set(seeds)) > 1  # drawn afresh for each image
    assert any("--cn pose.png" in e.message for e in events if isinstance(e, ev.Log))
    assert circle.text["parameters"].startswith("red circle\nSteps: 2")


# --- each parity setting where sd-scripts records it ------------------------------------------------

def _facts():
    from lora_gui.engine.metadata import RunFacts

    return RunFacts(versions={"ss_v2": "False", "ss_base_model_version": "sd_v1",
                              "modelspec.architecture": "stable-diffusion-v1/lora"},
                    base_model_name="base.safetensors", num_train_images=8, num_reg_images=2,
                    num_epochs=1, max_train_steps=4, tag_frequency={}, dataset_dirs={},
                    bucket_info=None, session_id="s", started_at=1.0, network_alpha=8.0)


# setting override -> (metadata key, value) as train_network.py's metadata dict (and
# get_sai_model_spec for the modelspec keys) records it.
RECORDED = [
    ("advanced.noise_offset=0.05 & advanced.adaptive_noise_scale=0.01", "ss_adaptive_noise_scale", "0.01"),
    ("advanced.zero_terminal_snr=true", "ss_zero_terminal_snr", "True"),
    ("advanced.scale_weight_norms=1.5", "ss_scale_weight_norms", "1.5"),
    ("advanced.ip_noise_gamma=0.1", "ss_ip_noise_gamma", "0.1"),
    ("advanced.ip_noise_gamma_random_strength=true", "ss_ip_noise_gamma_random_strength", "True"),
    ("advanced.noise_offset_random_strength=true", "ss_noise_offset_random_strength", "True"),
    ("advanced.debiased_estimation_loss=true", "ss_debiased_estimation", "True"),
    ("advanced.loss_type=huber", "ss_loss_type", "huber"),
    ("advanced.huber_schedule=exponential", "ss_huber_schedule", "exponential"),
    ("advanced.huber_c=0.2", "ss_huber_c", "0.2"),
    ("advanced.huber_scale=2", "ss_huber_scale", "2.0"),
    ("advanced.network_dropout=0.1", "ss_network_dropout", "0.1"),
    ("advanced.min_timestep=200", "modelspec.timestep_range", "200,1000"),
    ("advanced.max_timestep=800", "modelspec.timestep_range", "0,800"),
    ("model.metadata_title=T", "modelspec.title", "T"),
    ("model.metadata_author=A", "modelspec.author", "A"),
    ("model.metadata_description=D", "modelspec.description", "D"),
    ("model.metadata_license=L", "modelspec.license", "L"),
    ("model.metadata_tags=a,b", "modelspec.tags", "a,b"),
]
# network args (kohya_ss passes them as --network_args key=value; ss_network_args keeps the strings)
NETWORK_ARGS = [
    ("advanced.rank_dropout=0.25", "rank_dropout", "0.25"),
    ("advanced.module_dropout=0.1", "module_dropout", "0.1"),
    ("advanced.loraplus_lr_ratio=16", "loraplus_lr_ratio", "16.0"),
    ("advanced.loraplus_unet_lr_ratio=8", "loraplus_unet_lr_ratio", "8.0"),
    ("advanced.loraplus_text_encoder_lr_ratio=4", "loraplus_text_encoder_lr_ratio", "4.0"),
    ("advanced.down_lr_weight=sine+0.5", "down_lr_weight", "sine+0.5"),
    ('advanced.mid_lr_weight="0.5"', "mid_lr_weight", "0.5"),
    ("advanced.up_lr_weight=0,0,0,0,0,0,1,1,1,1,1,1", "up_lr_weight", "0,0,0,0,0,0,1,1,1,1,1,1"),
    ("advanced.block_dims=" + ",".join(["4"] * 25), "block_dims", ",".join(["4"] * 25)),
    ("advanced.block_alphas=" + ",".join(["2"] * 25), "block_alphas", ",".join(["2"] * 25)),
    ("advanced.conv_block_dims=" + ",".join(["2"] * 25), "conv_block_dims", ",".join(["2"] * 25)),
    ("advanced.conv_block_alphas=" + ",".join(["1"] * 25), "conv_block_alphas", ",".join(["1"] * 25)),
]


@pytest.mark.parametrize(("override", "key", "value"), RECORDED)
def test_parity_setting_is_recorded_where_sd_scripts_records_it(override, key, value):
    from lora_gui.engine.metadata import build_metadata

    s = io.apply_overrides(io.validate_document({}), override.split(" & "))
    md = build_metadata(s, _facts(), epoch=1, step=4, final=False)
    assert md[key] == value
    default = build_metadata(io.validate_document({}), _facts(), epoch=1, step=4, final=False)
    assert default.get(key) != value


@pytest.mark.parametrize(("override", "key", "value"), NETWORK_ARGS)
def test_network_arg_settings_are_recorded_in_ss_network_args(override, key, value):
    from lora_gui.engine.metadata import build_metadata

    s = io.apply_overrides(io.validate_document({}), [override])
    for meta in (build_metadata(s, _facts(), epoch=1, step=4, final=False),
                 build_metadata(io.apply_overrides(s, ["model.no_meta=true"]), _facts(), epoch=1,
                                step=4, final=False)):
        assert json.loads(meta["ss_network_args"]) == {key: value}
    assert "ss_network_args" not in build_metadata(io.validate_document({}), _facts(), epoch=1,
                                                   step=4, final=False)


@pytest.mark.parametrize(("overrides", "recorded"), [
    (["training.optimizer=AdamW"], "torch.optim.adamw.AdamW"),
    (["training.optimizer=AdamW8bit", 'training.optimizer_args="weight_decay=0.1" "betas=0.9,0.99"'],
     "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1,betas=(0.9, 0.99))"),
    (["training.optimizer=Adafactor", "training.lr_scheduler=adafactor", "training.lr_warmup_steps=0"],
     "transformers.optimization.Adafactor(relative_step=True)"),
    (["training.optimizer=SGDNesterov"], "torch.optim.sgd.SGD(momentum=0.9)"),
])
def test_ss_optimizer_names_the_class_and_its_arguments_as_get_optimizer(overrides, recorded):
    """train_util.get_optimizer: optimizer_name = class.__module__ + '.' + class.__name__,
    optimizer_args = ','.join(f'{k}={v}') of the arguments besides lr; train_network.py records
    ss_optimizer = name + (f'({args})' if args)."""
    from lora_gui.engine.metadata import build_metadata
    from lora_gui.engine.optim import optimizer_record

    s = io.apply_overrides(io.validate_document({}), overrides)
    assert optimizer_record(s) == recorded
    facts = _facts()
    facts.optimizer = recorded
    assert build_metadata(s, facts, epoch=1, step=4, final=False)["ss_optimizer"] == recorded


def test_a_run_records_ss_optimizer_as_get_optimizer(run):
    out, result, _ = run  # the demo preset trains with AdamW and no optimizer_args
    assert _metadata(result.output_path)["ss_optimizer"] == "torch.optim.adamw.AdamW"


def test_vae_and_base_file_hashes_as_train_network_writes_them(tmp_path):
    """train_network.py: ss_vae_name = the file's name, ss_vae_hash = train_util.model_hash (sha256
    of bytes 0x100000..0x110000, 8 hex digits), ss_new_vae_hash = calculate_sha256; a diffusers
    folder gets no hash keys (sd-scripts would write 'IsADirectory')."""
    from lora_gui.engine.metadata import model_file_hashes

    data = bytes(range(256)) * 5000  # 1.28 MB: the 64 KiB window at 1 MiB is inside
    vae = tmp_path / "vae-ft-mse.safetensors"
    vae.write_bytes(data)
    folder = tmp_path / "model"
    folder.mkdir()
    hashes = model_file_hashes(str(folder), str(vae))
    assert hashes == {"ss_vae_name": "vae-ft-mse.safetensors",
                      "ss_vae_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                      "ss_new_vae_hash": hashlib.sha256(data).hexdigest()}
    assert model_file_hashes("", "") == {}


# --- saving and retention -------------------------------------------------------------------------

def _saved(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith("-state")}


@pytest.mark.slow
def test_step_saves_keep_the_last_n_steps_as_sd_scripts(demo, dataset, tmp_path):
    """train_network.py saves every N steps; train_util.get_remove_step_no deletes the save at
    step - last_n - 1 floored to a multiple of N (files: last_n 3 -> at 6 delete 2, at 8 delete 4);
    save_and_remove_state_stepwise does so for the states by save_last_n_steps_state (1: at 4
    delete 2, at 6 delete 4, at 8 delete 6). The final LoRA and its state stay."""
    s = _settings(demo, dataset, tmp_path, "images.max_steps=9", "images.save_every_n_steps=2",
                  "images.save_last_n_steps=3", "images.save_last_n_steps_state=1",
                  "model.save_state=true")
    result = run_training(s, lambda e: None)
    assert result.status == "finished", result.message
    assert _saved(tmp_path) == {"demo-lora-step000006.safetensors", "demo-lora-step000008.safetensors",
                                "demo-lora.safetensors", "demo-lora-step000008-state", "demo-lora-state"}
    assert {p.name for p in result.files if p.exists()} >= {"demo-lora.safetensors"}
    assert all(p.exists() for p in result.files)


@pytest.mark.slow
def test_epoch_saves_keep_the_last_n_epochs_and_the_state_on_train_end(demo, dataset, tmp_path):
    """train_util.get_remove_epoch_no: epoch - save_every_n_epochs x save_last_n_epochs (4 epochs,
    every 1, last 2: saves at 1, 2, 3; at 3 epoch 1 is deleted); save_state_on_train_end writes
    NAME-state at the end without per-epoch states (train_util.save_state_on_train_end)."""
    s = _settings(demo, dataset, tmp_path, "images.epochs=4", "images.save_every_n_epochs=1",
                  "images.save_last_n_epochs=2", "model.save_state_on_train_end=true",
                  "training.batch_size=8")
    result = run_training(s, lambda e: None)
    assert result.status == "finished", result.message
    assert _saved(tmp_path) == {"demo-lora-000002.safetensors", "demo-lora-000003.safetensors",
                                "demo-lora.safetensors", "demo-lora-state"}
    assert result.state_dir is not None and result.state_dir.name == "demo-lora-state"
