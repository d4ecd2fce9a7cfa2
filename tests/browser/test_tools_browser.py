"""The Tools tab in chromium: resize a LoRA in the background worker and download the result."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_gui_browser import box, open_tab, page, server, shot  # noqa: F401 - fixtures and helpers

from lora_gui.engine.network import save_lora

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _rank_8_lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, (out, inp) in enumerate([(40, 24), (64, 32), (16, 16), (12, 20)]):
        name = f"lora_unet_down_blocks_0_attentions_{i}_proj_in"
        sd[f"{name}.lora_down.weight"] = torch.randn(8, inp, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(out, 8, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    return sd


def test_resize_from_the_tools_tab_and_download(server, page, tmp_path):  # noqa: F811
    lora = save_lora(server["cwd"] / "loras" / "style.safetensors", _rank_8_lora(), {"ss_network_dim": "8"},
                     "safetensors")
    open_tab(page, "tools", "Tools")
    box(page, "tool-resize-lora").fill(str(lora))
    box(page, "tool-resize-rank").fill("4")
    page.locator("#tool-resize-save-precision input").first.click()
    page.get_by_role("option", name="float").click()
    page.locator("#tool-start-resize").click()
    try:
        page.wait_for_function("() => /wrote|failed/.test(document.querySelector('#tool-status')?.innerText || '')",
                               timeout=120_000)
    finally:
        shot(page, "tools-resize-done")
    status = page.locator("#tool-status").inner_text()
    assert "style_r4.safetensors" in status and "kept energy mean" in status, status
    assert page.locator("#tool-table").inner_text().count("lora_unet_") == 4
    with page.expect_download() as download:
        page.locator("#tool-download").click()
    saved = tmp_path / "got.safetensors"
    download.value.save_as(saved)
    with safe_open(str(saved), framework="pt") as f:
        downs = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("lora_down.weight")}
        assert f.metadata()["ss_network_dim"] == "4"
    assert len(downs) == 4 and all(shape[0] == 4 for shape in downs.values())
    assert saved.read_bytes() == (lora.parent / "style_r4.safetensors").read_bytes()
