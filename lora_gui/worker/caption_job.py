"""Auto-captioning as a background job: ``python -m lora_gui.worker.caption_job JOB_DIR``.

A job folder is a run folder (:mod:`lora_gui.worker.protocol`: events.jsonl, inbox.jsonl,
status.json, process.json, train.log) whose ``caption.json`` holds the
:class:`~lora_gui.dataset.autocaption.CaptionJob` instead of training settings, so
``WorkerClient(jobs_root).attach(job_id)`` watches, waits for and stops it like a training run.
The job writes captions batch by batch (a Stop keeps what is written) as one undoable change.

The captioner (:mod:`lora_gui.engine.captioners`: onnxruntime or transformers) is imported by
name in the job process only, like the trainer's engine.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

from lora_gui.dataset.autocaption import CaptionJob, merge_caption
from lora_gui.dataset.edit import CaptionEditor
from lora_gui.dataset.scan import DatasetError
from lora_gui.events import Finished, Log, Progress, RunState, Started, Stop
from lora_gui.worker.child import InboxCommands, Reporter, _claim, _install_signal_handlers
from lora_gui.worker.failures import explain_failure, traceback_tail
from lora_gui.worker.processes import process_created
from lora_gui.worker.protocol import (
    ProcessRecord,
    RunPaths,
    Status,
    new_run_id,
    tail_text,
    write_process,
    write_status,
)

JOB_FILE = "caption.json"
CAPTIONERS = "lora_gui.engine.captioners:load_captioner"


def start_caption_job(jobs_root: str | Path, job: CaptionJob,
                      python: str = sys.executable) -> tuple[RunPaths, subprocess.Popen]:
    """Check the job, write its folder and start its process; returns at once (the caller reaps
    the process: ``popen.wait()`` once the job has ended)."""
    job.check()
    paths = RunPaths(Path(jobs_root).resolve() / new_run_id("caption"))
    paths.root.mkdir(parents=True)
    job.save(paths.root / JOB_FILE)
    paths.events.touch()
    paths.inbox.touch()
    write_status(paths, Status(run_id=paths.run_id, state=RunState.STARTING, created=time.time(),
                               output_name="auto-caption"))
    argv = [python, "-m", "lora_gui.worker.caption_job", str(paths.root)]
    with open(paths.log, "ab") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    write_process(paths, ProcessRecord(pid=popen.pid, argv=argv, spawned=time.time(),
                                       launcher_pid=os.getpid(), created=process_created(popen.pid)))
    return paths, popen


class CaptionReporter(Reporter):
    """A training run's final status names its LoRA; a caption job's names the captions written:
    the sentence of the job's last Log event, set in the same status write that ends the job."""

    last_log = ""

    def emit(self, event) -> None:
        if isinstance(event, Log):
            self.last_log = event.message
        super().emit(event)

    def _end(self, state: RunState, **changes) -> None:
        if state in (RunState.FINISHED, RunState.STOPPED) and self.last_log:
            changes["message"] = self.last_log
        super()._end(state, **changes)


def _load_captioner(job: CaptionJob):
    module, _, name = CAPTIONERS.partition(":")
    return getattr(importlib.import_module(module), name)(job)


def caption_images(job: CaptionJob, emit, commands) -> str:
    """Caption the job's images batch by batch; ends with a Finished event (stopped on a Stop).
    Returns the sentence for the job's status."""
    captioner = _load_captioner(job)
    images = [Path(p) for p in job.images]
    editor = CaptionEditor(job.undo_root or images[0].parent, job.caption_extension)
    total, done, changed, start = len(images), 0, [], time.monotonic()
    emit(Started(total_steps=total, steps_per_epoch=total, epochs=1, num_train_images=total,
                 num_reg_images=0, device="cpu", output_dir=str(editor.root)))
    stopped = False
    for first in range(0, total, job.batch_size):
        if any(isinstance(c, Stop) for c in commands.poll()):
            stopped = True
            break
        batch = images[first:first + job.batch_size]
        plan = {}
        for path, new in zip(batch, captioner.caption(batch), strict=True):
            try:
                caption = merge_caption(editor.caption_of(path), new, job.rule)
            except DatasetError as exc:  # a caption file that is not UTF-8: left alone, said
                emit(Log(message=str(exc), level="warning"))
                continue
            if caption is not None:
                plan[path] = caption
        if plan:
            changed += editor.set_captions(plan, f"auto-caption ({job.rule})", extend=first > 0).changed
        done += len(batch)
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        emit(Progress(step=done, total_steps=total, epoch=1, epochs=1, elapsed_s=elapsed,
                      steps_per_s=rate, eta_s=(total - done) / rate if rate else 0.0, phase="captioning"))
    sentence = (f"{'Stopped: wrote' if stopped else 'Wrote'} {len(changed)} caption file(s) for "
                f"{done} of {total} images.")
    emit(Log(message=sentence))
    emit(Finished(step=done, output_path=str(editor.root), stopped=stopped,
                  files=tuple(str(p) for p in changed)))
    return sentence


def run(job_dir: str) -> int:
    paths = RunPaths(Path(job_dir).resolve())
    lock, refusal = _claim(paths)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    reporter = CaptionReporter(paths)
    reporter.begin()
    _install_signal_handlers(reporter)
    try:
        job = CaptionJob.load(paths.root / JOB_FILE).check()
        reporter.set_state(RunState.RUNNING)
        caption_images(job, reporter.emit, InboxCommands(paths, reporter))
    except BaseException as exc:  # noqa: BLE001 - every way out ends the job with a sentence
        message = str(exc) if isinstance(exc, DatasetError) else explain_failure(exc, tail_text(paths.log))
        reporter.fail(message, traceback_tail(exc))
    finally:
        reporter.close()
        lock.close()
    return 1 if reporter.status.state == RunState.FAILED else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m lora_gui.worker.caption_job JOB_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1]))
