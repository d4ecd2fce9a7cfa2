"""What a run leaves on disk and reads back: the output name, the run files (settings copy, tag
report, the metadata facts), the LoRA saves, the training state folders (``state_files``: no pickle) and resuming from one."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lora_gui import events as ev
from lora_gui.dataset.captions import write_tag_report
from lora_gui.engine import distributed, evaluation, state_files
from lora_gui.engine.errors import Diverged, EngineError
from lora_gui.engine.metadata import build_metadata, gather_facts, with_hashes
from lora_gui.engine.optim import averaged_weights
from lora_gui.settings import io as settings_io

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def output_name(t, out_dir: Path) -> str:
    """The output name, or name_2, name_3...: existing files are never overwritten."""
    m = t.settings.model
    base, ext = m.output_name, m.save_as
    resuming = bool(m.load_previous_save_state.strip())
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}_{n}"
        taken = (out_dir / f"{name}.{ext}").exists()
        if not resuming:
            taken = taken or any(out_dir.glob(f"{name}-[0-9s]*")) \
                or (out_dir / f"{name}_settings.json").exists()
        if not taken:
            if n > 1:
                t.log(f"{base}.{ext} already exists in {out_dir}: this run saves as {name}.{ext}.", "warning")
            return name
    raise EngineError(f"model.output_name: too many runs named {base} in {out_dir}: choose another name.")


def write_run_files(t) -> None:
    """The settings copy and the tag report beside the LoRA; the facts every save's metadata needs."""
    s = t.settings
    if t.is_main:
        settings_file = t.out_dir / f"{t.name}_settings.json"
        if not settings_file.exists():
            t.files.append(settings_io.save_settings(s, settings_file))
        if s.runs.save_json_folder.strip():  # the one settings copy rule (settings/io.py)
            settings_io.save_settings_copy(s, name=t.name)
        if s.labels.tag_occurrence_txt_file:
            report = t.out_dir / f"{t.name}_tags.txt"
            if not report.exists():
                t.files.append(write_tag_report(
                    report, t.info, alphabetical=s.labels.sort_tag_occurrence_alphabetically))
    t.facts = gather_facts(t)


def save(t, stem: str, *, state: bool, final: bool = False,
         ranked: bool = False) -> tuple[Path, Path | None]:
    """Save the LoRA as ``stem`` (and the training state as ``stem-state``); (path, state folder).
    Each save carries its validation loss (when the run holds images out); a ``ranked`` save (the
    periodic ones) may later be deleted by ``images.keep_best_checkpoints``."""
    from lora_gui.engine.network import save_lora

    m, p = t.settings.model, t.progress
    path = t.out_dir / f"{stem}.{m.save_as}"
    state_dir = t.out_dir / f"{stem}-state"
    if path in t.saved:  # saved at this very step already (decided alike on every process)
        return path, (state_dir if state_dir.exists() else None)
    t.saved.add(path)
    t.acc.wait_for_everyone()
    with averaged_weights(t.optimizer):  # schedule-free: save the averaged weights
        tensors = t.family.lora_file_tensors(t.model, t.network, t.settings, SAVE_DTYPES[m.save_precision])
    if not all(torch.isfinite(v.float()).all() for v in tensors.values()):
        raise Diverged("The LoRA weights are no longer finite numbers (NaN/inf): the learning rate "
                       "is probably too high. Lower training.learning_rate; the last saved "
                       "checkpoint is kept.")
    if t.is_main:
        metadata = None
        if m.save_as == "safetensors":
            metadata = build_metadata(t.settings, t.facts, epoch=p.epoch, step=p.step, final=final)
            # sd-scripts' LoRANetwork.save_weights adds the sshs_* hashes even with no_metadata.
            metadata = with_hashes(tensors, metadata)
        path = save_lora(path, tensors, metadata, m.save_as)
        t.files.append(path)
    if state:
        state_files.save_state(t, state_dir)
        t.files.append(state_dir)
    loss = validation_now(t)
    t.emit(ev.CheckpointSaved(step=p.step, epoch=p.epoch, path=str(path),
                              state_dir=str(state_dir) if state else None, final=final,
                              validation_loss=loss))
    t.log(f"Saved {path}" + (f" and its state {state_dir}" if state else "")
          + (f" (validation loss {loss:.4f})" if loss is not None else ""))
    if ranked:
        keep_best(t, loss, path, state_dir if state else None)
    return path, (state_dir if state else None)


def validation_now(t) -> float | None:
    """The validation loss of the LoRA as it is now: the one measured at this step, else measured
    now; None when the run holds no images out."""
    step = t.progress.step
    if not (t.validation_losses and t.validation_losses[-1][0] == step):
        if not t.dataset.validation_batches():
            return None
        evaluation.validate(t)
    return t.validation_losses[-1][1]


def keep_best(t, loss: float | None, path: Path, state_dir: Path | None) -> None:
    """``images.keep_best_checkpoints``: keep the N ranked saves with the lowest validation loss,
    delete the others (their LoRA and state). The final LoRA is never ranked, so never deleted."""
    keep = t.settings.images.keep_best_checkpoints
    if not keep or loss is None or not t.is_main:
        return
    t.ranked_saves.append((loss, path, state_dir))
    t.ranked_saves.sort(key=lambda r: r[0])
    for worse, worse_path, worse_state in t.ranked_saves[keep:]:
        worse_path.unlink(missing_ok=True)
        if worse_state is not None:
            shutil.rmtree(worse_state, ignore_errors=True)
        t.files = [f for f in t.files if f not in (worse_path, worse_state)]
        t.log(f"Deleted {worse_path.name} (validation loss {worse:.4f}): not among the {keep} best "
              "(images.keep_best_checkpoints)")
    del t.ranked_saves[keep:]


def save_epoch(t, epoch: int) -> None:
    """The per-epoch save NAME-0000EE (and its state), then sd-scripts' retention: the save of epoch
    ``epoch - save_every_n_epochs * save_last_n_epochs`` is deleted (train_util.get_remove_epoch_no;
    the states by save_last_n_epochs_state when set, save_and_remove_state_on_epoch_end)."""
    img = t.settings.images
    save(t, f"{t.name}-{epoch:06d}", state=t.settings.model.save_state, ranked=True)
    keep_states = img.save_last_n_epochs_state or img.save_last_n_epochs
    for last_n, what in ((img.save_last_n_epochs, "file"), (keep_states, "state")):
        old = epoch - img.save_every_n_epochs * last_n
        if last_n and old > 0:
            _remove_save(t, f"{t.name}-{old:06d}", what)


def save_step(t, step: int) -> None:
    """The per-step save NAME-stepSSSSSS (and its state), then sd-scripts' retention: keep the saves
    of the last ``save_last_n_steps`` steps (train_util.get_remove_step_no: the save at
    step - last_n - 1, floored to a multiple of save_every_n_steps, is deleted; the states by
    save_last_n_steps_state when set, save_and_remove_state_stepwise)."""
    img = t.settings.images
    save(t, f"{t.name}-step{step:06d}", state=t.settings.model.save_state)
    keep_states = img.save_last_n_steps_state or img.save_last_n_steps
    for last_n, what in ((img.save_last_n_steps, "file"), (keep_states, "state")):
        if last_n:
            old = step - last_n - 1
            old -= old % img.save_every_n_steps
            if old > 0:
                _remove_save(t, f"{t.name}-step{old:06d}", what)


def _remove_save(t, stem: str, what: str) -> None:
    """Delete an older intermediate save (never the final LoRA, whose name has no suffix)."""
    if not t.is_main:
        return
    target = t.out_dir / (f"{stem}.{t.settings.model.save_as}" if what == "file" else f"{stem}-state")
    if not target.exists():
        return
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    if target in t.files:
        t.files.remove(target)
    t.log(f"Removed the older save {target} (keeping the last saves as the settings ask)")


def resume(t, state_dir: Path) -> None:
    """Continue from a state folder; read without unpickling anything (see ``state_files``)."""
    distributed.check_state_processes(t.acc, state_dir)
    state_files.load_state(t, state_dir)
    t.log(f"Resumed from {state_dir} at step {t.progress.step}")
