"""The pre-run memory estimate: the page's arithmetic against numbers computed by hand, the
family table against a fresh meta-device trace of the shipped configs, and the trace's scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_gui.dataset.memory import FOOTPRINTS, FRAMEWORK_BYTES, GIB, estimate

torch.set_num_threads(1)


def test_sdxl_estimate_at_1024_by_hand():
    est = estimate(FOOTPRINTS["sdxl"], width=1024, height=1024, batch=1, rank=32, optimizer="AdamW8bit",
                   precision="bf16", checkpointing=True, train_te=False, te_cached=True)
    assert est.weights == (2_567_463_684 + 83_653_863) * 2  # U-Net + VAE in bf16, text encoders off the GPU
    assert est.trainable == 32 * 2_659_840 * (4 + 4 + 2)  # fp32 LoRA + fp32 grads + 8-bit Adam moments
    assert est.activations == 111_087 * 128 * 128
    assert est.total == est.weights + est.trainable + est.activations + FRAMEWORK_BYTES
    assert 8 * GIB < est.total < 10 * GIB  # fits a 24 GB card with room, as SDXL LoRA users report
    assert est.sentence().startswith(f"Estimated peak memory: {est.total / GIB:.1f} GB")
    # fp8 storage halves the U-Net's weights; no checkpointing at batch 2 needs far more
    fp8 = estimate(FOOTPRINTS["sdxl"], width=1024, height=1024, batch=1, rank=32, optimizer="AdamW8bit",
                   precision="bf16", unet_precision="fp8", checkpointing=True, train_te=False, te_cached=True)
    assert est.weights - fp8.weights == 2_567_463_684
    big = estimate(FOOTPRINTS["sdxl"], width=1024, height=1024, batch=2, rank=32, optimizer="AdamW",
                   precision="bf16", checkpointing=False, train_te=True, te_cached=False)
    assert big.activations == 2 * 471_877 * 128 * 128 and big.total > 20 * GIB


def _meta(family_dir: str):
    from diffusers import UNet2DConditionModel

    from lora_gui.engine.model_detect import CONFIGS_DIR

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(CONFIGS_DIR / family_dir), subfolder="unet"))


def _call(side: int, context: int, pooled: int, batch: int = 1):
    def call(unet):
        dt, h = torch.bfloat16, side // 8
        kw = {}
        if pooled:
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device="meta", dtype=dt),
                                       "time_ids": torch.empty(batch, 6, device="meta", dtype=dt)}
        return unet(torch.empty(batch, 4, h, h, device="meta", dtype=dt), torch.tensor([10] * batch, device="meta"),
                    torch.empty(batch, 77, context, device="meta", dtype=dt), **kw).sample
    return call


@pytest.mark.slow
@pytest.mark.parametrize("family,folder,side,context,pooled",
                         [("sd1", "sd15", 512, 768, 0), ("sdxl", "sdxl", 1024, 2048, 1280)])
def test_family_table_equals_a_fresh_trace(family, folder, side, context, pooled):
    from lora_gui.engine.memory import traced_activation_bytes
    from lora_gui.engine.network import LoraNetwork, NetworkSpec

    unet = _meta(folder)
    fp = FOOTPRINTS[family]
    assert sum(p.numel() for p in unet.parameters()) == fp.unet_params
    net = LoraNetwork.apply(unet, None, NetworkSpec(rank=1, alpha=1, train_text_encoder=False))
    assert sum(p.numel() for p in net.unet_parameters()) == fp.lora_per_rank_unet
    unet.to(torch.bfloat16)
    px = (side // 8) ** 2
    assert traced_activation_bytes(unet, _call(side, context, pooled), False) / px == pytest.approx(fp.act_full, rel=0.01)
    assert traced_activation_bytes(unet, _call(side, context, pooled), True) / px == pytest.approx(
        fp.act_checkpointed, rel=0.01)


def test_trace_scales_with_pixels_and_batch_and_checkpointing_saves():
    from lora_gui.engine.families.sdxl_demo import tiny_sdxl_pipeline
    from lora_gui.engine.memory import traced_activation_bytes

    unet = tiny_sdxl_pipeline().unet.to("meta").requires_grad_(False)
    from lora_gui.engine.network import LoraNetwork, NetworkSpec

    LoraNetwork.apply(unet, None, NetworkSpec(rank=4, alpha=2, train_text_encoder=False))
    unet.to(torch.bfloat16)
    small = traced_activation_bytes(unet, _call(128, 96, 64), False)
    large = traced_activation_bytes(unet, _call(256, 96, 64), False)
    batch2 = traced_activation_bytes(unet, _call(128, 96, 64, batch=2), False)
    checkpointed = traced_activation_bytes(unet, _call(256, 96, 64), True)
    assert 3.0 < large / small < 4.2  # 4x the pixels; the text context does not grow
    assert batch2 == 2 * small
    assert checkpointed < large


# --- FLUX.1-dev: fp8, NF4 and block swap; the recommendation for the GPU found -----------------------

FLUX_DEV = dict(width=1024, height=1024, batch=1, rank=16, optimizer="AdamW8bit", precision="bf16",
                checkpointing=True, train_te=False, te_cached=True, text_tokens=512)
FLUX_PARAMS, FLUX_VAE, DOUBLE, SINGLE = 11_901_408_320, 83_819_683, 339_831_296, 141_591_808


def test_flux_dev_estimate_at_1024_by_hand_fp8_nf4_and_block_swap():
    fp = FOOTPRINTS["flux"]
    fp8 = estimate(fp, unet_precision="fp8", **FLUX_DEV)
    assert fp8.weights == FLUX_PARAMS * 1 + FLUX_VAE * 2  # 1 byte a weight; T5 and CLIP cached, off the GPU
    assert fp8.trainable == 16 * 5_369_856 * (4 + 4 + 2)
    # 64 x 64 packed image tokens + 512 T5 tokens: each token counts as 2 x 2 latent pixels
    assert fp8.activations == 225_005 * (128 * 128 + 4 * 512)
    assert 16 * GIB < fp8.total < 17 * GIB  # fits a 24 GB card, as Flux LoRA users train with fp8
    nf4 = estimate(fp, unet_precision="nf4", **FLUX_DEV)
    # NF4: 1/2 byte + an 8-bit absmax per 64 weights + a float32 scale per 64 x 256 = 2113/4096 byte a weight
    assert nf4.weights == FLUX_PARAMS * 2113 // 4096 + FLUX_VAE * 2
    assert (nf4.trainable, nf4.activations) == (fp8.trainable, fp8.activations)
    swap = estimate(fp, unet_precision="fp8", blocks_to_swap=8, **FLUX_DEV)
    # 8 -> 4 double + 8 single blocks at home, one (a double block, the largest) on the GPU at a time
    assert fp8.weights - swap.weights == (4 * DOUBLE + 8 * SINGLE - DOUBLE) * 1
    odd = estimate(fp, unet_precision="fp8", blocks_to_swap=7, **FLUX_DEV)
    assert fp8.weights - odd.weights == 3 * DOUBLE + 8 * SINGLE - DOUBLE
    bf16 = estimate(fp, **FLUX_DEV)
    assert bf16.weights - fp8.weights == FLUX_PARAMS


def _flux_form(**overrides):
    from lora_gui.settings import io

    folder = Path(__file__).resolve().parents[1] / "lora_gui" / "engine" / "configs" / "flux-dev"
    return io.apply_overrides(io.load_preset("flux-dev-character-24gb"), [f"model.base_model={folder}",
                                                                         *[f"{k}={v}" for k, v in overrides.items()]])


def test_the_recommendation_for_12_16_24_and_80_gb_comes_from_the_estimate():
    from lora_gui.dataset.memory import USABLE, preview_estimate, recommend

    s = _flux_form()
    assert preview_estimate(s, (1024, 1024)).total == estimate(FOOTPRINTS["flux"], unet_precision="fp8",
                                                               **FLUX_DEV).total  # the preset is FLUX_DEV
    advice = {gb: recommend(s, (1024, 1024), gb * GIB) for gb in (12, 16, 24, 80)}
    assert advice[80].startswith("For a 80 GB GPU at 1024x1024: bf16 base, no gradient checkpointing, cached")
    assert advice[24].startswith("For a 24 GB GPU at 1024x1024: fp8 base storage, gradient checkpointing, cached")
    assert "blocks_to_swap 7," in advice[16] and "blocks_to_swap 20," in advice[12]
    assert all("Or, without swapping, NF4 base storage" in advice[gb] for gb in (12, 16))

    def total(**change):
        return estimate(FOOTPRINTS["flux"], **{**FLUX_DEV, "unet_precision": "fp8", **change}).total

    # the fewest swapped blocks that fit in 95% of the card, by the estimate
    for gb, n in ((16, 7), (12, 20)):
        assert total(blocks_to_swap=n - 1) > USABLE * gb * GIB >= total(blocks_to_swap=n)
    assert total() <= USABLE * 24 * GIB < total(unet_precision=None)
    assert "estimated 16.7 GB" in advice[24]
    tiny = recommend(_flux_form(**{"training.network_dim": 128}), (2048, 2048), 8 * GIB)
    assert tiny.startswith("For a 8 GB GPU at 2048x2048: even NF4 base storage, gradient checkpointing needs about")


def test_the_preview_recommends_for_the_smallest_gpu_found(monkeypatch):
    from types import SimpleNamespace

    from lora_gui.ui import preview

    groups = {name: getattr(_flux_form(), name) for name in preview.NEEDED_GROUPS}
    monkeypatch.setattr(preview, "find_gpus", lambda: [SimpleNamespace(memory_mib=81_559),
                                                       SimpleNamespace(memory_mib=24_564)])
    line = preview._memory_line(groups, {"a.png": (1024, 1024)})
    assert "Estimated peak GPU memory at 1024x1024: 16.7 GB" in line and "For a 24 GB GPU at 1024x1024: fp8" in line
    monkeypatch.setattr(preview, "find_gpus", lambda: [])
    assert "For a" not in preview._memory_line(groups, {"a.png": (1024, 1024)})


@pytest.mark.slow
def test_flux_footprint_equals_a_fresh_trace_of_the_shipped_config():
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel

    from lora_gui.engine.families.flux import Flux
    from lora_gui.engine.families.flux_load import SHIPPED, FluxModel
    from lora_gui.engine.memory import traced_activation_bytes
    from lora_gui.engine.network import NetworkSpec

    with torch.device("meta"):
        t = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(SHIPPED["dev"]),
                                                                                  subfolder="transformer"))
    fp = FOOTPRINTS["flux"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(t) == fp.unet_params
    assert fp.blocks == ((len(t.transformer_blocks), count(t.transformer_blocks[0])),
                         (len(t.single_transformer_blocks), count(t.single_transformer_blocks[0])))
    options = SimpleNamespace(flux_train_blocks="all", flux_train_modulation=True, flux_block_indices="")
    model = FluxModel(*[None] * 4, t.requires_grad_(False), None, None, variant="dev", lora_options=options)
    network = Flux().apply_network(model, NetworkSpec(rank=1, alpha=1, train_text_encoder=False))
    assert sum(p.numel() for p in network.unet_parameters()) == fp.lora_per_rank_unet
    t.to(torch.bfloat16)

    def call(side, tokens):
        def run(m):
            e = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
            n = (side // 16) ** 2
            return m(hidden_states=e(1, n, 64), timestep=e(1), guidance=e(1), pooled_projections=e(1, 768),
                     encoder_hidden_states=e(1, tokens, 4096), txt_ids=e(tokens, 3), img_ids=e(n, 3),
                     return_dict=False)[0]
        return run

    px = 128 * 128 + 4 * 512
    assert traced_activation_bytes(t, call(1024, 512), False) / px == pytest.approx(fp.act_full, rel=0.01)
    assert traced_activation_bytes(t, call(1024, 512), True) / px == pytest.approx(fp.act_checkpointed, rel=0.01)
    # linear in image + text tokens: 512 px with 256 tokens costs what the footprint says
    assert traced_activation_bytes(t, call(512, 256), True) / (64 * 64 + 4 * 256) == pytest.approx(
        fp.act_checkpointed, rel=0.01)
