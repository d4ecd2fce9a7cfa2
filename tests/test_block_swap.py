"""Block swapping (advanced.blocks_to_swap, issue 14 point 4) on the tiny Flux transformer: the
swapped blocks' frozen weights stay home (CPU) while the model moves to another device (here
'meta': the CPU machine has no GPU) and each is on that device exactly while it computes, forward
and backward; on the CPU the gradients are bit-identical to a run without swapping; the refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_gui.engine.families.flux import Flux, swap_blocks, swap_plan
from lora_gui.engine.families.flux_demo import _transformer_and_vae
from lora_gui.engine.families.flux_load import FluxModel
from lora_gui.engine.model_files import ModelLoadError
from lora_gui.engine.network import NetworkSpec

torch.set_num_threads(1)
ADV = SimpleNamespace(flux_train_blocks="all", flux_train_modulation=True, flux_block_indices="")


def _model(n_swap: int, seed: int = 0):
    """The tiny transformer (2 double + 2 single blocks), swapped as the run does it: at load, before the
    model moves and before the LoRA is added. Returns (FluxModel, BlockSwap or None)."""
    transformer = _transformer_and_vae(seed)[0].requires_grad_(False)
    swap = swap_blocks(transformer, n_swap, nf4=False, checkpointing=True) if n_swap else None
    return FluxModel(*[None] * 4, transformer, None, None, variant="dev", lora_options=ADV, block_swap=swap), swap


def _lora(model, seed: int = 1):
    network = Flux().apply_network(model, NetworkSpec(rank=4, alpha=4, train_text_encoder=False))
    gen = torch.Generator().manual_seed(seed)
    for p in network.unet_parameters():  # nonzero up weights, so that every LoRA weight gets a gradient
        p.data = torch.randn(p.shape, generator=gen).to(p.device)
    return network


def _inputs(device="cpu", dtype=torch.float32, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    return {"hidden_states": r(1, 16, 64), "encoder_hidden_states": r(1, 7, 32), "pooled_projections": r(1, 32),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "guidance": torch.ones(1, device=device, dtype=dtype), "txt_ids": torch.zeros(7, 3, device=device),
            "img_ids": torch.zeros(16, 3, device=device), "return_dict": False}


def _step(model, network, **inputs):
    out = model.unet(**inputs)[0]
    out.float().square().mean().backward()
    return out, [p.grad for p in network.unet_parameters()]


def test_swap_plan_is_sd_scripts_split_and_refuses_more_than_the_model_has():
    assert swap_plan(19, 38, 18) == (9, 18)  # FLUX.1-dev: N // 2 double, 2 (N - N // 2) single blocks
    assert swap_plan(19, 38, 35) == (17, 36)  # sd-scripts' largest for FLUX.1-dev
    assert swap_plan(19, 38, 38) == (19, 38)
    with pytest.raises(ModelLoadError, match=r"blocks_to_swap = 39 .* 19 double and 38 single .* at most 38"):
        swap_plan(19, 38, 39)
    with pytest.raises(ModelLoadError, match="at most 2"):
        swap_plan(2, 2, 3)
    transformer = _transformer_and_vae(0)[0]
    with pytest.raises(ModelLoadError, match="does not combine with advanced.nf4_base"):
        swap_blocks(transformer, 2, nf4=True, checkpointing=True)
    with pytest.raises(ModelLoadError, match="needs training.gradient_checkpointing"):
        swap_blocks(transformer, 2, nf4=False, checkpointing=False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swapping_on_the_cpu_gives_bit_identical_outputs_and_gradients(checkpointing):
    plain, _ = _model(0)
    swapped, swap = _model(2)  # the last double block and both single blocks
    assert [type(b).__name__ for b in swap.blocks] == ["FluxTransformerBlock"] + ["FluxSingleTransformerBlock"] * 2
    results = []
    swap.events = []
    for model in (plain, swapped):
        network = _lora(model)
        model.unet.train()
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        results.append(_step(model, network, **_inputs()))
    # one block on the device at a time; the recomputation (checkpointing) finds its block there already
    assert swap.events == [("on", 0), ("off", 0), ("on", 1), ("off", 1), ("on", 2), ("off", 2), ("on", 1),
                           ("off", 1), ("on", 0)]
    assert torch.equal(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert all(g is not None and torch.equal(a, g) for a, g in zip(results[0][1], results[1][1], strict=True))


def test_moving_the_model_keeps_the_swapped_blocks_frozen_weights_home_in_the_new_dtype():
    model, swap = _model(2)
    model.unet.to("meta", torch.float16)  # the machine's "GPU" (the CPU machine has none)
    frozen = {id(p) for b in swap.blocks for p in b.parameters()}
    assert len(frozen) > 0
    for p in model.unet.parameters():
        expected = "cpu" if id(p) in frozen else "meta"
        assert (p.device.type, p.dtype) == (expected, torch.float16)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_swapped_block_is_on_the_device_exactly_while_it_computes_forward_and_backward(checkpointing):
    """On the CPU the device is the CPU too; a block is "on the device" when its frozen parameters
    point at a copy, "home" when they point at the tensors they were installed with. With gradient
    checkpointing (what a run with blocks_to_swap uses) each block's forward runs again in the backward
    pass, with the weights of that moment: its copy on the device."""
    model, swap = _model(2)
    home = {id(p): p.data_ptr() for b in swap.blocks for p in b.parameters()}
    network = _lora(model)
    frozen = [[p for p in b.parameters() if not p.requires_grad] for b in swap.blocks]
    seen = []

    def probe(index, phase):
        def record(*_):
            where = tuple("home" if all(p.data_ptr() == home[id(p)] for p in ps) else
                          "device" if all(p.data_ptr() != home[id(p)] for p in ps) else "mixed" for ps in frozen)
            seen.append((phase, index, where))
        return record

    for i, block in enumerate(swap.blocks):
        q = block.attn.to_q  # a LoRA layer inside the block: its base weight is needed in both passes
        q.register_forward_pre_hook(probe(i, "forward"))
        q.register_full_backward_pre_hook(probe(i, "backward"))
    model.unet.train()
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    _, grads = _step(model, network, **_inputs())
    on_device = lambda i: tuple("device" if j == i else "home" for j in range(3))  # noqa: E731
    assert all(where == on_device(i) for _, i, where in seen)
    assert [(phase, i) for phase, i, _ in seen] == [("forward", 0), ("forward", 1), ("forward", 2)] + (
        [("forward", 2), ("backward", 2), ("forward", 1), ("backward", 1), ("forward", 0), ("backward", 0)]
        if checkpointing else [("backward", 2), ("backward", 1), ("backward", 0)])
    assert all(g is not None for g in grads)
    swap.offload()
    assert all(p.data_ptr() == home[id(p)] for ps in frozen for p in ps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU test above uses copies)")
def test_on_a_gpu_swapped_blocks_stay_in_cpu_memory_and_gradients_match():
    results, allocated = [], []
    for n in (0, 2):
        model, swap = _model(n)
        before = torch.cuda.memory_allocated()
        model.unet.to("cuda")
        network = _lora(model)
        model.unet.train().enable_gradient_checkpointing()
        allocated.append(torch.cuda.memory_allocated() - before)
        if swap:
            assert all(p.device.type == "cpu" for b in swap.blocks for p in b.parameters() if not p.requires_grad)
            assert all(p.device.type == "cuda" for p in network.unet_parameters())
        results.append(_step(model, network, **_inputs("cuda")))
    assert allocated[1] < allocated[0]
    assert torch.allclose(results[0][0], results[1][0])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_the_run_estimate_counts_only_the_one_swapped_block_on_the_device():
    from lora_gui.engine.memory import parameter_bytes, run_estimate

    model, swap = _model(2)
    full = parameter_bytes(model.unet)
    model.unet.to("meta")
    home, largest = swap.frozen_bytes()
    assert largest == parameter_bytes(swap.blocks[0]) > parameter_bytes(swap.blocks[1])  # the double block
    meta = torch.device("meta")
    assert parameter_bytes(model.unet, device=meta) == full - home
    est = run_estimate(frozen=[model.unet], lora_params=0, optimizer="AdamW", activations=0, gpu=True, device=meta,
                       swapped_in=largest)
    assert est.weights == full - home + largest


def test_a_kohya_config_with_blocks_to_swap_imports_it():
    from lora_gui.settings.foreign import import_foreign

    out = import_foreign({"flux1_checkbox": True, "blocks_to_swap": 18})
    assert out.document["advanced"]["blocks_to_swap"] == 18
    assert "blocks_to_swap" not in out.not_applicable
