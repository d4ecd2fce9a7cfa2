"""``run_training(settings, events, commands)``: the LoRA training loop.

Events go out through one sink (``lora_gui.events``); commands (Stop, SaveNow, SampleNow) come in
through one object polled at step boundaries. The worker process, the CLI and the tests all drive
exactly this function. Every random draw of a step is seeded from (seed, epoch, batch), so a run
resumed from a saved state continues bit for bit where it stopped.

This module is the loop and the objective; building a run is ``setup``, what it writes and reads
back is ``checkpoint``, validation and samples are ``evaluation``, and everything that differs
between model families is the run's ``families.ModelFamily``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path

import torch

from lora_gui import events as ev
from lora_gui.dataset.summary import derive_seed
from lora_gui.engine import checkpoint, distributed, evaluation, reporting, setup
from lora_gui.engine.data import latent_normalise
from lora_gui.engine.errors import Diverged, EngineError, explain
from lora_gui.engine.families import family_for, stack_conditioning
from lora_gui.engine.loader import make_loader
from lora_gui.engine.loss import needs_snr, needs_timestep_count, per_sample_loss
from lora_gui.engine.noise import host_to, input_perturbation, offset_noise, pyramid_noise
from lora_gui.engine.optim import clip_gradients
from lora_gui.engine.run_types import RunPosition, TrainingResult, preload
from lora_gui.settings import TrainingSettings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["Diverged", "EngineError", "RunPosition", "Trainer", "TrainingResult", "explain", "preload",
           "run_training"]


def run_training(settings: TrainingSettings, events: ev.EventSink,
                 commands: ev.CommandSource | None = None) -> TrainingResult:
    """Train a LoRA; never raises for a training problem: it ends with a Finished or Failed event."""
    trainer = Trainer(settings, events, commands or ev.CommandQueue())
    try:
        return trainer.run()
    except Exception as exc:  # turned into a sentence for the user, with the traceback as detail
        message = explain(exc, trainer.files, getattr(trainer, "out_dir", None))
        detail = "".join(traceback.format_exception(exc)[-6:])
        trainer.close()
        events(ev.Failed(message=message, step=trainer.progress.step, detail=detail))
        return TrainingResult("failed", step=trainer.progress.step, message=message,
                              files=trainer.files, losses=trainer.losses)


class Trainer:
    """One run: ``setup.set_up`` builds it, ``_train`` runs the loop.

    Set-up fills in: ``acc`` (accelerate), ``device``, ``weight_dtype``, ``out_dir``, ``name``;
    ``model`` (the family's loaded base) with ``unet``, ``text_encoders``, ``vae``, ``scheduler``;
    ``info``, ``dataset``, ``run_batches``, ``plan``, ``num_train_images``; ``network``,
    ``network_alpha``, ``text_cache``, ``prompt_cache``; ``params``, ``optimizer``, ``lr_scheduler``,
    ``trained_models``, ``text_encoder_steps`` (the steps in which the text encoder trains);
    ``sample_prompts``; ``facts`` (the metadata's run facts).
    """

    def __init__(self, settings: TrainingSettings, events: ev.EventSink, commands: ev.CommandSource):
        self.settings, self._events, self.commands = settings, events, commands
        self.family = family_for(settings)
        self.progress = RunPosition()
        self.files: list[Path] = []
        self.saved: set[Path] = set()  # LoRA paths saved by this run, on every process
        self.losses: list[float] = []
        self.validation_losses: list[tuple[int, float]] = []
        self.retention = None  # checkpoint.Retention: which periodic saves the settings keep
        self._pending: list[tuple[int, int, torch.Tensor, float]] = []
        self._micro_losses: list[torch.Tensor] = []
        self._norm_figures: dict[int, dict] = {}  # step -> max-norm figures (scale_weight_norms)
        self._last_report = 0.0
        self._writer = None
        self._draw_generator = torch.Generator()  # re-seeded for each sample's draws
        self._plain_for, self._plain = None, None  # the optimizer plain_optimizer was asked about, its answer
        self.is_main = True
        self.t_start = time.time()

    def emit(self, event: ev.Event) -> None:
        if self.is_main:
            self._events(event)

    def log(self, message: str, level: str = "info") -> None:
        self.emit(ev.Log(message=message, level=level))

    def run(self) -> TrainingResult:
        self._setup()
        try:
            return self._train()
        finally:
            self.close()

    def _setup(self) -> None:
        setup.set_up(self)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- the loop -------------------------------------------------------------------------------

    def _loader(self):
        tr = self.settings.training
        return make_loader(self.run_batches, tr.num_workers, tr.persistent_workers)

    def _train(self) -> TrainingResult:
        plan, p = self.plan, self.progress
        self.emit(ev.Started(total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
                             epochs=plan.epochs, num_train_images=self.num_train_images,
                             num_reg_images=self.info.num_reg_images, device=str(self.device),
                             output_dir=str(self.out_dir)))
        self.log(f"Training {plan.total_steps} steps ({plan.epochs} epochs of {plan.steps_per_epoch}) "
                 f"on {self.device}")
        loader, sampler = self._loader()
        self._t_loop, self._step_at_loop = time.time(), p.step
        if self.settings.samples.sample_every_n_steps and p.step == 0 and self.sample_prompts:
            evaluation.sample(self, 0, 0)
        stop_reason = None
        while p.step < plan.total_steps and p.epoch < plan.epochs and stop_reason is None:
            sampler.epoch, sampler.skip = p.epoch, p.batch
            for batch_index, batch, global_size in loader:
                stop_reason = self._step(batch, batch_index, global_size)
                if stop_reason or p.step >= plan.total_steps:
                    break
            if stop_reason is None:
                p.epoch, p.batch = p.epoch + 1, 0
                self._end_of_epoch()
        self._flush(force=True)
        return self._finish(stopped=stop_reason == "stop")

    def _finish(self, stopped: bool) -> TrainingResult:
        """Save the result: the final LoRA, or on a stop the LoRA and the state to resume from."""
        p = self.progress
        if stopped:
            path, state = checkpoint.save(self, f"{self.name}-step{p.step:06d}", state=True)
        else:
            m = self.settings.model  # sd-scripts: save_state or save_state_on_train_end -> NAME-state
            path, state = checkpoint.save(self, self.name, state=m.save_state or m.save_state_on_train_end,
                                          final=True)
            evaluation.strength_sweep(self, p.epoch)
        self.emit(ev.Finished(step=p.step, output_path=str(path), state_dir=str(state) if state else None,
                              stopped=stopped, files=tuple(map(str, self.files))))
        return TrainingResult("stopped" if stopped else "finished", step=p.step, output_path=path,
                              state_dir=state, files=list(self.files), losses=list(self.losses),
                              validation_losses=list(self.validation_losses))

    def _step(self, batch, batch_index: int, global_size: int = 0) -> str | None:
        """One micro-batch; on an optimizer step also reports, validates, samples and obeys commands.
        ``batch`` is None when this process's slice of the global batch is empty (several processes)."""
        p, s = self.progress, self.settings
        if batch_index + 1 == self.run_batches.per_epoch():
            # An epoch's last batch always ends an accumulation (as accelerate does with a prepared
            # loader): otherwise a partial accumulation runs into the next epoch and the run makes
            # fewer optimizer steps than planned (ceil(batches / accumulation) per epoch).
            self.acc.step = -1  # accumulate() adds 1: 0 % accumulation == 0 -> sync now
        with self.acc.accumulate(*self.trained_models):
            if batch is None:
                loss = torch.zeros((), device=self.device)
            else:
                loss = self._loss(batch, p.epoch, batch_index, global_size)
                self.acc.backward(loss)
            if self.acc.sync_gradients and self.acc.num_processes > 1:
                distributed.average_gradients(self.acc, self.params)
            if self.acc.sync_gradients and s.training.max_grad_norm > 0:
                clip_gradients(self.acc, self.params, s.training.max_grad_norm)
            self._optimizer_step()
        if self.acc.sync_gradients and s.advanced.scale_weight_norms:
            # sd-scripts apply_max_norm_regularization after each step; its figures go with the loss.
            scaled, mean, largest = self.network.apply_max_norm(s.advanced.scale_weight_norms)
            self._norm_figures[p.step + 1] = {"keys_scaled": scaled, "average_key_norm": mean,
                                              "max_key_norm": largest}
        p.batch = batch_index + 1
        self._micro_losses.append(loss.detach())
        if not self.acc.sync_gradients:
            return None
        p.step += 1
        # The step's loss is the mean over its accumulated micro-batches.
        micro, self._micro_losses = self._micro_losses, []
        step_loss = torch.stack(micro).mean() if len(micro) > 1 else micro[0]
        if self.acc.num_processes > 1:  # the global batch's loss, the same on every process
            step_loss = self.acc.reduce(step_loss, "mean")
        self._pending.append((p.step, p.epoch + 1, step_loss, self.lr_scheduler.get_last_lr()[0]))
        self._flush(force=p.step == self.plan.total_steps)
        if _every(s.training.validation_every_n_steps, p.step):
            evaluation.validate(self)
        if _every(s.samples.sample_every_n_steps, p.step):
            evaluation.sample(self, p.step, p.epoch + 1)
        if _every(s.images.save_every_n_steps, p.step) and p.step < self.plan.total_steps:
            checkpoint.save_step(self, p.step)
        return self._obey_commands()

    def _optimizer_step(self) -> None:
        """optimizer.step, lr_scheduler.step, zero_grad, as accelerate's wrappers do them: the
        optimizer steps and clears its gradients only when the step syncs gradients. Where the
        wrapper would do nothing more (``plain_optimizer``), its optimizer is called directly:
        the wrapper's step asks twice per call whether an optional package is installed and its
        zero_grad inspects a signature, together ~0.3 ms of a tiny model's ~16 ms step."""
        if self._plain_for is not self.optimizer:
            self._plain_for, self._plain = self.optimizer, plain_optimizer(self.acc, self.optimizer)
        plain, sync = self._plain, self.acc.sync_gradients
        if plain is None:
            self.optimizer.step()
        elif sync:
            plain.step()
        self.lr_scheduler.step()  # also counts a skipped (fp16 overflow) or accumulating step
        if plain is None:
            self.optimizer.zero_grad(set_to_none=True)
        elif sync:
            plain.zero_grad(set_to_none=True)

    def _obey_commands(self) -> str | None:
        p = self.progress
        for command in distributed.shared_commands(self):
            if isinstance(command, (ev.Stop, ev.ForceStop)):
                self.log(f"Stopping at step {p.step}: saving the LoRA and the training state")
                return "stop"
            if isinstance(command, ev.SaveNow):
                self._flush(force=True)
                checkpoint.save(self, f"{self.name}-step{p.step:06d}", state=self.settings.model.save_state)
            elif isinstance(command, ev.SampleNow):
                evaluation.sample(self, p.step, p.epoch + 1)
        return None

    def _end_of_epoch(self) -> None:
        p, s = self.progress, self.settings
        epoch, last = p.epoch, p.epoch >= self.plan.epochs or p.step >= self.plan.total_steps
        self._flush(force=True)
        if _every(s.training.validation_every_n_epochs, epoch) \
                and not _every(s.training.validation_every_n_steps, p.step):
            evaluation.validate(self, epoch)
        if _every(s.images.save_every_n_epochs, epoch) and not last:
            checkpoint.save_epoch(self, epoch)  # then the retention rules
        if _every(s.samples.sample_every_n_epochs, epoch):
            evaluation.sample(self, p.step, epoch)

    # --- the objective --------------------------------------------------------------------------

    def _loss(self, batch, epoch: int, batch_index: int, global_size: int = 0) -> torch.Tensor:
        """Encode, noise, predict, weight: the diffusion training objective for one batch (one
        process's slice of the global batch on several processes)."""
        rank, world = self.acc.process_index, self.acc.num_processes
        seed = derive_seed(self.settings.training.seed, "step", epoch, batch_index, *((rank,) if world > 1 else ()))
        # LoRA dropout draws from the global generator. On a CPU run the CPU generator is all that
        # torch.manual_seed sets that matters, and seeding it alone saves ~0.2 ms a step of probing
        # every other backend.
        if self.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        latents = self._latents(batch)
        first = rank * self.settings.training.batch_size  # this slice's place in the global batch
        noise, timesteps, noisy_with = self._sample_draws(latents, epoch, batch_index, first)
        loss = self._weighted_loss(latents, noise, timesteps, batch.captions, batch.is_reg,
                                   self.family.batch_conditioning(self.model, batch, self.device),
                                   noisy_with=noisy_with, mask=batch.mask)
        if world > 1 and global_size:
            # The mean over the global batch once the processes' gradients are averaged: each
            # slice's sum / global size, times the number of processes the average divides by.
            loss = loss * (latents.shape[0] * world / global_size)
        return loss

    def _sample_draws(self, latents: torch.Tensor, epoch: int, batch_index: int, first: int):
        """(noise, timesteps, noise that makes the noisy latents), each sample's from a generator
        seeded by the sample's place in the epoch (epoch, global batch, position), not by the batch:
        the same sample gets the same draws whether the batch is split between processes or not,
        and again on a resume. The last differs from the noise under input perturbation."""
        seed, adv = self.settings.training.seed, self.settings.advanced
        noises, steps, perturbed = [], [], []
        generator = self._draw_generator  # manual_seed resets all its state: as a new one each time
        for i in range(latents.shape[0]):
            generator.manual_seed(derive_seed(seed, "noise", epoch, batch_index, first + i))
            noise = self._noise(latents[i:i + 1], generator)
            noises.append(noise)
            steps.append(self.family.sample_timesteps(self.model, latents[i:i + 1], generator, self.settings))
            if adv.ip_noise_gamma > 0:
                perturbed.append(input_perturbation(noise, adv.ip_noise_gamma, generator,
                                                    adv.ip_noise_gamma_random_strength))
        noise = torch.cat(noises)
        return noise, host_to(torch.cat(steps), self.device), torch.cat(perturbed) if perturbed else noise

    def _latents(self, batch) -> torch.Tensor:
        if batch.latents is not None:
            return host_to(batch.latents, self.device)
        with torch.no_grad():
            pixels = host_to(batch.pixels.to(torch.float32), self.device)
            return latent_normalise(self.vae, self.vae.encode(pixels).latent_dist.mean)

    def _noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        adv = self.settings.advanced
        noise = host_to(torch.randn(latents.shape, generator=generator), latents.device)
        noise = offset_noise(noise, adv.noise_offset, generator, random_strength=adv.noise_offset_random_strength,
                             adaptive_scale=adv.adaptive_noise_scale, latents=latents)
        return pyramid_noise(noise, adv.multires_noise_iterations, adv.multires_noise_discount, generator)

    def _weighted_loss(self, latents, noise, timesteps, captions, is_reg, extra=None, *,
                       noisy_with=None, mask=None) -> torch.Tensor:
        """The loss per sample (``engine.loss.per_sample_loss``: loss type, mask, timestep weights),
        weighted for prior images (DreamBooth's prior-preservation weight), then the batch mean.
        ``noisy_with``: the noise that makes the noisy latents when it is not the target's
        (input perturbation)."""
        family, model, adv = self.family, self.model, self.settings.advanced
        noisy = family.add_noise(model, latents, noise if noisy_with is None else noisy_with, timesteps)
        # accelerate's autocast is a nullcontext without native AMP (mixed_precision "no", or bf16
        # on the CPU); entering it still builds its state objects every step.
        with self.acc.autocast() if self.acc.native_amp else contextlib.nullcontext():
            text = self._text_states(captions)
            pred = family.predict(model, noisy, timesteps, text, extra, self.weight_dtype)
        target = family.target(model, latents, noise, timesteps)
        snr = family.snr(model, timesteps) if needs_snr(adv) else None
        loss = per_sample_loss(adv, pred, target, timesteps, snr, v_prediction=family.v_prediction(model),
                               num_train_timesteps=family.num_train_timesteps(model)
                               if needs_timestep_count(adv) else None,
                               mask=None if mask is None else host_to(mask, target.device))
        scheme = family.loss_weights(model, timesteps, self.settings)
        if scheme is None and adv.prior_loss_weight == 1.0:
            return loss.mean()  # every weight 1: x * 1.0 == x, the same mean without the product
        weights = torch.where(host_to(is_reg, loss.device), adv.prior_loss_weight, 1.0)
        if scheme is not None:
            weights = weights * scheme.to(loss.device)
        return (loss * weights).mean()

    def _encode(self, captions: list[str]):
        return self.family.encode_text(self.model, captions, self.settings, self.device)

    def _text_states(self, captions: list[str]):
        if self.text_cache is not None:
            return stack_conditioning([self.text_cache[c] for c in captions])
        if self.settings.train_text_encoder and self.progress.step < self.text_encoder_steps:
            return self._encode(captions)
        with torch.no_grad():  # frozen, or stop_text_encoder_training reached
            return self._encode(captions)

    def _flush(self, force: bool = False) -> None:
        reporting.flush(self, force)


def plain_optimizer(acc, optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` when the wrapper's step and
    zero_grad add nothing but the sync_gradients check (accelerate/optimizer.py): no fp16 grad
    scaler (whose step may skip on overflow), no XLA gradient all-reduce, no LOMO optimizer (whose
    step is a no-op there), a zero_grad that takes set_to_none. None otherwise: then the wrapper."""
    import inspect

    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType, is_lomo_available

    if type(optimizer) is not AcceleratedOptimizer or optimizer.scaler is not None \
            or acc.distributed_type == DistributedType.XLA:
        return None
    inner = optimizer.optimizer
    if is_lomo_available():
        from lomo_optim import AdaLomo, Lomo

        if isinstance(inner, (Lomo, AdaLomo)):
            return None
    if "set_to_none" not in inspect.signature(inner.zero_grad).parameters:
        return None
    return inner


def _every(n: int, count: int) -> bool:
    """An ``every N`` setting fires at multiples of N; 0 is off."""
    return bool(n) and count % n == 0
