"""``run_training(settings, events, commands)``: the LoRA training loop.

Events go out through one sink (``lora_gui.events``); commands (Stop, SaveNow, SampleNow) come in
through one object polled at step boundaries. The worker process, the CLI and the tests all drive
exactly this function. Every random draw of a step is seeded from (seed, epoch, batch), so a run
resumed from a saved state continues bit for bit where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_gui import events as ev
from lora_gui.dataset.captions import tag_frequency, write_tag_report
from lora_gui.dataset.scan import scan_dataset
from lora_gui.dataset.summary import derive_seed
from lora_gui.engine.data import DataOptions, TrainDataset
from lora_gui.engine.metadata import RunFacts, base_model_name, build_metadata, with_hashes
from lora_gui.engine.noise import host_to, min_snr_weights, offset_noise, pyramid_noise, training_target
from lora_gui.engine.text import encode_prompts
from lora_gui.settings import TrainingSettings
from lora_gui.settings import io as settings_io

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
VALIDATION_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
REPORT_INTERVAL_S = 0.5


class EngineError(ValueError):
    """A problem the user can fix; the message is one sentence that names the setting."""


class Diverged(RuntimeError):
    pass


@dataclass
class TrainingResult:
    status: str  # finished | stopped | failed
    step: int = 0
    output_path: Path | None = None
    state_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    message: str = ""
    losses: list[float] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Progress:
    """Where the run is; saved in every state so a resume continues at the exact batch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch of ``epoch``

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]


class _RunBatches(torch.utils.data.Dataset):
    """All batches of the run, indexed epoch * batches_per_epoch + batch: one DataLoader (and its
    persistent workers) serves every epoch; an epoch sampler picks the indices."""

    def __init__(self, dataset: TrainDataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self._epoch, self._batches = -1, []
        # The same for every epoch; computed once (asking epoch 0 again would evict the cached epoch).
        self._per_epoch = len(dataset.epoch_batches(0)[rank::world])

    def batches(self, epoch: int) -> list:
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.dataset.epoch_batches(epoch)[self.rank::self.world]
        return self._batches

    def per_epoch(self) -> int:
        return self._per_epoch

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, index: int):
        per = self.per_epoch()
        epoch, batch = divmod(index, per)
        return batch, self.dataset.load_batch(self.batches(epoch)[batch], epoch, batch)


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, per_epoch: int):
        self.per_epoch, self.epoch, self.skip = per_epoch, 0, 0

    def __iter__(self):
        start = self.epoch * self.per_epoch
        return iter(range(start + self.skip, start + self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch - self.skip


def explain(exc: BaseException) -> str:
    """One sentence the user can act on."""
    from lora_gui.dataset.scan import DatasetError
    from lora_gui.engine.model_files import ModelLoadError
    from lora_gui.engine.optim import OptimizerSettingError
    from lora_gui.engine.sampling import PromptLineError

    if isinstance(exc, (EngineError, Diverged, ModelLoadError, DatasetError, OptimizerSettingError,
                        PromptLineError, FileExistsError)):
        return str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return ("The GPU ran out of memory: lower the batch size or resolution, enable gradient "
                "checkpointing, or use the AdamW8bit optimizer.")
    if isinstance(exc, FileNotFoundError):
        return f"A file or folder is missing: {exc.filename or exc}. Check the paths in the settings."
    if isinstance(exc, PermissionError):
        return f"lora-gui may not write {exc.filename or exc}: choose a folder you can write to."
    return f"Training failed: {type(exc).__name__}: {exc}"


def run_training(settings: TrainingSettings, events: ev.EventSink,
                 commands: ev.CommandSource | None = None) -> TrainingResult:
    """Train a LoRA; never raises for a training problem: it ends with a Finished or Failed event."""
    trainer = Trainer(settings, events, commands or ev.CommandQueue())
    try:
        return trainer.run()
    except Exception as exc:  # turned into a sentence for the user, with the traceback as detail
        message = explain(exc)
        detail = "".join(traceback.format_exception(exc)[-6:])
        trainer.close()
        events(ev.Failed(message=message, step=trainer.progress.step, detail=detail))
        return TrainingResult("failed", step=trainer.progress.step, message=message,
                              files=trainer.files, losses=trainer.losses)


class Trainer:
    def __init__(self, settings: TrainingSettings, events: ev.EventSink, commands: ev.CommandSource):
        self.s, self._events, self.commands = settings, events, commands
        self.progress = Progress()
        self.files: list[Path] = []
        self.losses: list[float] = []
        self.validation_losses: list[tuple[int, float]] = []
        self._pending: list[tuple[int, int, torch.Tensor, float]] = []
        self._micro_losses: list[torch.Tensor] = []
        self._last_report = 0.0
        self._writer = None
        self.is_main = True
        self.t_start = time.time()

    # --- events ---------------------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        if self.is_main:
            self._events(event)

    def log(self, message: str, level: str = "info") -> None:
        self.emit(ev.Log(message=message, level=level))

    # --- set-up ---------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        self._setup()
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _require_paths(self) -> None:
        m = self.s.model
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

    def _output_name(self, out_dir: Path) -> str:
        """The output name, or name_2, name_3...: existing files are never overwritten."""
        base, ext = self.s.model.output_name, self.s.model.save_as
        resuming = bool(self.s.model.load_previous_save_state.strip())
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}_{n}"
            taken = (out_dir / f"{name}.{ext}").exists()
            if not resuming:
                taken = taken or any(out_dir.glob(f"{name}-[0-9s]*")) \
                    or (out_dir / f"{name}_settings.json").exists()
            if not taken:
                if n > 1:
                    self.log(f"{base}.{ext} already exists in {out_dir}: this run saves as {name}.{ext}.",
                             "warning")
                return name
        raise EngineError(f"model.output_name: too many runs named {base} in {out_dir}: choose another name.")

    def _setup(self) -> None:
        from accelerate import Accelerator

        m, tr = self.s.model, self.s.training
        torch.manual_seed(tr.seed)
        cuda = torch.cuda.is_available()
        if tr.mixed_precision == "fp16" and not cuda:
            raise EngineError("training.mixed_precision: fp16 needs a CUDA GPU; choose bf16 or no.")
        self._require_paths()
        # accelerate keeps its state in process-wide singletons; a run in the same process as an
        # earlier one (tests, a notebook) must start from a clean state.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.acc = acc = Accelerator(mixed_precision=tr.mixed_precision,
                                     gradient_accumulation_steps=tr.gradient_accumulation_steps,
                                     cpu=not cuda)
        self.is_main = acc.is_main_process
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            tr.mixed_precision, torch.float32) if cuda else torch.float32
        self.out_dir = Path(m.output_folder).expanduser()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = self._output_name(self.out_dir)
        self._load_model()
        self._load_data()
        self._build_network()
        self._prepare_text_cache()
        self._build_optimizer()
        self._prepare_samples()
        self._write_run_files()
        if m.load_previous_save_state.strip():
            self._resume(Path(m.load_previous_save_state).expanduser())
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            log_root = Path(m.log_dir).expanduser() if m.log_dir.strip() else self.out_dir / "logs"
            self._writer = SummaryWriter(log_dir=str(log_root / self.name))

    def _load_model(self) -> None:
        from lora_gui.engine.model import load_base_model

        m, adv = self.s.model, self.s.advanced
        self.log(f"Loading the base model {m.base_model}")
        base = load_base_model(m.base_model, vae_path=m.vae.strip() or None, v2=m.v2,
                               v_parameterization=m.v_parameterization)
        for note in base.notes:
            self.log(note, "warning")
        self.base = base
        self.tokenizer, self.text_encoder, self.unet, self.vae = (
            base.tokenizer, base.text_encoder, base.unet, base.vae)
        self.scheduler = base.noise_scheduler
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)
        for module in (self.unet, self.text_encoder, self.vae):
            module.to(self.device)
        if self.weight_dtype != torch.float32:  # frozen weights in 16 bits on the GPU; LoRA stays fp32
            self.unet.to(dtype=self.weight_dtype)
            self.text_encoder.to(dtype=self.weight_dtype)
        if adv.attention == "xformers":
            try:
                self.unet.enable_xformers_memory_efficient_attention()
            except Exception as exc:
                raise EngineError(f"advanced.attention: xformers does not work here ({exc}); choose "
                                  "sdpa.") from None

    def _load_data(self) -> None:
        s, m, img, lab = self.s, self.s.model, self.s.images, self.s.labels
        self.info = scan_dataset(m.img_folder, m.reg_img_folder.strip() or None, repeats=img.repeats,
                                 caption_extension=lab.caption_extension,
                                 trigger_words=s.triggers.trigger_words)
        for warning in self.info.warnings:
            self.log(warning, "warning")
        self.dataset = TrainDataset(self.info, DataOptions.from_settings(s))
        self.run_batches = _RunBatches(self.dataset, self.acc.process_index, self.acc.num_processes)
        per_epoch = self.run_batches.per_epoch()
        if per_epoch == 0:
            raise EngineError(f"model.img_folder: no training images are left in {m.img_folder} "
                              "(after the validation split): add images or lower the split.")
        # Distinct images trained on (the held-out validation images are not).
        self.num_train_images = self.info.num_train_images - len(self.dataset.validation_items())
        self.plan = s.plan_steps(per_epoch * self.acc.num_processes, self.acc.num_processes)
        if img.cache_latents:
            self._cache_latents()

    def _cache_latents(self) -> None:
        total = len(self.dataset.cache_requests())
        self.log(f"Caching the latents of {total} images")

        def on_progress(done: int, total: int) -> None:
            self.emit(ev.Progress(step=done, total_steps=total, epoch=0, epochs=0,
                                  elapsed_s=time.time() - self.t_start, steps_per_s=0.0, eta_s=0.0,
                                  phase="caching latents"))

        with torch.no_grad():
            self.dataset.cache_latents(self.vae, to_disk=self.s.images.cache_latents_to_disk,
                                       on_progress=on_progress)
        if self.device.type == "cuda":
            self.vae.to("cpu")  # only the samples need it again

    def _build_network(self) -> None:
        from lora_gui.engine.network import LoraNetwork, NetworkSpec, load_lora_file

        s, tr, adv, m = self.s, self.s.training, self.s.advanced, self.s.model
        spec = NetworkSpec(rank=tr.network_dim, alpha=tr.network_alpha, conv_rank=adv.conv_dim,
                           conv_alpha=adv.conv_alpha, dropout=adv.network_dropout,
                           train_unet=s.train_unet, train_text_encoder=s.train_text_encoder)
        self.network = LoraNetwork.apply(self.unet if s.train_unet else None,
                                         self.text_encoder if s.train_text_encoder else None, spec)
        self.network_alpha = tr.network_alpha
        if m.lora_model_for_resume.strip():
            tensors, _ = load_lora_file(m.lora_model_for_resume)
            try:
                self.network.load_state_dict_kohya(tensors)
            except ValueError as exc:
                raise EngineError(f"model.lora_model_for_resume: {exc}") from None
            alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha") and "attn" in k]
            if alphas:
                self.network_alpha = max(set(alphas), key=alphas.count)
            self.log(f"Starting from the LoRA weights of {m.lora_model_for_resume}")
        names = self.network.module_names()
        self.log(f"LoRA on {len(names.get('unet', []))} U-Net and {len(names.get('text_encoder', []))} "
                 "text-encoder modules")
        if tr.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if s.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        self.unet.train(s.train_unet)
        self.text_encoder.train(s.train_text_encoder)

    def _static_captions(self) -> bool:
        lab = self.s.labels
        return not (lab.shuffle_caption or lab.caption_dropout_rate or lab.caption_tag_dropout_rate
                    or lab.caption_dropout_every_n_epochs)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, captions,
                              max_token_length=self.s.labels.max_token_length,
                              clip_skip=self.s.training.clip_skip, device=self.device)

    def _prepare_text_cache(self) -> None:
        """A frozen text encoder with captions that never change: encode each caption once."""
        self.text_cache: dict[str, torch.Tensor] | None = None
        if self.s.train_text_encoder or not self._static_captions():
            return
        captions = sorted({self.dataset.fixed_caption(item) for item in
                           self.dataset.train_items + self.dataset.reg_items
                           + self.dataset.validation_items()})
        self.text_cache = {}
        with torch.no_grad(), self.acc.autocast():
            for i in range(0, len(captions), 16):
                chunk = captions[i:i + 16]
                for caption, states in zip(chunk, self._encode(chunk)):
                    self.text_cache[caption] = states
        self.log(f"Cached the text encoder's output for {len(captions)} captions")

    def _text_states(self, captions: list[str]) -> torch.Tensor:
        if self.text_cache is not None:
            return torch.stack([self.text_cache[c] for c in captions])
        if self.s.train_text_encoder:
            return self._encode(captions)
        with torch.no_grad():
            return self._encode(captions)

    def _build_optimizer(self) -> None:
        from lora_gui.engine.optim import build_optimizer, build_scheduler

        s = self.s
        groups = []
        if s.train_unet:
            groups.append({"params": self.network.unet_parameters(), "lr": s.effective_unet_lr})
        if s.train_text_encoder:
            groups.append({"params": self.network.text_encoder_parameters(),
                           "lr": s.effective_text_encoder_lr})
        self.params = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(s, groups)
        scheduler = build_scheduler(s, optimizer, self.plan.total_steps, self.acc.num_processes)
        trained = [m for m, on in ((self.unet, s.train_unet), (self.text_encoder,
                                                                s.train_text_encoder)) if on]
        prepared = self.acc.prepare(*trained, optimizer, scheduler)
        self.trained_models = list(prepared[:len(trained)])
        self.optimizer, self.lr_scheduler = prepared[len(trained):]
        self.acc.register_for_checkpointing(self.progress)
        self.acc.register_save_state_pre_hook(self._save_state_hook)
        self.acc.register_load_state_pre_hook(self._load_state_hook)

    def _save_state_hook(self, models, weights, output_dir) -> None:
        from safetensors.torch import save_file

        # Only the LoRA weights are state: the base model is read again from its file.
        save_file(self.network.state_dict_kohya(torch.float32), str(Path(output_dir) / "lora.safetensors"))
        weights.clear()

    def _load_state_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        self.network.load_state_dict_kohya(load_file(str(Path(input_dir) / "lora.safetensors")))
        models.clear()

    def _resume(self, state_dir: Path) -> None:
        if not (state_dir / "lora.safetensors").exists():
            raise EngineError(f"model.load_previous_save_state: {state_dir} is not a saved state "
                              "(no lora.safetensors inside): choose a NAME-state folder.")
        try:
            self.acc.load_state(str(state_dir))
        except ValueError as exc:
            raise EngineError(f"model.load_previous_save_state: the state in {state_dir} does not "
                              f"match these settings ({exc}).") from None
        self.log(f"Resumed from {state_dir} at step {self.progress.step}")

    def _prepare_samples(self) -> None:
        from lora_gui.engine.sampling import SamplePrompt, parse_prompts

        sm = self.s.samples
        defaults = SamplePrompt(prompt="", width=sm.sample_width, height=sm.sample_height,
                                cfg_scale=sm.sample_cfg_scale, steps=sm.sample_steps)
        self.sample_prompts = parse_prompts(sm.sample_prompts, defaults)

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        settings_file = self.out_dir / f"{self.name}_settings.json"
        if not settings_file.exists():
            self.files.append(settings_io.save_settings(self.s, settings_file))
        if self.s.runs.save_json_folder.strip():
            folder = Path(self.s.runs.save_json_folder).expanduser()
            settings_io.save_settings(self.s, folder / f"{self.name}_settings.json")
        if self.s.labels.tag_occurrence_txt_file:
            report = self.out_dir / f"{self.name}_tags.txt"
            if not report.exists():
                self.files.append(write_tag_report(
                    report, self.info, alphabetical=self.s.labels.sort_tag_occurrence_alphabetically))
        self.facts = RunFacts(
            base_version=self.base.version, base_model_name=base_model_name(self.s.model.base_model),
            num_train_images=self.num_train_images, num_reg_images=self.info.num_reg_images,
            num_epochs=self.plan.epochs, max_train_steps=self.plan.total_steps,
            tag_frequency=tag_frequency(self.info), dataset_dirs=self.info.dataset_dirs(),
            bucket_info={"buckets": {f"{w}x{h}": n for (w, h), n in
                                     sorted(self.dataset.bucket_counts().items())}},
            session_id=uuid.uuid4().hex[:16], started_at=self.t_start, network_alpha=self.network_alpha)

    # --- the loop -------------------------------------------------------------------------------

    def _loader(self):
        tr = self.s.training
        sampler = _EpochSampler(self.run_batches.per_epoch())
        loader = torch.utils.data.DataLoader(
            self.run_batches, batch_size=None, sampler=sampler, num_workers=tr.num_workers,
            persistent_workers=tr.persistent_workers and tr.num_workers > 0,
            collate_fn=lambda x: x)
        return loader, sampler

    def _train(self) -> TrainingResult:
        s, plan, p = self.s, self.plan, self.progress
        self.emit(ev.Started(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                             epochs=plan.epochs, num_train_images=self.num_train_images,
                             num_reg_images=self.info.num_reg_images, device=str(self.device),
                             output_dir=str(self.out_dir)))
        self.log(f"Training {plan.total_steps} steps ({plan.epochs} epochs of {plan.steps_per_epoch}) "
                 f"on {self.device}")
        loader, sampler = self._loader()
        self._t_loop, self._step_at_loop = time.time(), p.step
        if s.samples.sample_every_n_steps and p.step == 0 and self.sample_prompts:
            self._sample(0, 0)
        stop_reason = None
        while p.step < plan.total_steps and p.epoch < plan.epochs and stop_reason is None:
            sampler.epoch, sampler.skip = p.epoch, p.batch
            for batch_index, batch in loader:
                stop_reason = self._step(batch, batch_index)
                if stop_reason or p.step >= plan.total_steps:
                    break
            if stop_reason is None:
                p.epoch, p.batch = p.epoch + 1, 0
                self._end_of_epoch()
        self._flush(force=True)
        if stop_reason == "stop":
            path, state = self._save(f"{self.name}-step{p.step:06d}", state=True)
            self.emit(ev.Finished(step=p.step, output_path=str(path), state_dir=str(state),
                                  stopped=True, files=tuple(map(str, self.files))))
            return self._result("stopped", path, state)
        path, state = self._save(self.name, state=s.model.save_state, final=True)
        self.emit(ev.Finished(step=p.step, output_path=str(path), state_dir=str(state) if state else None,
                              files=tuple(map(str, self.files))))
        return self._result("finished", path, state)

    def _result(self, status: str, path: Path, state: Path | None) -> TrainingResult:
        return TrainingResult(status, step=self.progress.step, output_path=path, state_dir=state,
                              files=list(self.files), losses=list(self.losses),
                              validation_losses=list(self.validation_losses))

    def _step(self, batch, batch_index: int) -> str | None:
        """One micro-batch; on an optimizer step also reports, validates, samples and obeys commands."""
        p, tr = self.progress, self.s.training
        if batch_index + 1 == self.run_batches.per_epoch():
            # An epoch's last batch always ends an accumulation (as accelerate does with a prepared
            # loader): otherwise a partial accumulation runs into the next epoch and the run makes
            # fewer optimizer steps than planned (ceil(batches / accumulation) per epoch).
            self.acc.step = -1  # accumulate() adds 1: 0 % accumulation == 0 -> sync now
        with self.acc.accumulate(*self.trained_models):
            loss = self._loss(batch, p.epoch, batch_index)
            self.acc.backward(loss)
            if self.acc.sync_gradients and tr.max_grad_norm > 0:
                self._clip_gradients(tr.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        p.batch = batch_index + 1
        self._micro_losses.append(loss.detach())
        if not self.acc.sync_gradients:
            return None
        p.step += 1
        # The step's loss is the mean over its accumulated micro-batches.
        step_loss = torch.stack(self._micro_losses).mean() if len(self._micro_losses) > 1 \
            else self._micro_losses[0]
        self._micro_losses = []
        self._pending.append((p.step, p.epoch + 1, step_loss, self.lr_scheduler.get_last_lr()[0]))
        self._flush(force=p.step == self.plan.total_steps)
        sm, tv = self.s.samples, self.s.training
        if tv.validation_every_n_steps and p.step % tv.validation_every_n_steps == 0:
            self._validate()
        if sm.sample_every_n_steps and p.step % sm.sample_every_n_steps == 0:
            self._sample(p.step, p.epoch + 1)
        return self._obey_commands()

    def _clip_gradients(self, max_norm: float) -> None:
        """``accelerate.clip_grad_norm_``; on the CPU the same computation (torch's total norm, then
        every gradient times clamp(max_norm / (norm + eps), max=1)) without the multiplication when
        the factor is exactly 1 (x * 1.0 == x): the usual case, and ~1 % of a small model's step.
        Reading the norm is free on the CPU; on a GPU it would wait for the device, so the GPU path
        is accelerate's."""
        utils = torch.nn.utils
        if self.device.type != "cpu" or not hasattr(utils, "clip_grads_with_norm_"):
            self.acc.clip_grad_norm_(self.params, max_norm)
            return
        total = utils.get_total_norm([p.grad for p in self.params if p.grad is not None], 2.0)
        # Skipped only when the factor is certainly above 1 (whatever eps <= 1e-5 torch uses);
        # never for a norm that is not finite.
        if not float(total) + 1e-5 + 1e-3 * max_norm <= max_norm:
            utils.clip_grads_with_norm_(self.params, max_norm, total)

    def _obey_commands(self) -> str | None:
        p = self.progress
        for command in self.commands.poll():
            if isinstance(command, (ev.Stop, ev.ForceStop)):
                self.log(f"Stopping at step {p.step}: saving the LoRA and the training state")
                return "stop"
            if isinstance(command, ev.SaveNow):
                self._flush(force=True)
                self._save(f"{self.name}-step{p.step:06d}", state=self.s.model.save_state)
            elif isinstance(command, ev.SampleNow):
                self._sample(p.step, p.epoch + 1)
        return None

    def _end_of_epoch(self) -> None:
        p, s = self.progress, self.s
        epoch, last = p.epoch, p.epoch >= self.plan.epochs or p.step >= self.plan.total_steps
        self._flush(force=True)
        if s.training.validation_every_n_epochs and epoch % s.training.validation_every_n_epochs == 0 \
                and not (s.training.validation_every_n_steps
                         and p.step % s.training.validation_every_n_steps == 0):
            self._validate(epoch)
        n = s.images.save_every_n_epochs
        if n and epoch % n == 0 and not last:
            self._save(f"{self.name}-{epoch:06d}", state=s.model.save_state)
        n = s.samples.sample_every_n_epochs
        if n and epoch % n == 0:
            self._sample(p.step, epoch)

    # --- the training step ----------------------------------------------------------------------

    def _latents(self, batch) -> torch.Tensor:
        if batch.latents is not None:
            return host_to(batch.latents, self.device)
        with torch.no_grad():
            pixels = host_to(batch.pixels.to(torch.float32), self.device)
            return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    def _noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        adv = self.s.advanced
        noise = host_to(torch.randn(latents.shape, generator=generator), latents.device)
        noise = offset_noise(noise, adv.noise_offset, generator)
        return pyramid_noise(noise, adv.multires_noise_iterations, adv.multires_noise_discount, generator)

    def _loss(self, batch, epoch: int, batch_index: int) -> torch.Tensor:
        """Encode, noise, predict, weight: the diffusion training objective for one batch."""
        seed = derive_seed(self.s.training.seed, "step", epoch, batch_index)
        # LoRA dropout draws from the global generator. On a CPU run the CPU generator is all that
        # torch.manual_seed sets that matters, and seeding it alone saves ~0.2 ms a step of probing
        # every other backend.
        if self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        latents = self._latents(batch)
        noise = self._noise(latents, generator)
        timesteps = host_to(torch.randint(0, self.scheduler.config.num_train_timesteps,
                                          (latents.shape[0],), generator=generator), self.device)
        return self._weighted_loss(latents, noise, timesteps, batch.captions, batch.is_reg)

    def _weighted_loss(self, latents, noise, timesteps, captions, is_reg) -> torch.Tensor:
        adv = self.s.advanced
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with self.acc.autocast():
            states = self._text_states(captions)
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, states.to(self.weight_dtype)).sample
        target = training_target(self.scheduler, latents, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = torch.where(host_to(is_reg, loss.device), adv.prior_loss_weight, 1.0)
        if adv.min_snr_gamma > 0:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps)
            v = self.scheduler.config.prediction_type == "v_prediction"
            weights = weights * min_snr_weights(snr, adv.min_snr_gamma, v).to(loss.device)
        return (loss * weights).mean()

    # --- reporting ------------------------------------------------------------------------------

    def _flush(self, force: bool = False) -> None:
        """Report buffered losses. Reading a loss waits for the device, so it happens at most every
        half second (and at once for the first step), not after every step."""
        now = time.time()
        if not self._pending or not (force or now - self._last_report >= REPORT_INTERVAL_S
                                     or not self.losses):
            return
        values = torch.stack([t for _, _, t, _ in self._pending]).float().cpu().tolist()
        pending, self._pending = self._pending, []
        self._last_report = now
        for (step, epoch, _, lr), value in zip(pending, values):
            if not math.isfinite(value):
                raise Diverged(
                    f"The loss became {value} at step {step}: the learning rate is probably too high "
                    "(or fp16 overflowed). Lower training.learning_rate or use bf16; the last saved "
                    "checkpoint is kept.")
            self.losses.append(value)
            self.emit(ev.LossReported(step=step, epoch=epoch, loss=value, lr=lr))
            if self._writer is not None:
                self._writer.add_scalar("loss/train", value, step)
                self._writer.add_scalar("lr", lr, step)
        p, done = self.progress, self.progress.step - self._step_at_loop
        elapsed = now - self._t_loop
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = self.plan.total_steps - p.step
        self.emit(ev.Progress(step=p.step, total_steps=self.plan.total_steps, epoch=p.epoch + 1,
                              epochs=self.plan.epochs, elapsed_s=now - self.t_start, steps_per_s=rate,
                              eta_s=remaining / rate if rate > 0 else 0.0))

    def _validate(self, epoch: int | None = None) -> None:
        """Validation loss on the held-out images at fixed noise and fixed timesteps, so that two
        evaluations differ only because the LoRA changed. ``epoch``: the 1-based epoch (default: the
        current one; at the end of an epoch ``progress.epoch`` already counts the finished one)."""
        batches = self.dataset.validation_batches()
        if not batches:
            return
        for model in self.trained_models:
            model.train(False)
        total, count = 0.0, 0
        t_max = self.scheduler.config.num_train_timesteps
        with torch.no_grad():
            for index, items in enumerate(batches):
                batch = self.dataset.load_batch(items, augment=False)
                latents = self._latents(batch)
                for fraction in VALIDATION_TIMESTEP_FRACTIONS:
                    gen = torch.Generator().manual_seed(derive_seed(self.s.training.seed, "val", index,
                                                                    fraction))
                    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                    timesteps = torch.full((latents.shape[0],), int(fraction * t_max), device=self.device)
                    loss = self._weighted_loss(latents, noise, timesteps, batch.captions, batch.is_reg)
                    total, count = total + float(loss) * len(items), count + len(items)
        for model in self.trained_models:
            model.train()
        value, p = total / count, self.progress
        self.validation_losses.append((p.step, value))
        self.emit(ev.ValidationLoss(step=p.step, epoch=p.epoch + 1 if epoch is None else epoch, loss=value))
        if self._writer is not None:
            self._writer.add_scalar("loss/validation", value, p.step)

    def _sample(self, step: int, epoch: int) -> None:
        from lora_gui.engine.sampling import generate_samples

        if not self.sample_prompts or not self.is_main:
            return
        self._flush(force=True)
        self.log(f"Making {len(self.sample_prompts)} sample images at step {step}")
        for model in self.trained_models:
            model.train(False)
        self.vae.to(self.device)
        written = generate_samples(
            unet=self.acc.unwrap_model(self.unet), vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, scheduler_config=self.scheduler.config,
            prompts=self.sample_prompts, sampler=self.s.samples.sample_sampler,
            seed=self.s.samples.test_seed, out_dir=self.out_dir / "sample",
            stem=f"{self.name}_{step:06d}", encode=self._encode, device=self.device,
            dtype=self.weight_dtype)
        if self.device.type == "cuda" and self.s.images.cache_latents:
            self.vae.to("cpu")
        for model in self.trained_models:
            model.train()
        for index, (path, prompt) in enumerate(written):
            if path not in self.files:
                self.files.append(path)
            self.emit(ev.SampleReady(step=step, epoch=epoch, path=str(path), prompt=prompt, index=index))

    # --- saving ---------------------------------------------------------------------------------

    def _save(self, stem: str, *, state: bool, final: bool = False) -> tuple[Path, Path | None]:
        from lora_gui.engine.network import save_lora

        m, p = self.s.model, self.progress
        path = self.out_dir / f"{stem}.{m.save_as}"
        state_dir = self.out_dir / f"{stem}-state"
        if path.exists() and path in self.files:  # saved at this very step already
            return path, (state_dir if state_dir.exists() else None)
        self.acc.wait_for_everyone()
        tensors = self.network.state_dict_kohya(SAVE_DTYPES[m.save_precision])
        if not all(torch.isfinite(t.float()).all() for t in tensors.values()):
            raise Diverged("The LoRA weights are no longer finite numbers (NaN/inf): the learning rate "
                           "is probably too high. Lower training.learning_rate; the last saved "
                           "checkpoint is kept.")
        if self.is_main:
            metadata = None
            if m.save_as == "safetensors":
                metadata = build_metadata(self.s, self.facts, epoch=p.epoch, step=p.step, final=final)
                if not m.no_meta:
                    metadata = with_hashes(tensors, metadata)
            path = save_lora(path, tensors, metadata, m.save_as)
            self.files.append(path)
        if state:
            self.acc.save_state(str(state_dir))
            self.files.append(state_dir)
        self.emit(ev.CheckpointSaved(step=p.step, epoch=p.epoch, path=str(path),
                                     state_dir=str(state_dir) if state else None, final=final))
        self.log(f"Saved {path}" + (f" and its state {state_dir}" if state else ""))
        return path, (state_dir if state else None)
