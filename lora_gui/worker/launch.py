"""How a run's trainer is started: ``python -m lora_gui.worker RUN_DIR``, or under
``accelerate launch`` for several processes or machines; the GPUs this machine has; and which GPU
a queued run with ``gpu_per_run`` gets (``gpu_for``: one GPU per run, never one GPU for two runs).

Torch-free (the web process imports it): the GPUs come from NVML (nvidia-ml-py), and no NVML
(no NVIDIA driver) means no GPUs: the processes then run on the CPU (gloo), which accelerate does
with ``ACCELERATE_USE_CPU=1`` and ``--multi_gpu`` (``--cpu --num_processes 2`` silently runs one).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from lora_gui.settings import TrainingSettings
from lora_gui.settings.schema import LaunchSettings, parse_launch_args


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int

    def describe(self) -> str:
        return f"GPU {self.index}: {self.name}, {self.memory_mib / 1024:.0f} GiB"


def find_gpus() -> list[Gpu]:
    """This machine's NVIDIA GPUs (index, name, memory); [] without a driver or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: the CPU it is
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Gpu(i, name.decode() if isinstance(name, bytes) else name, memory // 2**20))
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_ids_problem(gpu_ids: str, gpus: list[Gpu]) -> str | None:
    """A sentence when ``gpu_ids`` names a GPU this machine does not have, else None."""
    wanted = [int(p) for p in gpu_ids.split(",") if p.strip()]
    missing = [i for i in wanted if i not in {g.index for g in gpus}]
    if not missing:
        return None
    found = ", ".join(str(g.index) for g in gpus) or "none (the CPU is used)"
    return (f"launch.gpu_ids: this machine has no GPU {', '.join(map(str, missing))} (GPUs found: "
            f"{found}): choose among those or leave it empty.")


def trainer_argv(run_dir, settings: TrainingSettings | None, python: str = sys.executable,
                 prefix=()) -> list[str]:
    """The trainer's command line, an argv list (never a shell string)."""
    la = settings.launch if settings is not None else None
    if la is None or la.processes == 1 and la.num_machines == 1:
        return [*prefix, python, "-m", "lora_gui.worker", str(run_dir)]
    return [python, "-m", "accelerate.commands.launch", *accelerate_flags(la),
            "-m", "lora_gui.worker", str(run_dir)]


def accelerate_flags(la: LaunchSettings) -> list[str]:
    flags = ["--multi_gpu", "--num_processes", str(la.num_processes),
             "--num_machines", str(la.num_machines)]
    if la.num_machines > 1:
        flags += ["--machine_rank", str(la.machine_rank), "--main_process_ip", la.main_process_ip]
    if la.main_process_port:
        flags += ["--main_process_port", str(la.main_process_port)]
    if la.gpu_ids:
        flags += ["--gpu_ids", la.gpu_ids]
    # A rank that dies ends the run at once: no restart, and the others are stopped (torchrun).
    flags += ["--max_restarts", "0", "--monitor_interval", "0.5"]
    return flags + parse_launch_args(la.extra_accelerate_launch_args)


def trainer_env(settings: TrainingSettings | None, gpus: list[Gpu] | None = None) -> dict[str, str]:
    """Variables the trainer needs besides the caller's: the CPU switch for accelerate when the
    machine has no GPU and the run has several processes."""
    if settings is None or settings.launch.processes == 1 and settings.launch.num_machines == 1:
        return {}
    gpus = find_gpus() if gpus is None else gpus
    return {} if gpus else {"ACCELERATE_USE_CPU": "1"}


# --- one GPU per queued run (launch.gpu_per_run) --------------------------------------------------

@dataclass
class Busy:
    """What the active runs hold: a run without a GPU of its own has every GPU."""

    active: bool = False  # some run is starting, running or stopping
    exclusive: bool = False  # some active run has every GPU (started with Start, or not per GPU)
    taken: set[int] = field(default_factory=set)  # the GPUs active runs hold, each alone

    def hold(self, gpu: int | None) -> None:
        self.active = True
        if gpu is None:
            self.exclusive = True
        else:
            self.taken.add(gpu)


WAIT = "wait"  # gpu_for's answer when the run must wait for its turn


def gpu_for(la: LaunchSettings, gpus: Sequence[int], busy: Busy) -> int | None | str:
    """The GPU a queued run starts on now, None to start it with every GPU, or WAIT.

    With ``gpu_per_run`` on a machine with GPUs: the first GPU of ``gpu_ids`` (all GPUs when
    empty) that no active run holds, while no run has every GPU. Otherwise (or without any GPU,
    or when ``gpu_ids`` names none of this machine's GPUs: the start then fails with
    ``gpu_ids_problem``'s sentence) the run starts only when no run is active."""
    wanted = {int(p) for p in la.gpu_ids.split(",") if p.strip()}
    pool = [g for g in gpus if not wanted or g in wanted]
    if la.gpu_per_run and pool:
        if busy.exclusive:
            return WAIT
        return next((g for g in pool if g not in busy.taken), WAIT)
    return WAIT if busy.active else None


def plan_starts(launches: Sequence[LaunchSettings], gpus: Sequence[int], busy: Busy) -> list[int | None]:
    """The GPUs of the queued runs (in queue order) that start now: the first ones that may,
    none overtaking another (``gpu_for`` each, the earlier ones counted as started)."""
    busy = Busy(busy.active, busy.exclusive, set(busy.taken))
    plan: list[int | None] = []
    for la in launches:
        gpu = gpu_for(la, gpus, busy)
        if gpu == WAIT:
            break
        plan.append(gpu)
        busy.hold(gpu)
    return plan
