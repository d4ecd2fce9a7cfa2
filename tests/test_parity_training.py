"""kohya parity options reach the training step (issue 12): each option, switched on in the settings,
changes what the Trainer computes exactly as the sd-scripts formula says (hand-computed from the
step's own noise), on the tiny demo model."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_gui import events as ev
from lora_gui.dataset.summary import derive_seed
from lora_gui.engine import checkpoint
from lora_gui.engine.network import load_lora_file, update_weight
from lora_gui.engine.train import Trainer, run_training
from lora_gui.settings import io


def demo_settings(demo, out: Path, *overrides: str):
    return io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0", "images.save_every_n_epochs=0",
        "images.max_steps=2", "training.validation_split=0", *overrides])


def set_up(settings) -> Trainer:
    trainer = Trainer(settings, [].append, ev.CommandQueue())
    trainer.t_start = time.time()
    trainer._setup()
    trainer.close()
    return trainer


@pytest.fixture(scope="module")
def trainer(demo, tmp_path_factory):
    return set_up(demo_settings(demo, tmp_path_factory.mktemp("parity")))


@pytest.fixture
def configured(trainer):
    """The module's Trainer with other settings, for the step functions that read them."""
    original = trainer.settings

    def change(*overrides: str) -> Trainer:
        trainer.settings = io.apply_overrides(original, list(overrides))
        return trainer

    yield change
    trainer.settings = original


@pytest.fixture
def zero_prediction(trainer, monkeypatch):
    """The denoiser predicts 0, and each call's (noisy latents, timesteps) is recorded."""
    calls = []

    def predict(model, noisy, timesteps, text, extra, dtype):
        calls.append((noisy.detach().clone(), timesteps.detach().clone()))
        return torch.zeros_like(noisy)

    monkeypatch.setattr(trainer.family, "predict", predict)
    return calls


def _inputs(trainer, t=500):
    batch = trainer.dataset.load_batch(trainer.dataset.epoch_batches(0)[0][:1], 0, 0)
    latents = trainer._latents(batch)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    return batch, latents, noise, torch.tensor([t])


# --- loss types, weights, masks (sd-scripts conditional_loss, post_process_loss, apply_masked_loss) --


def test_loss_types_in_the_step(configured, zero_prediction):
    """Prediction 0 and target = the noise n (epsilon): l2 = mean n^2, l1 = mean |n|, constant
    pseudo-Huber c = 0.5 x 2: mean 2c (sqrt(n^2 + c^2) - c), smooth L1 with exponential c at
    t = 0 (c = 1): mean 2 (sqrt(n^2 + 1) - 1)."""
    trainer = configured()
    batch, latents, n, t = _inputs(trainer)

    def loss(*overrides, timesteps=t):
        tr = configured(*overrides)
        return float(tr._weighted_loss(latents, n, timesteps, batch.captions, batch.is_reg))

    assert loss("advanced.loss_type=l2") == pytest.approx(float((n**2).mean()), rel=1e-5)
    assert loss("advanced.loss_type=l1") == pytest.approx(float(n.abs().mean()), rel=1e-5)
    c = 1.0
    huber = 2 * c * (torch.sqrt(n**2 + c**2) - c)
    assert loss("advanced.loss_type=huber", "advanced.huber_schedule=constant", "advanced.huber_c=0.5",
                "advanced.huber_scale=2") == pytest.approx(float(huber.mean()), rel=1e-5)
    smooth = 2 * (torch.sqrt(n**2 + 1) - 1)
    assert loss("advanced.loss_type=smooth_l1", "advanced.huber_schedule=exponential",
                timesteps=torch.tensor([0])) == pytest.approx(float(smooth.mean()), rel=1e-5)


def test_timestep_weights_in_the_step(configured, zero_prediction):
    """debiased estimation at t = 500: the l2 loss times 1 / sqrt(SNR(500))."""
    trainer = configured()
    batch, latents, n, t = _inputs(trainer)
    abar = float(trainer.model.noise_scheduler.alphas_cumprod[500])
    tr = configured("advanced.debiased_estimation_loss=true")
    got = float(tr._weighted_loss(latents, n, t, batch.captions, batch.is_reg))
    assert got == pytest.approx(float((n**2).mean()) / math.sqrt(abar / (1 - abar)), rel=1e-5)


def test_masked_loss_in_the_step(configured, zero_prediction):
    """A mask whose left half is 1 (in image pixels): latent pixels there count fully, the rest 0."""
    trainer = configured()
    batch, latents, n, t = _inputs(trainer)
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    mask = torch.zeros(1, 1, h, w)
    mask[..., : w // 2] = 1.0
    got = float(trainer._weighted_loss(latents, n, t, batch.captions, batch.is_reg, mask=mask))
    expected = (n[..., : latents.shape[3] // 2] ** 2).sum() / n.numel()
    assert got == pytest.approx(float(expected), rel=1e-5)


# --- timesteps and noise (sd-scripts get_noise_noisy_latents_and_timesteps) -------------------------


def test_fixed_timestep_and_input_perturbation_in_the_step(configured, zero_prediction):
    """min = max = 500: every timestep is 500 (and nothing is drawn for it); ip_noise_gamma 0.5: the
    noisy latents are add_noise(latents, n + 0.5 e, 500), with n and e each sample's next two draws
    (each sample has its own generator, seeded by its place in the epoch: Trainer._sample_draws)."""
    trainer = configured("advanced.min_timestep=500", "advanced.max_timestep=500",
                         "advanced.ip_noise_gamma=0.5", "advanced.noise_offset=0",
                         "advanced.multires_noise_iterations=0")
    batch = trainer.dataset.load_batch(trainer.dataset.epoch_batches(0)[0], 0, 0)
    trainer._loss(batch, 0, 0)
    noisy, timesteps = zero_prediction[-1]
    assert timesteps.tolist() == [500] * len(batch.paths)
    latents = trainer._latents(batch)
    perturbed = []
    for i in range(latents.shape[0]):
        g = torch.Generator().manual_seed(derive_seed(trainer.settings.training.seed, "noise", 0, 0, i))
        n = torch.randn(latents[i:i + 1].shape, generator=g)
        e = torch.randn(latents[i:i + 1].shape, generator=g)
        perturbed.append(n + 0.5 * e)
    expected = trainer.model.noise_scheduler.add_noise(latents, torch.cat(perturbed), timesteps)
    torch.testing.assert_close(noisy, expected)


def test_timesteps_stay_in_the_range(configured, zero_prediction):
    trainer = configured("advanced.min_timestep=900", "advanced.max_timestep=1000")
    for index, items in enumerate(trainer.dataset.epoch_batches(0)[:4]):
        trainer._loss(trainer.dataset.load_batch(items, 0, index), 0, index)
    drawn = torch.cat([t for _, t in zero_prediction])
    assert int(drawn.min()) >= 900 and int(drawn.max()) <= 999


def test_zero_terminal_snr_rescales_the_run_scheduler(demo, tmp_path):
    plain = set_up(demo_settings(demo, tmp_path / "a"))
    ztsnr = set_up(demo_settings(demo, tmp_path / "b", "advanced.zero_terminal_snr=true"))
    assert float(ztsnr.model.noise_scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(plain.model.noise_scheduler.alphas_cumprod[-1]) > 1e-4
    assert float(ztsnr.model.noise_scheduler.alphas_cumprod[0]) == pytest.approx(
        float(plain.model.noise_scheduler.alphas_cumprod[0]), rel=1e-5)


# --- optimizer groups (sd-scripts prepare_optimizer_params) -----------------------------------------


def test_loraplus_and_block_lr_groups_in_the_run(demo, tmp_path):
    t = set_up(demo_settings(demo, tmp_path, "training.learning_rate=0.001", "advanced.loraplus_lr_ratio=16",
                             "advanced.loraplus_text_encoder_lr_ratio=4", "advanced.down_lr_weight=1,0.5",
                             "training.lr_scheduler=constant", "training.lr_warmup_steps=0"))
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["textencoder"]["lr"] == pytest.approx(1e-3)
    assert groups["textencoder plus"]["lr"] == pytest.approx(4e-3)
    assert groups["unet_block1"]["lr"] == pytest.approx(0.5e-3)  # down block IN1, weight 0.5
    assert groups["unet_block1 plus"]["lr"] == pytest.approx(0.5e-3 * 16)
    ups = {id(p) for g in t.optimizer.param_groups if g["name"].endswith("plus") for p in g["params"]}
    layer = t.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert id(layer.lora_B["default"].weight) in ups and id(layer.lora_A["default"].weight) not in ups
    assert len(t.params) == sum(len(g["params"]) for g in t.optimizer.param_groups)


# --- runs -------------------------------------------------------------------------------------------


def _run(demo, out, *overrides):
    events: list = []
    result = run_training(demo_settings(demo, out, "training.lr_scheduler=constant", "training.lr_warmup_steps=0",
                                        "labels.shuffle_caption=false", *overrides), events.append)
    assert result.status == "finished", result.message
    return load_lora_file(result.output_path)[0], events


def test_stop_text_encoder_training_freezes_the_text_encoder_lora(demo, tmp_path):
    """sd-scripts train_db: the text encoder trains while step < N. 4 steps with N = 2 leave the
    text encoder's LoRA as 2 steps do, while the U-Net's goes on."""
    two, _ = _run(demo, tmp_path / "two", "images.max_steps=2")
    stopped, _ = _run(demo, tmp_path / "four", "images.max_steps=4", "training.stop_text_encoder_training=2")
    te = [k for k in two if k.startswith("lora_te_") and "lora_" in k.split(".")[-2]]
    unet = [k for k in two if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te and all(torch.equal(two[k], stopped[k]) for k in te)
    assert any(not torch.equal(two[k], stopped[k]) for k in unet)


@pytest.mark.slow
def test_scale_weight_norms_caps_every_module_and_reports_keys_scaled(demo, tmp_path):
    tensors, events = _run(demo, tmp_path, "advanced.scale_weight_norms=0.001", "training.learning_rate=0.01")
    losses = [e for e in events if isinstance(e, ev.LossReported)]
    assert losses and all(e.keys_scaled is not None and e.keys_scaled > 0 for e in losses)
    assert all(e.max_key_norm <= 0.001 * (1 + 1e-4) for e in losses)
    for key in (k for k in tensors if k.endswith("lora_down.weight")):
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
        norm = float(update_weight(down, up).norm()) * float(tensors[f"{name}.alpha"]) / down.shape[0]
        assert norm <= 0.001 * (1 + 1e-4), name
    _, plain = _run(demo, tmp_path / "plain")
    assert all(e.keys_scaled is None for e in plain if isinstance(e, ev.LossReported))


def test_schedule_free_saves_the_averaged_weights(demo, tmp_path):
    t = set_up(demo_settings(demo, tmp_path, "training.optimizer=AdamWScheduleFree", "training.lr_scheduler=constant",
                             "training.lr_warmup_steps=0"))
    t._t_loop, t._step_at_loop = time.time(), 0
    for index, items in enumerate(t.dataset.epoch_batches(0)[:2]):
        t._step(t.dataset.load_batch(items, 0, index), index)
    training_point = [p.detach().clone() for p in t.params]
    path, _ = checkpoint.save(t, "sf", state=False)
    assert all(torch.equal(a, p) for a, p in zip(training_point, t.params))  # back in train mode
    t.optimizer.optimizer.eval()
    averaged = t.network.state_dict_kohya()
    t.optimizer.optimizer.train()
    saved = load_lora_file(path)[0]
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert any(not torch.equal(saved[k], v) for k, v in t.network.state_dict_kohya().items())


def test_kohya_dropouts_come_from_the_settings(demo, tmp_path):
    t = set_up(demo_settings(demo, tmp_path, "advanced.rank_dropout=0.25", "advanced.module_dropout=0.1",
                             "advanced.network_dropout=0.1"))
    spec = t.network.spec
    assert (spec.dropout, spec.rank_dropout, spec.module_dropout) == (0.1, 0.25, 0.1)


# --- masks (sd-scripts alpha_mask / conditioning images) -------------------------------------------


def _rgba(path: Path, transparent_left: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((64, 64, 4), 255, dtype=np.uint8)
    if transparent_left:
        pixels[:, :32, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)


def test_alpha_channel_and_mask_folder_masks(tmp_path):
    from lora_gui.dataset.scan import DatasetError, scan_dataset
    from lora_gui.engine.data import DataOptions, TrainDataset

    _rgba(tmp_path / "img" / "1_x" / "a.png")
    base = ["images.resolution=64,64", "images.buckets=false", "training.batch_size=1",
            f"model.img_folder={tmp_path / 'img'}", "advanced.masked_loss=true"]
    info = scan_dataset(tmp_path / "img", None, repeats=1)
    alpha = TrainDataset(info, DataOptions.from_settings(io.apply_overrides(io.defaults(), base)))
    mask = alpha.load_batch(alpha.epoch_batches(0)[0]).mask
    assert mask.shape == (1, 1, 64, 64)
    assert float(mask[..., :32].max()) == 0.0 and float(mask[..., 32:].min()) == 1.0
    # A mask folder mirroring the image folder (any format): the red channel of the mask file.
    masks = tmp_path / "masks" / "1_x"
    masks.mkdir(parents=True)
    grey = np.zeros((64, 64, 3), dtype=np.uint8)
    grey[32:] = 255
    Image.fromarray(grey).save(masks / "a.jpg", quality=100)
    folder = TrainDataset(info, DataOptions.from_settings(io.apply_overrides(
        io.defaults(), base + [f"advanced.mask_folder={tmp_path / 'masks'}"])))
    mask = folder.load_batch(folder.epoch_batches(0)[0]).mask
    assert float(mask[..., :30, :].max()) < 0.05 and float(mask[..., 34:, :].min()) > 0.95
    (masks / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="mask_folder.*a.png"):
        TrainDataset(info, DataOptions.from_settings(io.apply_overrides(
            io.defaults(), base + [f"advanced.mask_folder={tmp_path / 'masks'}"])))


# --- block-wise ranks (sd-scripts get_block_dims_and_alphas, create_network_from_weights) ----------


def _ranks(t) -> dict[str, tuple[int, float]]:
    from lora_gui.engine.network import ranks_in_file

    return ranks_in_file(t.network.state_dict_kohya())


def test_block_dims_alphas_and_conv_block_dims(demo, tmp_path):
    """25 blocks IN0..IN11, MID, OUT0..OUT11: IN1 rank 8 alpha 4, IN2 rank 0 (no LoRA), the rest rank 4
    alpha 2; conv (3x3) LoRA only in IN4 (rank 3, alpha 1.5)."""
    from lora_gui.engine.blocks import block_index

    dims = ["4"] * 25
    dims[1], dims[2] = "8", "0"
    alphas = ["2"] * 25
    alphas[1] = "4"
    conv = ["0"] * 25
    conv[4] = "3"
    t = set_up(demo_settings(demo, tmp_path, f"advanced.block_dims={','.join(dims)}",
                             f"advanced.block_alphas={','.join(alphas)}",
                             f"advanced.conv_block_dims={','.join(conv)}",
                             f"advanced.conv_block_alphas={','.join(['1.5'] * 25)}"))
    ranks = {k: v for k, v in _ranks(t).items() if k.startswith("lora_unet_")}
    by_block: dict[int, set] = {}
    for name, rank in ranks.items():
        by_block.setdefault(block_index(name), set()).add(rank)
    assert by_block[1] == {(8, 4.0)} and 2 not in by_block
    assert by_block[4] == {(4, 2.0), (3, 1.5)}  # 1x1/linear modules, and the 3x3 convs
    assert all(v == {(4, 2.0)} for b, v in by_block.items() if b not in (1, 4))
    conv_modules = [n for n, r in ranks.items() if r == (3, 1.5)]
    assert conv_modules and all("resnets" in n and n.endswith(("conv1", "conv2")) for n in conv_modules)
    # The text encoder keeps the network rank and alpha.
    assert {v for k, v in _ranks(t).items() if k.startswith("lora_te_")} == {(4, 2.0)}


def test_zero_block_lr_weight_leaves_the_block_out(demo, tmp_path):
    """remove_block_dims_and_alphas: a block whose LR weight is 0 (or not above the threshold) gets
    no LoRA module at all, so the saved file has none there either."""
    from lora_gui.engine.blocks import block_index

    t = set_up(demo_settings(demo, tmp_path, "advanced.down_lr_weight=1,1,0.2", "advanced.block_lr_zero_threshold=0.3"))
    blocks = {block_index(n) for n in _ranks(t) if n.startswith("lora_unet_")}
    assert 1 in blocks and 2 not in blocks and 4 in blocks


def test_dim_from_weights_takes_every_rank_from_the_file(demo, tmp_path):
    dims = ",".join(["2"] * 12 + ["6"] + ["3"] * 12)
    first = set_up(demo_settings(demo, tmp_path / "a", f"advanced.block_dims={dims}"))
    with torch.no_grad():
        for p in first.params:
            p.add_(0.01)
    path, _ = checkpoint.save(first, "source", state=False)
    second = set_up(demo_settings(demo, tmp_path / "b", f"model.lora_model_for_resume={path}",
                                  "advanced.dim_from_weights=true"))
    assert _ranks(second) == _ranks(first)
    saved = load_lora_file(path)[0]
    assert all(torch.equal(v, saved[k]) for k, v in second.network.state_dict_kohya().items())


# --- captions in the run -----------------------------------------------------------------------------


def test_weighted_captions_scale_the_states_of_their_tokens(configured):
    """sd-scripts encode_tokens_with_weights: (red:1.5) multiplies the states of red's tokens by 1.5
    and leaves every other state as the plain caption's."""
    plain = configured("labels.weighted_captions=false")._encode(["red circle"])
    tr = configured("labels.weighted_captions=true")
    weighted = tr._encode(["(red:1.5) circle"])
    n_red = len(tr.model.tokenizer("red", add_special_tokens=False).input_ids)
    torch.testing.assert_close(weighted[:, 1:1 + n_red], plain[:, 1:1 + n_red] * 1.5)
    torch.testing.assert_close(weighted[:, 1 + n_red:], plain[:, 1 + n_red:])
    torch.testing.assert_close(weighted[:, :1], plain[:, :1])


def test_token_warmup_cuts_the_captions_of_early_steps(demo, tmp_path):
    t = set_up(demo_settings(demo, tmp_path, "labels.token_warmup_step=1000", "labels.token_warmup_min=1",
                             "labels.shuffle_caption=false", "labels.keep_tokens=0"))
    assert t.text_cache is None  # captions change with the step: no text-encoder cache
    batch = t.dataset.load_batch(t.dataset.epoch_batches(0)[0], 0, 0)
    # The trigger word stays; of the caption's tags only the first (min 1) at step 0.
    assert all(len(c.split(", ")) == 2 and c.startswith("demoshape, ") for c in batch.captions)


# --- LyCORIS networks ---------------------------------------------------------------------------------


def test_loraplus_and_max_norm_with_a_lycoris_network(demo, tmp_path):
    """lycoris-lora's own rules: LoRA+ speeds up the parameters named lora_up (LoCon), and max-norm is
    its apply_max_norm_regularization, reported like kohya's LoRA."""
    t = set_up(demo_settings(demo, tmp_path / "plus", "advanced.network_type=LoCon", "advanced.conv_dim=2",
                             "advanced.loraplus_lr_ratio=16", "training.learning_rate=0.001",
                             "training.lr_scheduler=constant", "training.lr_warmup_steps=0"))
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["unet plus"]["lr"] == pytest.approx(16e-3) and groups["unet"]["lr"] == pytest.approx(1e-3)
    ups = {id(p) for p in groups["unet plus"]["params"]}
    lora = t.network.net.unet_loras[0]
    assert id(lora.lora_up.weight) in ups and id(lora.lora_down.weight) not in ups
    _, events = _run(demo, tmp_path / "norm", "advanced.network_type=LoCon", "advanced.scale_weight_norms=0.001",
                     "training.learning_rate=0.01")
    losses = [e for e in events if isinstance(e, ev.LossReported)]
    assert losses and all(e.keys_scaled is not None and e.keys_scaled > 0 for e in losses)
