"""The pre-run memory estimate: the page's arithmetic against numbers computed by hand, the
family table against a fresh meta-device trace of the shipped configs, and the trace's scaling."""

from __future__ import annotations

import pytest
import torch

from lora_gui.dataset.memory import FOOTPRINTS, FRAMEWORK_BYTES, GIB, estimate

torch.set_num_threads(1)


def test_sdxl_estimate_at_1024_by_hand():
    est = estimate(FOOTPRINTS["sdxl"], width=1024, height=1024, batch=1, rank=32, optimizer="AdamW8bit",
                   precision="bf16", checkpointing=True, train_te=False, te_cached=True)
    assert est.weights == (2_567_463_684 + 83_653_863) * 2  # U-Net + VAE in bf16, text encoders off the GPU
    assert est.trainable == 32 * 2_659_840 * (4 + 4 + 2)  # fp32 LoRA + fp32 grads + 8-bit Adam moments
    assert est.activations == 167_832 * 128 * 128
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
