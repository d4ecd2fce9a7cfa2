"""kohya parity of the engine's computations (issue 12): each helper against numbers worked out by
hand from the sd-scripts formula its docstring names (kohya-ss/sd-scripts ``library/train_util.py``,
``library/custom_train_functions.py``, ``networks/lora.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_gui.engine import blocks as B
from lora_gui.engine import loss as L
from lora_gui.engine import noise as N
from lora_gui.engine import optim as O
from lora_gui.engine.network import LoraNetwork, NetworkSpec, _inject, _Target
from lora_gui.settings import io


def settings(*overrides: str):
    return io.apply_overrides(io.defaults(), list(overrides))


# --- multires noise (sd-scripts pyramid_noise_like) ------------------------------------------------


def test_multires_level_zero_is_a_second_full_resolution_noise_at_weight_one():
    """sd-scripts' loop starts at i = 0: r^0 = 1, so level 0 is noise of the full size at
    discount^0 = 1. With one iteration the result is (noise + n0) / std(noise + n0). (The loop from
    1 drew a coarser level instead: this test fails there.)"""
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    out = N.pyramid_noise(noise.clone(), 1, 0.3, torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    torch.rand((), generator=replay)  # the level's r (unused at level 0: r^0 = 1)
    n0 = torch.randn(noise.shape, generator=replay)
    expected = (noise + n0) / (noise + n0).std()
    torch.testing.assert_close(out, expected)


def test_multires_two_levels_on_a_2x2_latent_by_hand():
    """2 x 2 latent, discount 0.5: level 0 adds a full 2 x 2 noise at weight 1; level 1 has size
    max(1, int(2 / r)) = 1 for any r in [2, 4): one value per channel, up-sampled to a constant, at
    weight 0.5; the loop then stops (1-pixel level) although 5 iterations were asked for."""
    noise = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    out = N.pyramid_noise(noise.clone(), 5, 0.5, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    torch.rand((), generator=replay)
    n0 = torch.randn((1, 1, 2, 2), generator=replay)
    torch.rand((), generator=replay)
    c1 = float(torch.randn((1, 1, 1, 1), generator=replay))
    total = noise + n0 + 0.5 * c1
    torch.testing.assert_close(out, total / total.std())
    assert torch.randn((), generator=replay).item() == pytest.approx(
        torch.randn((), generator=_after_two_levels()).item())  # nothing more was drawn


def _after_two_levels() -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    N.pyramid_noise(torch.zeros(1, 1, 2, 2), 5, 0.5, g)
    return g


# --- noise offset, input perturbation, timesteps ----------------------------------------------------


def test_noise_offset_random_strength_and_adaptive_scale():
    """sd-scripts get_noise_noisy_latents_and_timesteps + apply_noise_offset: strength =
    U(0,1) * offset (random strength), then + adaptive_scale * |channel mean of the latents|,
    clamped at 0; noise + strength * N(0, 1) per sample and channel."""
    noise = torch.zeros(1, 2, 2, 2)
    latents = torch.tensor([[[[1.0, 3.0], [1.0, 3.0]], [[-4.0, -4.0], [0.0, 0.0]]]])  # means 2, -2
    out = N.offset_noise(noise, 0.1, torch.Generator().manual_seed(3), random_strength=True,
                         adaptive_scale=0.5, latents=latents)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(1, generator=g).item()
    shift = torch.randn(1, 2, 1, 1, generator=g)
    strengths = torch.tensor([0.1 * u + 0.5 * 2.0, 0.1 * u + 0.5 * 2.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(out, (strengths * shift).expand(1, 2, 2, 2))
    # A negative adaptive scale cannot make the offset negative (clamped at 0).
    clamped = N.offset_noise(noise, 0.1, torch.Generator().manual_seed(3), adaptive_scale=-1.0,
                             latents=latents)
    assert torch.equal(clamped, torch.zeros_like(clamped))
    # No offset: nothing at all, whatever the other two say.
    assert N.offset_noise(noise, 0.0, torch.Generator(), random_strength=True, adaptive_scale=1.0,
                          latents=latents) is noise


def test_input_perturbation_noise():
    """ip_noise_gamma: add_noise gets noise + gamma * N(0, 1) (random strength: U(0,1) * gamma)."""
    noise = torch.ones(1, 1, 2, 2)
    out = N.input_perturbation(noise, 0.1, torch.Generator().manual_seed(4))
    extra = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, noise + 0.1 * extra)
    g = torch.Generator().manual_seed(4)
    u = torch.rand(1, generator=g).item()
    extra = torch.randn((1, 1, 2, 2), generator=g)
    torch.testing.assert_close(N.input_perturbation(noise, 0.1, torch.Generator().manual_seed(4), True),
                               noise + 0.1 * u * extra)
    assert N.input_perturbation(noise, 0.0, torch.Generator()) is noise


def test_timesteps_between_min_and_max():
    """sd-scripts get_timesteps: randint(min, max); min == max gives that timestep for all."""
    t = N.sample_timesteps(4096, 200, 300, torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 299
    assert N.sample_timesteps(3, 500, 500, torch.Generator()).tolist() == [500, 500, 500]
    # 0..1000 draws exactly what the engine drew before the option existed.
    assert torch.equal(N.sample_timesteps(8, 0, 1000, torch.Generator().manual_seed(1)),
                       torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1)))


def test_zero_terminal_snr_rescales_the_betas():
    """Lin et al. 2024, Algorithm 1 (sd-scripts fix_noise_scheduler_betas_for_zero_terminal_snr):
    sqrt(abar) is shifted so that the last is 0 and scaled so that the first is unchanged."""
    from diffusers import DDPMScheduler

    old = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    new = N.zero_terminal_snr(old)
    s_old, s_new = old.alphas_cumprod.sqrt(), new.alphas_cumprod.sqrt()
    first, last = float(s_old[0]), float(s_old[-1])
    assert float(new.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)
    assert float(s_new[0]) == pytest.approx(first, rel=1e-5)
    mid = 500
    assert float(s_new[mid]) == pytest.approx((float(s_old[mid]) - last) * first / (first - last), rel=1e-4)
    assert new.config.prediction_type == old.config.prediction_type


# --- losses (sd-scripts conditional_loss, get_huber_threshold_if_needed) ----------------------------


def test_loss_types_by_hand():
    pred, target = torch.tensor([[3.0, -1.0]]), torch.tensor([[0.0, 0.0]])
    c = torch.tensor([0.5])
    assert L.elementwise_loss(pred, target, "l2").tolist() == [[9.0, 1.0]]
    assert L.elementwise_loss(pred, target, "l1").tolist() == [[3.0, 1.0]]
    # pseudo-Huber: 2c (sqrt(d^2 + c^2) - c); smooth L1: the same without the factor c.
    huber = L.elementwise_loss(pred, target, "huber", c)
    smooth = L.elementwise_loss(pred, target, "smooth_l1", c)
    d3, d1 = math.sqrt(9.25) - 0.5, math.sqrt(1.25) - 0.5
    assert huber[0].tolist() == pytest.approx([2 * 0.5 * d3, 2 * 0.5 * d1])
    assert smooth[0].tolist() == pytest.approx([2 * d3, 2 * d1])


def test_huber_schedules_by_hand():
    t = torch.tensor([0, 500, 1000 - 1])
    abar = torch.tensor([0.99, 0.5, 0.01])
    snr = abar / (1 - abar)
    const = L.huber_threshold("constant", 0.1, 2.0, t, snr, 1000)
    assert const.tolist() == pytest.approx([0.2, 0.2, 0.2])
    # exponential: exp(-a t) * scale with a = -ln(c) / T: 1 at t = 0, c at t = T.
    expo = L.huber_threshold("exponential", 0.1, 1.0, t, snr, 1000)
    assert expo.tolist() == pytest.approx([1.0, 0.1**0.5, 0.1 ** (999 / 1000)])
    # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - abar) / abar): sqrt(1/99), 1, sqrt(99).
    snr = L.huber_threshold("snr", 0.1, 1.0, t, snr, 1000)
    expected = [0.9 / (1 + math.sqrt(1 / 99)) ** 2 + 0.1, 0.9 / 4 + 0.1, 0.9 / (1 + math.sqrt(99)) ** 2 + 0.1]
    assert snr.tolist() == pytest.approx(expected, rel=1e-6)


def test_timestep_weights_by_hand():
    """post_process_loss order: Min-SNR, then v-pred-like scale, added v-pred-like loss, debiased."""
    snr = torch.tensor([4.0, 0.25, 5000.0])
    w = L.timestep_weights(snr, v_prediction=False, min_snr_gamma=1.0)
    assert w.tolist() == pytest.approx([1 / 4, 1.0, 1 / 5000])
    w = L.timestep_weights(snr, v_prediction=True, min_snr_gamma=1.0)
    assert w.tolist() == pytest.approx([1 / 5, 0.25 / 1.25, 1 / 5001])
    # SNR / (SNR + 1), SNR capped at 1000.
    w = L.timestep_weights(snr, v_prediction=True, scale_v_pred_loss_like_noise_pred=True)
    assert w.tolist() == pytest.approx([0.8, 0.2, 1000 / 1001])
    # loss + loss / scale * v: 1 + v (SNR + 1) / SNR.
    w = L.timestep_weights(snr, v_prediction=False, v_pred_like_loss=0.5)
    assert w.tolist() == pytest.approx([1 + 0.5 * 5 / 4, 1 + 0.5 * 5, 1 + 0.5 * 1001 / 1000])
    # debiased: 1 / sqrt(SNR) (epsilon), 1 / (SNR + 1) (v).
    w = L.timestep_weights(snr, v_prediction=False, debiased_estimation=True)
    assert w.tolist() == pytest.approx([0.5, 2.0, 1 / math.sqrt(1000)])
    w = L.timestep_weights(snr, v_prediction=True, debiased_estimation=True)
    assert w.tolist() == pytest.approx([0.2, 0.8, 1 / 1001])
    both = L.timestep_weights(snr, v_prediction=False, min_snr_gamma=1.0, debiased_estimation=True)
    assert both.tolist() == pytest.approx([0.25 * 0.5, 1.0 * 2.0, 1 / 5000 / math.sqrt(1000)])
    assert L.timestep_weights(snr, v_prediction=False).tolist() == [1.0, 1.0, 1.0]


def test_masked_loss_averages_the_mask_over_each_latent_pixel():
    """apply_masked_loss: the mask is area-resized to the latent size, then multiplies the loss."""
    loss = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1.0  # top-left latent pixel fully inside
    mask[..., :8, 8:12] = 1.0  # top-right half inside
    out = L.masked(loss, mask)
    assert out[0, 0].tolist() == [[1.0, 0.5], [0.0, 0.0]]
    assert torch.equal(out[0, 0], out[0, 3])


# --- optimizers (sd-scripts get_optimizer / get_scheduler_fix) -------------------------------------


def _one_adafactor_step(*overrides):
    s = settings("training.optimizer=Adafactor", "training.learning_rate=0.5",
                 "training.lr_warmup_steps=0", *overrides)
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = O.build_optimizer(s, [{"params": [p], "lr": 0.5}])
    sched = O.build_scheduler(s, opt, total_steps=10)
    p.grad = torch.tensor([1.0, -1.0])
    opt.step()
    sched.step()
    return p.detach(), opt, sched


@pytest.mark.parametrize("scheduler", ["adafactor", "cosine"])
def test_adafactor_without_arguments_uses_relative_steps_without_warmup_init(scheduler):
    """sd-scripts: relative_step defaults to True and forces Adafactor's own schedule (whatever the
    scheduler); warmup_init stays False. Step 1: lr = min(1e-2, 1/sqrt(1)) * RMS(p) = 0.01 *
    sqrt((9 + 16) / 2); the first update is sign(grad) (second moment = grad^2 at step 1), so
    p = [3 - lr, 4 + lr]. With warmup_init the step is min(1e-6 * 1, 1) = 1e-6: 10,000x smaller."""
    p, opt, sched = _one_adafactor_step(f"training.lr_scheduler={scheduler}")
    lr = 0.01 * math.sqrt(12.5)
    assert p.tolist() == pytest.approx([3 - lr, 4 + lr], rel=1e-5)
    assert opt.defaults["relative_step"] is True and opt.defaults["warmup_init"] is False
    assert type(sched).__name__ == "AdafactorSchedule"


def test_adafactor_with_relative_step_false_uses_the_learning_rate_and_the_scheduler():
    """relative_step=False: lr = learning_rate x RMS(p) (scale_parameter keeps transformers'
    default True, as sd-scripts leaves it) and the chosen scheduler."""
    p, opt, sched = _one_adafactor_step("training.lr_scheduler=constant",
                                        "training.optimizer_args=relative_step=False")
    lr = 0.5 * math.sqrt(12.5)
    assert p.tolist() == pytest.approx([3 - lr, 4 + lr], rel=1e-5)
    assert type(sched).__name__ == "LambdaLR"
    p, _, _ = _one_adafactor_step("training.lr_scheduler=constant",
                                  "training.optimizer_args=relative_step=False scale_parameter=False")
    assert p.tolist() == pytest.approx([2.5, 4.5], rel=1e-5)
    # warmup_init=True turns relative steps back on (sd-scripts), giving the 1e-6 step.
    p, opt, _ = _one_adafactor_step("training.lr_scheduler=constant",
                                    "training.optimizer_args=relative_step=False warmup_init=True")
    assert opt.defaults["relative_step"] is True
    assert p.tolist() == pytest.approx([3 - 1e-6 * math.sqrt(12.5), 4 + 1e-6 * math.sqrt(12.5)], rel=1e-4)


def test_adafactor_schedule_with_warmup_is_a_sentence():
    s = settings("training.optimizer=Adafactor", "training.lr_scheduler=cosine", "training.lr_warmup_steps=2")
    opt = O.build_optimizer(s, [{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-3}])
    with pytest.raises(O.OptimizerSettingError, match="lr_warmup_steps.*relative_step=False"):
        O.build_scheduler(s, opt, total_steps=10)


def test_adamw8bit_keeps_bitsandbytes_min_8bit_size():
    """sd-scripts passes no min_8bit_size: bitsandbytes' 4096 applies, so a tensor of fewer than
    4096 elements keeps 32-bit Adam state and a larger one gets 8-bit state."""
    small, large = nn.Parameter(torch.randn(4095)), nn.Parameter(torch.randn(4096))
    opt = O.build_optimizer(settings("training.optimizer=AdamW8bit"), [{"params": [small, large], "lr": 1e-3}])
    assert opt.args.min_8bit_size == 4096
    small.grad, large.grad = torch.ones_like(small), torch.ones_like(large)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.float32
    assert opt.state[large]["state1"].dtype == torch.uint8


def test_dotted_optimizer_paths_only_from_optimizer_packages():
    cls, _ = O.optimizer_class("pytorch_optimizer.CAME")
    assert cls.__name__ == "CAME"
    assert O.optimizer_class("RAdam")[0] is torch.optim.RAdam  # a bare name: torch.optim
    for bad in ("os.system", "subprocess.Popen", "builtins.eval", "torch.optim.lr_scheduler.os"):
        with pytest.raises(O.OptimizerSettingError, match="training.optimizer"):
            O.optimizer_class(bad)
    with pytest.raises(O.OptimizerSettingError, match="no 'NoSuch'"):
        O.optimizer_class("pytorch_optimizer.NoSuch")
    with pytest.raises(O.OptimizerSettingError, match="not a torch optimizer"):
        O.optimizer_class("torch.optim.lr_scheduler.LambdaLR")


@pytest.mark.parametrize("name", list(O.OPTIMIZERS))
def test_every_kohya_optimizer_name_takes_steps(name):
    """Every name of kohya_ss's optimizer dropdown builds (with sd-scripts' defaults) and moves a
    parameter of 4096 elements (8-bit state) against its gradient."""
    lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-2
    p = nn.Parameter(torch.full((4096,), 0.5))
    opt = O.build_optimizer(settings(f"training.optimizer={name}", "training.lr_scheduler=constant",
                                     "training.lr_warmup_steps=0"), [{"params": [p], "lr": lr}])
    for _ in range(6):  # RAdam variants make no update in their first steps
        p.grad = torch.ones_like(p)
        opt.step()
    assert bool((p < 0.5).all())


def test_schedule_free_gets_a_constant_scheduler_and_train_mode():
    s = settings("training.optimizer=AdamWScheduleFree", "training.lr_scheduler=cosine")
    opt = O.build_optimizer(s, [{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-3}])
    assert O.is_schedule_free(opt) and opt.param_groups[0]["train_mode"] is True
    sched = O.build_scheduler(s, opt, total_steps=4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [1e-3]


def test_block_index_and_weights_as_sd_scripts():
    assert B.block_index("lora_unet_down_blocks_0_attentions_0_proj_in") == 1
    assert B.block_index("lora_unet_down_blocks_0_downsamplers_0_conv") == 3
    assert B.block_index("lora_unet_down_blocks_2_resnets_1_conv1") == 1 + 3 * 2 + 1
    assert B.block_index("lora_unet_mid_block_attentions_0_proj_out") == 12
    assert B.block_index("lora_unet_up_blocks_0_resnets_0_conv1") == 13
    assert B.block_index("lora_unet_up_blocks_3_attentions_2_proj_out") == 13 + 11
    w = B.block_lr_weights("0,0.5", "", "1,1,1,0.2", zero_threshold=0.3)
    assert len(w) == 25 and w[:3] == [0.0, 0.5, 1.0] and w[12] == 1.0 and w[13:18] == [1, 1, 1, 0.0, 1]
    assert B.block_lr_weights("", "", "") is None
    assert B.block_lr_weights("linear", "", "")[:12] == pytest.approx([i / 11 for i in range(12)])
    with pytest.raises(B.BlockSettingError, match="down_lr_weight"):
        B.block_lr_weights("a,b", "", "")


def test_loraplus_and_block_groups():
    """prepare_optimizer_params: LoRA+ gives the lora_up weights lr x ratio; block weights multiply
    each block's lr; groups with lr 0 are dropped."""
    def param():
        return nn.Parameter(torch.zeros(1))

    mods = {"lora_unet_down_blocks_0_attentions_0_proj_in": ([param()], [param()]),
            "lora_unet_up_blocks_0_resnets_0_conv1": ([param()], [param()])}
    groups = O.lora_param_groups(mods, "unet", 1e-4, plus_ratio=16)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("unet", 1e-4, 2), ("unet plus", pytest.approx(16e-4), 2)]
    downs = [d for d, _ in mods.values()]
    assert groups[0]["params"] == [downs[0][0], downs[1][0]]
    plain = O.lora_param_groups(mods, "unet", 1e-4)
    assert plain == [{"params": [p for d, u in mods.values() for p in (*d, *u)], "lr": 1e-4, "name": "unet"}]
    weights = [1.0] * 25
    weights[1], weights[13] = 0.5, 0.0
    groups = O.lora_param_groups(mods, "unet", 1e-4, block_weights=weights)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet_block1", 5e-5)]


def test_custom_scheduler_type_with_its_arguments():
    s = settings("training.lr_scheduler=constant", "training.lr_warmup_steps=0",
                 "training.lr_scheduler_type=CosineAnnealingLR", "training.lr_scheduler_args=T_max=4")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = O.build_scheduler(s, opt, total_steps=4)
    lrs = []
    for _ in range(3):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([(1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3)])
    bad = s.model_copy(update={"training": s.training.model_copy(update={"lr_scheduler_type": "os.system"})})
    with pytest.raises(O.OptimizerSettingError, match="lr_scheduler_type"):  # even past the settings' check
        O.build_scheduler(bad, opt, total_steps=4)


@pytest.mark.parametrize("name,overrides,expected", [
    # transformers' formulas with sd-scripts' arguments, warm-up 2 of 10 steps, lr 1.
    ("inverse_sqrt", ["training.lr_scheduler_timescale=4"], [0.0, 0.5, 1.0, 1 / math.sqrt(1.25),
                                                             1 / math.sqrt(1.5)]),
    ("cosine_with_min_lr", ["training.lr_scheduler_min_lr_ratio=0.2"],
     [0.0, 0.5, 1.0] + [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5 * 2 * k / 8)) for k in (1, 2)]),
])
def test_transformers_schedulers_with_sd_scripts_arguments(name, overrides, expected):
    s = settings(f"training.lr_scheduler={name}", "training.lr_warmup_steps=2", *overrides)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = O.build_scheduler(s, opt, total_steps=10)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected)


# --- network dropout and max norm (sd-scripts networks/lora.py LoRAModule) ---------------------------


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)


def _toy(**dropouts):
    torch.manual_seed(0)
    toy = _Toy()
    spec = NetworkSpec(rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0, **dropouts)
    layers = _inject(toy, [_Target("unet", "proj", "lora_unet_proj", False),
                           _Target("unet", "conv", "lora_unet_conv", True)], spec)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_()
    return toy, layers


def _by_hand(toy, x, transform):
    """base(x) + up(transform(down(x))) * alpha / r for the toy's Linear."""
    layer = toy.proj
    lx = x @ layer.lora_A["default"].weight.T
    return layer.base_layer(x) + transform(lx) @ layer.lora_B["default"].weight.T * 0.5


def test_network_dropout_drops_the_rank_features_after_lora_down():
    toy, _ = _toy(dropout=0.5)
    x = torch.randn(2, 5, 3)
    torch.manual_seed(7)
    out = toy.proj(x)
    torch.manual_seed(7)
    expected = _by_hand(toy, x, lambda lx: nn.functional.dropout(lx, p=0.5))
    torch.testing.assert_close(out, expected)
    toy.eval()
    torch.testing.assert_close(toy.proj(x), _by_hand(toy, x, lambda lx: lx))


def test_rank_dropout_masks_whole_ranks_per_sample_and_rescales():
    toy, _ = _toy(rank_dropout=0.25)
    x = torch.randn(2, 5, 3)
    torch.manual_seed(3)
    mask = (torch.rand((2, 2)) > 0.25).float().unsqueeze(1)
    torch.manual_seed(3)
    torch.testing.assert_close(toy.proj(x), _by_hand(toy, x, lambda lx: lx * mask / 0.75))
    # Conv: the mask is [B, r, 1, 1].
    img = torch.randn(2, 3, 4, 4)
    torch.manual_seed(3)
    conv_mask = (torch.rand((2, 2)) > 0.25).float()[..., None, None]
    layer = toy.conv
    lx = nn.functional.conv2d(img, layer.lora_A["default"].weight, padding=1)  # (no hook)
    expected = layer.base_layer(img) + layer.lora_B["default"](lx * conv_mask / 0.75) * 0.5
    torch.manual_seed(3)
    torch.testing.assert_close(toy.conv(img), expected)


def test_module_dropout_skips_the_whole_update():
    toy, _ = _toy(module_dropout=0.5)
    x = torch.randn(1, 3)
    outs = set()
    for seed in range(8):
        torch.manual_seed(seed)
        skipped = bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        out = toy.proj(x)
        expected = toy.proj.base_layer(x) if skipped else _by_hand(toy, x, lambda lx: lx)
        torch.testing.assert_close(out, expected)
        outs.add(skipped)
    assert outs == {True, False}


def test_dropout_keeps_the_file_format():
    toy, layers = _toy(dropout=0.1, rank_dropout=0.1, module_dropout=0.1)
    plain, plain_layers = _toy()
    a = LoraNetwork(NetworkSpec(rank=2, alpha=1.0), layers, {}).state_dict_kohya()
    b = LoraNetwork(NetworkSpec(rank=2, alpha=1.0), plain_layers, {}).state_dict_kohya()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_max_norm_scales_up_and_down_by_the_square_root_of_the_ratio():
    """apply_max_norm_regularization: ||up @ down * alpha / r|| = ||[[3, 0], [4, 0]]|| = 5 > 2:
    both scaled by sqrt(2 / 5); a module under the limit is left alone."""
    toy, layers = _toy()
    net = LoraNetwork(NetworkSpec(rank=2, alpha=1.0), layers, {})
    with torch.no_grad():
        toy.proj.lora_A["default"].weight.copy_(torch.tensor([[2.0, 0, 0], [0, 0, 0]]))
        toy.proj.lora_B["default"].weight.copy_(torch.tensor([[3.0, 0], [4.0, 0]]))  # x alpha/r = 0.5
        toy.conv.lora_B["default"].weight.zero_()
    count, mean, largest = net.apply_max_norm(2.0)
    k = math.sqrt(2 / 5)
    assert count == 1 and largest == pytest.approx(2.0) and mean == pytest.approx(1.0)
    torch.testing.assert_close(toy.proj.lora_A["default"].weight, torch.tensor([[2.0 * k, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(toy.proj.lora_B["default"].weight, torch.tensor([[3.0 * k, 0], [4.0 * k, 0]]))
    assert net.apply_max_norm(2.0)[0] == 0  # now at the limit


# --- long captions (sd-scripts SdTextEncodingStrategy.encode_tokens) --------------------------------


def test_long_caption_states_are_bos_75_per_chunk_and_the_last_eos():
    """3 chunks of 77 states (value = 100 x chunk + position) -> 227 states: chunk 0's BOS (0),
    positions 1..75 of chunks 0, 1, 2, then the last state of chunk 2 (276)."""
    from lora_gui.engine.text import join_chunks

    chunks = torch.tensor([[100.0 * c + p for p in range(77)] for c in range(3)]).view(3, 77, 1)
    joined = join_chunks(torch.cat([chunks, chunks + 1000]), 3)  # two captions
    expected = [0.0] + [100.0 * c + p for c in range(3) for p in range(1, 76)] + [276.0]
    assert joined.shape == (2, 227, 1)
    assert joined[0, :, 0].tolist() == expected
    assert joined[1, :, 0].tolist() == [v + 1000 for v in expected]
    assert torch.equal(join_chunks(chunks[:1], 1), chunks[:1])  # 75 tokens: the 77 states as they are


# --- regularisation images (sd-scripts DreamBoothDataset.__init__) ---------------------------------


def test_reg_repeats_by_hand():
    from lora_gui.dataset.summary import reg_repeats

    # First pass: each image with its folder's repeats until 10 is reached (4, 8, 12: overshoots).
    assert reg_repeats([4, 4, 4], 10) == [4, 4, 4]
    # 3 after the first pass; then one more each in turn up to 7.
    assert reg_repeats([1, 1, 1], 7) == [3, 2, 2]
    # More reg images than needed: the later ones are not used.
    assert reg_repeats([2, 1, 1, 1], 2) == [2, 0, 0, 0]
    # Two folders 1_a (2 images) and 3_b (1 image) against 10: 1, 1, 3 = 5, then +1 in turn.
    assert reg_repeats([1, 1, 3], 10) == [3, 3, 4]
    assert reg_repeats([], 5) == [] and reg_repeats([2, 2], 0) == [0, 0]


def test_reg_images_in_folder_order_with_their_repeats(tmp_path):
    """2_train: 3 images -> 6 training samples. reg/1_a (r0, r1), reg/3_b (r2): r0 1, r1 1, r2 3
    (= 5), then r0 once more: {r0: 2, r1: 1, r2: 3}, in every epoch."""
    from collections import Counter

    import numpy as np
    from PIL import Image

    from lora_gui.dataset.scan import scan_dataset
    from lora_gui.engine.data import DataOptions, TrainDataset

    def image(path, seed):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)

    for i in range(3):
        image(tmp_path / "img" / "2_train" / f"t{i}.png", i)
    image(tmp_path / "reg" / "1_a" / "r0.png", 10)
    image(tmp_path / "reg" / "1_a" / "r1.png", 11)
    image(tmp_path / "reg" / "3_b" / "r2.png", 12)
    info = scan_dataset(tmp_path / "img", tmp_path / "reg", repeats=1)
    s = settings("images.resolution=64,64", "images.buckets=false", "training.batch_size=1")
    ds = TrainDataset(info, DataOptions.from_settings(s))
    assert Counter(i.path.name for i in ds.reg_items) == {"r0.png": 2, "r1.png": 1, "r2.png": 3}
    for epoch in (0, 1):
        seen = Counter(i.path.name for b in ds.epoch_batches(epoch) for i in b if i.is_reg)
        assert seen == {"r0.png": 2, "r1.png": 1, "r2.png": 3}


# --- captions (sd-scripts BaseDataset.process_caption) ---------------------------------------------


def _captions(**values):
    from lora_gui.dataset.captions import CaptionOptions

    s = settings(*(f"labels.{k}={v}" for k, v in values.items()))
    return CaptionOptions.from_settings(s)


def test_caption_prefix_suffix_and_separators():
    import random

    o = _captions(caption_prefix="photo of", caption_suffix="best quality")
    assert o.apply("mychar, red", "", 0, random.Random(0)) == "photo of mychar, red best quality"
    # keep_tokens_separator: the head (and a second-separator tail) stay; only the middle moves.
    o = _captions(keep_tokens_separator="|||", shuffle_caption="true", keep_tokens="5")
    outs = {o.apply("a, b ||| c, d, e, f ||| g", "", 0, random.Random(seed)) for seed in range(30)}
    assert all(x.startswith("a, b, ") and x.endswith(", g") for x in outs) and len(outs) > 1
    assert {frozenset(x.split(", ")[2:6]) for x in outs} == {frozenset("cdef")}
    # secondary separator: one unit while shuffling, then sd-scripts' caption separator ",".
    o = _captions(secondary_separator=";;;", shuffle_caption="true")
    outs = {o.apply("red hair;;;long hair, smile, hat", "", 0, random.Random(seed)) for seed in range(30)}
    assert all("red hair,long hair" in x for x in outs) and len(outs) > 1


def test_wildcards():
    import random

    from lora_gui.dataset.captions import expand_wildcards

    seen = {expand_wildcards("a {red|blue|green} dress, {{braces}}", random.Random(s)) for s in range(40)}
    assert seen == {f"a {c} dress, {{braces}}" for c in ("red", "blue", "green")}
    o = _captions(enable_wildcard="true")
    assert o.varies and o.plain("{red|blue} dress", "") in ("red dress", "blue dress")


def test_token_warmup_by_hand():
    """sd-scripts: while step < warmup, the movable tags are cut to floor(step (n - min) / warmup) +
    min; from the warm-up step on, all of them. 6 movable tags, min 1, warm-up 10 steps."""
    import random

    from lora_gui.dataset.captions import token_warmup_count

    assert [token_warmup_count(6, s, 1, 10) for s in (0, 1, 2, 5, 9)] == [1, 1, 2, 3, 5]
    o = _captions(token_warmup_min="1", token_warmup_step="10", keep_tokens="1")
    caption = "k, a, b, c, d, e, f"
    assert o.apply(caption, "", 0, random.Random(0), step=5, total_steps=100) == "k, a, b, c"
    assert o.apply(caption, "", 0, random.Random(0), step=10, total_steps=100) == caption
    # A fraction: floor(0.1 x 100) = 10 steps.
    o = _captions(token_warmup_min="1", token_warmup_step="0.1", keep_tokens="1")
    assert o.apply(caption, "", 0, random.Random(0), step=5, total_steps=100) == "k, a, b, c"


# --- weighted captions (sd-scripts parse_prompt_attention) -----------------------------------------


def test_parse_attention_as_a1111():
    from lora_gui.engine.text import parse_attention

    got = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])
    assert parse_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", pytest.approx(1.1))]
    assert parse_attention("[a]") == [("a", pytest.approx(1 / 1.1))]


def test_weighted_token_ids_carry_each_run_weight():
    from lora_gui.engine.text import chunk_token_ids, weighted_token_ids
    from lora_gui.engine.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    ids, weights = weighted_token_ids(tok, ["(red:1.5) circle, [blue]"], 150)
    plain = chunk_token_ids(tok, ["red circle, blue"], 150)
    assert torch.equal(ids, plain) and weights.shape == (1, 2, 77)
    red, circle = tok("red", add_special_tokens=False).input_ids, tok(" circle", add_special_tokens=False).input_ids
    n_red = len(red)
    assert weights[0, 0, 0] == 1.0  # BOS
    assert weights[0, 0, 1:1 + n_red].tolist() == [1.5] * n_red
    assert weights[0, 0, 1 + n_red:1 + n_red + len(circle)].tolist() == [1.0] * len(circle)
    blue = [i for i, t in enumerate(ids[0, 0].tolist()) if t in tok("blue", add_special_tokens=False).input_ids]
    assert blue and all(weights[0, 0, i] == pytest.approx(1 / 1.1) for i in blue)
    assert torch.all(weights[0, 1] == 1.0)  # the empty second chunk
