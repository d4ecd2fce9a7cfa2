"""fp8 weight storage: the forward and the input gradient equal those of the same layer computing
with its weight rounded to fp8 and cast back (the rounding is the only difference)."""

from __future__ import annotations

import torch
from torch import nn

from lora_gui.engine.fp8 import STORAGE, store_in_fp8

torch.set_num_threads(1)


def test_fp8_linear_and_conv_match_the_rounded_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).requires_grad_(False)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in (reference[0], reference[2]):
            layer.weight.copy_(layer.weight.to(STORAGE).float())
    reference.requires_grad_(False)
    assert store_in_fp8(model, torch.float32) == 2
    assert model[0].weight.dtype == STORAGE and model[2].weight.dtype == STORAGE
    x1 = torch.randn(2, 3, 4, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1, out2 = model(x1), reference(x2)
    assert torch.allclose(out1, out2, atol=1e-6)
    out1.square().sum().backward()
    out2.square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
