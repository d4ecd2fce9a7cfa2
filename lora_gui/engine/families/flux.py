"""FLUX.1 (Black Forest Labs 2024): dev (guidance-distilled, with a guidance embedding) and schnell.

What differs from SD: a rectified-flow transformer on 2x2-packed 16-channel latents
(``flux_objective``), CLIP-L's pooled output + T5-XXL's hidden states as the text conditioning,
the VAE's latent shift and scale, sd-scripts' Flux LoRA targets and file names (``flux_lora``),
the original checkpoint layout (``flux_convert``), FluxPipeline samples and the flux1 metadata.
The SD-only settings (noise offset, pyramid noise, Min-SNR, v-prediction, zero terminal SNR,
clip skip, SD 2.x) are refused with a sentence.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lora_gui.dataset.memory import most_swappable, swap_split
from lora_gui.engine.families.base import ModelFamily
from lora_gui.engine.families.flux_load import VERSION, load_flux
from lora_gui.engine.families.flux_lora import parse_block_indices
from lora_gui.engine.families.flux_objective import (
    image_ids,
    loss_weights,
    pack,
    sample_sigmas,
    training_sigmas,
    unpack,
)
from lora_gui.engine.model_files import ModelLoadError

ARCHITECTURES = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora"}  # ModelSpec 1.0.1
DEFAULT_T5_TOKENS = {"dev": 512, "schnell": 256}
DEFAULT_SAMPLE_GUIDANCE = 3.5


def swap_plan(num_double: int, num_single: int, n: int) -> tuple[int, int]:
    """sd-scripts' split of ``blocks_to_swap`` N (a single block is about half a double block):
    N // 2 double blocks and 2 (N - N // 2) single blocks, the last ones of each kind."""
    double, single = swap_split(n)
    if double > num_double or single > num_single:
        most = most_swappable(num_double, num_single)
        raise ModelLoadError(
            f"advanced.blocks_to_swap = {n} asks for {double} double and {single} single blocks, but this transformer "
            f"has {num_double} double and {num_single} single blocks: choose at most {most}.")
    return double, single


def swap_blocks(transformer, n: int, *, nf4: bool, checkpointing: bool):
    """Keep the frozen weights of the last blocks in CPU memory, each moved to the GPU only while it
    computes (``engine.block_swap``)."""
    from lora_gui.engine.block_swap import BlockSwap

    if nf4:
        raise ModelLoadError("advanced.blocks_to_swap does not combine with advanced.nf4_base (4-bit weights are "
                             "quantized on the GPU and cannot be copied back and forth): NF4 alone fits FLUX.1-dev's "
                             "transformer in about 6.5 GB; turn one of them off.")
    if not checkpointing:  # autograd keeps the weights a forward used; a checkpoint's recomputation takes them anew
        raise ModelLoadError("advanced.blocks_to_swap needs training.gradient_checkpointing: without it the backward "
                             "pass keeps the GPU copy of every swapped block from the forward pass, so nothing is "
                             "saved; turn gradient checkpointing on.")
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    double, single = swap_plan(len(doubles), len(singles), n)
    return BlockSwap(doubles[len(doubles) - double:] + singles[len(singles) - single:])


def refuse_sd_settings(settings) -> None:
    """The settings that only mean something for SD's DDPM objective, refused for Flux."""
    adv, m, tr = settings.advanced, settings.model, settings.training
    checks = [
        (adv.noise_offset > 0, "advanced.noise_offset", "Flux's flow objective has no offset noise; set it to 0"),
        (adv.multires_noise_iterations > 0, "advanced.multires_noise_iterations",
         "pyramid noise is for SD's DDPM objective; set it to 0"),
        (adv.min_snr_gamma > 0, "advanced.min_snr_gamma",
         "Min-SNR weighting is for SD's DDPM schedule; set it to 0 and use advanced.weighting_scheme"),
        (m.v_parameterization, "model.v_parameterization", "Flux predicts a velocity by design; turn it off"),
        (adv.zero_terminal_snr, "advanced.zero_terminal_snr", "Flux's flow schedule already ends in pure noise; "
         "turn it off"),
        (tr.clip_skip != 1, "training.clip_skip", "Flux uses CLIP-L's pooled output, there is no layer to skip; "
         "set it to 1"),
        (m.v2, "model.v2", "it is for SD 2.x models; turn it off"),
        (adv.conv_dim > 0, "advanced.conv_dim", "Flux has no convolutions to put LoCon on; set it to 0"),
    ]
    for bad, name, why in checks:
        if bad:
            raise ModelLoadError(f"{name} does not apply to Flux: {why}.")


class Flux(ModelFamily):
    name = "flux"

    def load(self, settings):
        refuse_sd_settings(settings)
        model = load_flux(settings)
        model.guidance_scale = settings.advanced.guidance_scale
        model.prediction_type = settings.advanced.model_prediction_type
        model.lora_options = settings.advanced
        try:
            parse_block_indices(settings.advanced.flux_block_indices)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        if settings.advanced.blocks_to_swap:
            model.block_swap = swap_blocks(model.unet, settings.advanced.blocks_to_swap,
                                           nf4=settings.advanced.nf4_base,
                                           checkpointing=settings.training.gradient_checkpointing)
            if not torch.cuda.is_available():
                model.notes.append("advanced.blocks_to_swap: on the CPU the swapped blocks have no other memory to "
                                   "go to; they are copied within it (the same result, no memory saved).")
        return model

    def text_encoders(self, model):
        return [model.text_encoder, model.text_encoder_2]

    def encode_text(self, model, captions, settings, device):
        """(T5 hidden states [B, L, D], CLIP-L pooled output [B, 768]) as FluxPipeline encodes them."""
        tokens = settings.advanced.t5xxl_max_token_length or DEFAULT_T5_TOKENS[model.variant]
        clip = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        pooled = model.text_encoder(clip.input_ids.to(device), output_hidden_states=False).pooler_output
        t5 = model.tokenizer_2(captions, padding="max_length", max_length=tokens, truncation=True,
                               return_tensors="pt")
        states = model.text_encoder_2(t5.input_ids.to(device), output_hidden_states=False)[0]
        return states, pooled

    def meta_extra(self, batch_size):
        return None

    def with_unet(self, model, unet):
        return dataclasses.replace(model, unet=unet, block_swap=None)  # the swap belongs to the model's own blocks

    def meta_denoiser(self, model):
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            return FluxTransformer2DModel.from_config(model.unet.config)

    def meta_network(self, meta_model, spec) -> None:
        self.apply_network(meta_model, dataclasses.replace(spec, train_unet=True, train_text_encoder=False))

    def latent_channels(self, model) -> int:
        return model.vae.config.latent_channels

    # --- objective ------------------------------------------------------------------------------

    def num_train_timesteps(self, model) -> int:
        return 1000

    def sample_timesteps(self, model, latents, generator, settings):
        """t = 1000 sigma, sigma drawn as advanced.timestep_sampling says."""
        adv = settings.advanced
        # The scheduler's sigmas only for "sigma" sampling: the engine draws per sample, and building
        # the 1000-step table for every sample was a measurable part of the tiny demo's step.
        sigmas = training_sigmas(adv.discrete_flow_shift) if adv.timestep_sampling == "sigma" else None
        sigma = sample_sigmas(adv, latents.shape[0], tuple(latents.shape[-2:]), generator, sigmas)
        return (sigma * 1000).to(latents.device)

    def add_noise(self, model, latents, noise, timesteps):
        sigma = _sigma(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, model, latents, noise, timesteps):
        return latents if model.prediction_type == "sigma_scaled" else noise - latents

    def loss_weights(self, model, timesteps, settings):
        return loss_weights(settings.advanced.weighting_scheme, timesteps.float() / 1000)

    def predict(self, model, noisy, timesteps, text, extra, dtype):
        states, pooled = text
        b, _, h, w = noisy.shape
        transformer = model.unet
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), model.guidance_scale, device=noisy.device, dtype=dtype)
        out = transformer(
            hidden_states=pack(noisy).to(dtype), timestep=(timesteps.float() / 1000).to(dtype), guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(h, w, noisy.device, dtype), return_dict=False)[0]
        pred = unpack(out, h, w)
        if model.prediction_type == "additive":
            return pred + noisy
        if model.prediction_type == "sigma_scaled":
            return noisy - _sigma(timesteps, noisy) * pred
        return pred

    def snr(self, model, timesteps):
        """Flow matching x_t = (1 - sigma) x0 + sigma noise: SNR = ((1 - sigma) / sigma)^2, sigma = t / 1000
        (sigma kept above 0 so that t = 0 gives a large finite SNR, not inf)."""
        sigma = (timesteps.float() / 1000).clamp(min=1e-6)
        return ((1 - sigma) / sigma) ** 2

    def v_prediction(self, model) -> bool:
        return False  # the target is the flow (noise - x0) or x0, never diffusers' v

    # --- the LoRA --------------------------------------------------------------------------------

    def apply_network(self, model, spec):
        from lora_gui.engine.families.flux_lora import memory_name, modules_for
        from lora_gui.engine.network import ADAPTER_NAME, LoraNetwork, NetworkSpec, _inject, _Target

        if not isinstance(spec, NetworkSpec):
            raise ValueError("advanced.network_type: Flux trains kohya's LoRA here (sd-scripts' lora_flux targets); "
                             "choose LoRA.")
        if spec.train_text_encoder:
            raise ValueError("Flux LoRAs train the transformer only here: turn text-encoder training off "
                             "(training.text_encoder_lr = 0 or the U-Net-only setting).")
        modules = modules_for(model.unet, model.lora_options)
        model.unet.requires_grad_(False)
        targets = [_Target("unet", p, memory_name(p), False) for parts in modules.values() for p in parts]
        layers = _inject(model.unet, targets, spec)
        for layer in layers.values():  # float32 LoRA on any base precision, as LoraNetwork.apply
            for module in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                module.to(torch.float32).requires_grad_(True)
        if model.block_swap is not None:  # the swapped blocks' LoRA lives on the device like the rest
            swapped = {id(p) for b in model.block_swap.blocks for p in b.parameters()}
            model.block_swap.settle_trainable(next(p.device for p in model.unet.parameters() if id(p) not in swapped))
        network = LoraNetwork(spec, layers, {})
        network.flux_modules = modules
        return network

    def lora_file_tensors(self, model, network, settings, dtype):
        from lora_gui.engine.families.flux_lora import to_diffusers_format, to_kohya

        tensors = network.state_dict_kohya(dtype)
        if settings.model.flux_lora_format == "diffusers":
            return to_diffusers_format(tensors, network.flux_modules)
        return to_kohya(tensors, network.flux_modules)

    def lora_from_file(self, model, network, tensors):
        from lora_gui.engine.families.flux_lora import from_file

        return from_file(tensors, network.flux_modules, network.spec.rank)

    # --- samples and metadata ------------------------------------------------------------------------

    def generate_samples(self, model, prompts, settings, *, encode, out_dir: Path, stem: str, device,
                         dtype) -> list[tuple[Path, str]]:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from lora_gui.engine.sampling import render_samples

        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config), vae=model.vae,
            text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2, transformer=model.unet)
        # kohya's prompt syntax: --g is Flux's guidance (dev); there is no classifier-free guidance, and
        # the sampler is always the flow-matching Euler scheduler above (SD's samplers do not apply: --s is ignored).
        prompts = [dataclasses.replace(p, cfg_scale=p.guidance if p.guidance is not None else DEFAULT_SAMPLE_GUIDANCE,
                                       sampler=None) for p in prompts]

        def embeds(p) -> dict:
            states, pooled = encode([p.prompt])
            return {"prompt_embeds": states.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}

        return render_samples(pipe, prompts, embeds, sampler="euler", scheduler_config=None,
                              seed=settings.samples.test_seed, out_dir=out_dir, stem=stem)

    def write_demo_model(self, model_dir: Path, single_file: Path, seed: int) -> None:
        from lora_gui.engine.families.flux_demo import write_tiny_flux

        write_tiny_flux(model_dir, single_file, seed)

    def metadata_versions(self, model, settings) -> dict[str, str]:
        return {"ss_v2": "False", "ss_base_model_version": VERSION,
                "modelspec.architecture": ARCHITECTURES[model.variant]}


def _sigma(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (timesteps.float() / 1000).to(like.device).view(-1, *([1] * (like.ndim - 1)))
