"""Building a run: paths, accelerate, the base model (through its family), the data, the LoRA,
the text cache, the optimizer and the log writer. Each function fills in attributes of the
``Trainer`` it is given; ``set_up`` calls them in order."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lora_gui import events as ev
from lora_gui.dataset.scan import scan_dataset
from lora_gui.engine import checkpoint, distributed, evaluation
from lora_gui.engine.data import DataOptions, TrainDataset
from lora_gui.engine.errors import EngineError
from lora_gui.engine.families import split_conditioning
from lora_gui.engine.loader import RunBatches

TEXT_CACHE_CHUNK = 16  # captions encoded at once while filling the text cache
TEXT_ENCODER_HOME = "cpu"  # where frozen text encoders wait once their outputs are cached


def set_up(t) -> None:
    m, tr = t.settings.model, t.settings.training
    torch.manual_seed(tr.seed)
    _require_paths(t.settings)
    _accelerator(t)
    t.out_dir = Path(m.output_folder).expanduser()
    t.out_dir.mkdir(parents=True, exist_ok=True)
    t.name = checkpoint.output_name(t, t.out_dir)
    _load_model(t)
    _load_data(t)
    evaluation.prepare_samples(t)
    _prepare_text_cache(t)
    _place_denoiser(t)
    _build_network(t)
    _build_optimizer(t)
    checkpoint.write_run_files(t)
    if m.load_previous_save_state.strip():
        checkpoint.resume(t, Path(m.load_previous_save_state).expanduser())
    if t.is_main:
        from lora_gui.engine.trackers import open_trackers

        log_root = Path(m.log_dir).expanduser() if m.log_dir.strip() else t.out_dir / "logs"
        t._writer = open_trackers(t.settings, log_root, t.name, t.log)


def _require_paths(settings) -> None:
    m = settings.model
    if not m.base_model.strip():
        raise EngineError("model.base_model is empty: choose a Stable Diffusion model folder or "
                          ".safetensors/.ckpt file.")
    if not m.img_folder.strip():
        raise EngineError("model.img_folder is empty: choose the folder with your training images.")
    for name in ("img_folder", "reg_img_folder", "load_previous_save_state"):
        value = getattr(m, name).strip()
        if value and not Path(value).expanduser().is_dir():
            raise EngineError(f"model.{name}: the folder {value} does not exist: check the path.")
    for name in ("vae", "lora_model_for_resume"):
        value = getattr(m, name).strip()
        if value and not Path(value).expanduser().exists():
            raise EngineError(f"model.{name}: {value} does not exist: check the path or clear it.")


def _accelerator(t) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    tr = t.settings.training
    cuda = torch.cuda.is_available()
    if tr.mixed_precision == "fp16" and not cuda:
        raise EngineError("training.mixed_precision: fp16 needs a CUDA GPU; choose bf16 or no.")
    # accelerate keeps its state in process-wide singletons; a run in the same process as an
    # earlier one (tests, a notebook) must start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    t.acc = Accelerator(mixed_precision=tr.mixed_precision,
                        gradient_accumulation_steps=tr.gradient_accumulation_steps, cpu=not cuda)
    t.is_main = t.acc.is_main_process
    t.device = t.acc.device
    t.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        tr.mixed_precision, torch.float32) if cuda else torch.float32


def _load_model(t) -> None:
    """Load, freeze and cast the base in CPU memory; the VAE and the text encoders go to the device
    (the denoiser waits for ``_place_denoiser``: it is stored smaller first, and the text encoders
    may leave the device before it arrives)."""
    t.log(f"Loading the base model {t.settings.model.base_model}")
    t.model = model = t.family.load(t.settings)
    for note in model.notes:
        t.log(note, "warning")
    t.text_encoders = t.family.text_encoders(model)
    t.unet, t.vae, t.scheduler = model.unet, model.vae, model.noise_scheduler
    for module in (t.unet, *t.text_encoders, t.vae):
        module.requires_grad_(False)
    if t.weight_dtype != torch.float32:  # frozen weights in 16 bits on the GPU; LoRA stays fp32
        for module in (t.unet, *t.text_encoders):
            module.to(dtype=t.weight_dtype)
    if t.settings.advanced.fp8_base and t.settings.advanced.nf4_base:
        raise EngineError("advanced.fp8_base and advanced.nf4_base both store the base smaller: choose one.")
    for module in (*t.text_encoders, t.vae):
        module.to(t.device)
    if t.settings.advanced.attention == "xformers":
        try:
            t.unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise EngineError(f"advanced.attention: xformers does not work here ({exc}); choose "
                              "sdpa.") from None


def _place_denoiser(t) -> None:
    """The frozen denoiser onto the device, stored smaller first when fp8 or NF4 is chosen: the
    conversion runs in CPU memory, so the 16-bit weights never sit on the GPU whole (FLUX.1-dev's
    transformer is 24 GB in bf16). Blocks that ``advanced.blocks_to_swap`` swaps stay in CPU memory
    (``engine.block_swap`` keeps them home through ``.to``)."""
    if t.settings.advanced.fp8_base:
        _fp8_unet(t)
    if t.settings.advanced.nf4_base:
        _nf4_unet(t)  # each 4-bit layer is quantized as it moves to the device
    t.unet.to(t.device)


def _fp8_unet(t) -> None:
    """fp8 storage of the frozen U-Net (``engine.fp8``): each layer's weight is cast to the compute
    precision only while that layer computes."""
    from lora_gui.engine.fp8 import store_in_fp8

    try:
        store_in_fp8(t.unet, t.weight_dtype)
    except (RuntimeError, TypeError) as exc:  # a torch or device without float8
        raise EngineError(f"advanced.fp8_base: this machine cannot store the U-Net in fp8 ({exc}); "
                          "turn fp8 U-Net storage off.") from None
    if t.device.type == "cpu":
        t.log("fp8 U-Net storage on the CPU saves memory but not time: every layer is cast back to "
              "float32 to compute.", "warning")


def _nf4_unet(t) -> None:
    """4-bit NF4 storage of the frozen denoiser's linears (``engine.nf4``)."""
    from lora_gui.engine.nf4 import store_in_nf4

    try:
        count = store_in_nf4(t.unet, t.weight_dtype, t.device)
    except (ImportError, RuntimeError, ValueError) as exc:  # no bitsandbytes, or no kernel for this device
        raise EngineError(f"advanced.nf4_base: this machine cannot store the base in 4 bits ({exc}); turn NF4 "
                          "storage off or use fp8 storage.") from None
    t.log(f"Stored {count} linear layers of the base in 4-bit NF4" + (
        " (on the CPU bitsandbytes computes with its slow reference kernels)" if t.device.type == "cpu" else ""))


def _load_data(t) -> None:
    s, m = t.settings, t.settings.model
    t.info = scan_dataset(m.img_folder, m.reg_img_folder.strip() or None, repeats=s.images.repeats,
                          caption_extension=s.labels.caption_extension,
                          trigger_words=s.triggers.trigger_words, strict=s.images.strict_dataset)
    for warning in t.info.warnings:
        t.log(warning, "warning")
    t.dataset = TrainDataset(t.info, DataOptions.from_settings(s))
    t.run_batches = RunBatches(t.dataset, t.acc.process_index, t.acc.num_processes)
    per_epoch = t.run_batches.per_epoch()
    if per_epoch == 0:
        raise EngineError(f"model.img_folder: no training images are left in {m.img_folder} "
                          "(after the validation split): add images or lower the split.")
    # Distinct images trained on (the held-out validation images are not).
    t.num_train_images = t.info.num_train_images - len(t.dataset.validation_items())
    t.plan = s.plan_steps(per_epoch * t.acc.num_processes, t.acc.num_processes)
    t.dataset.set_step_plan(t.plan.steps_per_epoch, s.training.gradient_accumulation_steps, t.plan.total_steps)
    if s.images.cache_latents:
        _cache_latents(t)


def _cache_latents(t) -> None:
    total = len(t.dataset.cache_requests())
    t.log(f"Caching the latents of {total} images")

    def on_progress(done: int, total: int) -> None:
        t.emit(ev.Progress(step=done, total_steps=total, epoch=0, epochs=0,
                           elapsed_s=time.time() - t.t_start, steps_per_s=0.0, eta_s=0.0,
                           phase="caching latents"))

    def build():
        with torch.no_grad():
            return t.dataset.cache_latents(t.vae, to_disk=t.settings.images.cache_latents_to_disk,
                                           on_progress=on_progress)

    distributed.share_latent_cache(t, build)
    if t.device.type == "cuda":
        t.vae.to("cpu")  # only the samples need it again


def _build_network(t) -> None:
    from lora_gui.engine.blocks import BlockSettingError, block_layout
    from lora_gui.engine.network import NetworkSpec, load_lora_file, ranks_in_file
    from lora_gui.engine.network_lycoris import check_file_type, network_spec, spec_label

    s, m = t.settings, t.settings.model
    tensors = load_lora_file(m.lora_model_for_resume)[0] if m.lora_model_for_resume.strip() else None
    try:  # kohya's LoRA or a LyCORIS network; the blocks as the family's U-Net numbers them
        spec = network_spec(s, block_layout(t.family.name, s.advanced))
    except BlockSettingError as exc:  # a block-wise setting that is not a number list or not for this family
        raise EngineError(str(exc)) from None
    if s.advanced.dim_from_weights and tensors is not None and isinstance(spec, NetworkSpec):
        spec.module_ranks = ranks_in_file(tensors)  # sd-scripts create_network_from_weights
    try:
        t.network = t.family.apply_network(t.model, spec)
    except ValueError as exc:  # one sentence naming the setting (the ranks of the blocks)
        raise EngineError(str(exc)) from None
    t.network_alpha = s.training.network_alpha
    if tensors is not None:
        try:
            check_file_type(spec, tensors, f"The file {m.lora_model_for_resume}")
            t.network.load_state_dict_kohya(t.family.lora_from_file(t.model, t.network, tensors))
        except ValueError as exc:
            raise EngineError(f"model.lora_model_for_resume: {exc}") from None
        alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha") and "attn" in k]
        if alphas:
            t.network_alpha = max(set(alphas), key=alphas.count)
        t.log(f"Starting from the LoRA weights of {m.lora_model_for_resume}")
    names = t.network.module_names()
    t.log(f"{spec_label(spec)} on {len(names.get('unet', []))} U-Net and {len(names.get('text_encoder', []))} "
          "text-encoder modules")
    if s.training.gradient_checkpointing:
        t.unet.enable_gradient_checkpointing()
        if s.train_text_encoder:
            for encoder in t.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t.unet.train(s.train_unet)
    for encoder in t.text_encoders:
        encoder.train(s.train_text_encoder)
    _log_memory_estimate(t)


def _log_memory_estimate(t) -> None:
    from lora_gui.engine.memory import estimate_for_run

    buckets = {item.bucket for item in t.dataset.train_items + t.dataset.reg_items}
    t.memory_estimate = estimate_for_run(t.family, t.model, t.settings, t.network, t.text_encoders, buckets,
                                         t.device, text=t.prompt_cache[""] if t.prompt_cache else None)
    t.log(t.memory_estimate.sentence())


def _prepare_text_cache(t) -> None:
    """Frozen text encoders with captions that never change: encode each caption once, then the
    sample prompts, and let the text encoders leave the device (``_release_text_encoders``)."""
    t.text_cache = t.prompt_cache = None
    if t.settings.train_text_encoder or t.dataset.options.captions.varies:
        return
    for encoder in t.text_encoders:
        encoder.train(False)  # frozen: no dropout in what is cached (T5's config has some)
    ds = t.dataset
    captions = sorted({ds.fixed_caption(item) for item in
                       ds.train_items + ds.reg_items + ds.validation_items()})

    def compute() -> dict:
        cache = {}
        with torch.no_grad(), t.acc.autocast():
            for i in range(0, len(captions), TEXT_CACHE_CHUNK):
                chunk = captions[i:i + TEXT_CACHE_CHUNK]
                cache.update(zip(chunk, split_conditioning(t._encode(chunk))))
        return cache

    t.text_cache = distributed.share_text_cache(t, compute)
    t.log(f"Cached the text encoder's output for {len(captions)} captions")
    _release_text_encoders(t)


def _release_text_encoders(t) -> None:
    """Encode the sample prompts (and the empty caption, whose shapes the memory estimate traces)
    one at a time outside autocast, as sampling encodes them, so the images stay the same bit for
    bit; then move the text encoders to CPU memory (T5-XXL is ~9 GB in bf16; the memory estimate
    counts cached text encoders off the GPU). A prompt not in this cache brings them back for that
    one encoding (``evaluation.text_encoders_on_device``)."""
    texts = dict.fromkeys(["", *(text for p in t.sample_prompts for text in (p.prompt, p.negative))])
    with torch.no_grad():
        t.prompt_cache = {text: t._encode([text]) for text in texts}
    for encoder in t.text_encoders:
        encoder.to(TEXT_ENCODER_HOME)
    if t.device.type != TEXT_ENCODER_HOME:
        t.log("The text encoders wait in CPU memory while the LoRA trains (the captions and the sample prompts "
              "are encoded)")


def _build_optimizer(t) -> None:
    from lora_gui.engine.optim import build_optimizer, build_scheduler

    s = t.settings
    groups = _param_groups(t)
    t.params = [p for g in groups for p in g["params"]]
    stop = s.training.stop_text_encoder_training
    # Steps during which the text encoder trains (sd-scripts train_db: while global_step < N).
    t.text_encoder_steps = (math.ceil(stop * t.plan.total_steps) if stop < 1 else int(stop)) if stop \
        else t.plan.total_steps
    optimizer = build_optimizer(s, groups)
    scheduler = build_scheduler(s, optimizer, t.plan.total_steps, t.acc.num_processes)
    # The models are not wrapped (no DistributedDataParallel): on several processes the trainer
    # averages the LoRA's gradients itself (engine/distributed.py).
    t.trained_models = ([t.unet] if s.train_unet else []) + (list(t.text_encoders) if s.train_text_encoder else [])
    t.optimizer, t.lr_scheduler = t.acc.prepare(optimizer, scheduler)


def _param_groups(t) -> list[dict]:
    """The LoRA's optimizer groups (sd-scripts ``prepare_optimizer_params``): U-Net, then text
    encoder, each with its LoRA+ ratio; the U-Net's split by block with block-wise LR weights."""
    from lora_gui.engine.blocks import SD_BLOCKS, BlockSettingError, block_layout, block_lr_weights
    from lora_gui.engine.optim import lora_param_groups

    s, adv = t.settings, t.settings.advanced
    try:
        layout = block_layout(t.family.name, adv) or SD_BLOCKS
        blocks = block_lr_weights(adv.down_lr_weight, adv.mid_lr_weight, adv.up_lr_weight,
                                  adv.block_lr_zero_threshold, layout)
    except BlockSettingError as exc:
        raise EngineError(str(exc)) from None
    groups = []
    if s.train_unet:
        groups += lora_param_groups(t.network.module_parameters("unet"), "unet", s.effective_unet_lr,
                                    plus_ratio=adv.loraplus_unet_lr_ratio or adv.loraplus_lr_ratio,
                                    block_weights=blocks, layout=layout)
    if s.train_text_encoder:
        groups += lora_param_groups(t.network.module_parameters("text_encoder"), "textencoder",
                                    s.effective_text_encoder_lr,
                                    plus_ratio=adv.loraplus_text_encoder_lr_ratio or adv.loraplus_lr_ratio)
    if not groups:
        raise EngineError("advanced.down_lr_weight: every block-wise LR weight is 0, so nothing would "
                          "train: raise some of the down, mid or up LR weights.")
    return groups
