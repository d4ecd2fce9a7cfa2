"""What the trainer uses, for the run panel: its RAM (the process and its children, psutil) and
the GPUs (name, memory used, utilisation, temperature, and the trainer's own memory on each) via
NVML (``nvidia-ml-py``) when an NVIDIA driver is present. No torch: the web process asks, so it
never touches CUDA."""

from __future__ import annotations

import threading
from dataclasses import dataclass

_nvml_lock = threading.Lock()
_nvml_state: dict[str, object] = {}  # "ok": bool once NVML was tried


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    used_mb: float
    total_mb: float
    utilisation: int | None  # % of the last sample period
    temperature: int | None  # degrees C
    trainer_mb: float | None  # the trainer's own memory on this GPU, when NVML lists it


def trainer_ram_mb(pid: int | None) -> float | None:
    """Resident memory of the trainer and its children (data-loader workers, accelerate ranks)."""
    if not pid:
        return None
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20
    except Exception:  # noqa: BLE001 - gone, or no psutil: nothing to show
        return None


def _nvml():
    with _nvml_lock:
        if "ok" not in _nvml_state:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["ok"], _nvml_state["mod"] = True, pynvml
            except Exception:  # noqa: BLE001 - no package, no driver, no GPU
                _nvml_state["ok"] = False
        return _nvml_state.get("mod") if _nvml_state["ok"] else None


def gpus(pids: set[int] = frozenset()) -> list[GpuInfo]:
    """Every NVIDIA GPU NVML sees (none without a driver); ``trainer_mb`` sums ``pids``' memory."""
    nv = _nvml()
    if nv is None:
        return []
    out = []
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001
        return []
    for i in range(count):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
            name = nv.nvmlDeviceGetName(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        except Exception:  # noqa: BLE001 - a GPU that fell off the bus: skip it
            continue
        out.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else str(name),
                           mem.used / 2**20, mem.total / 2**20, _utilisation(nv, h),
                           _temperature(nv, h), _trainer_mb(nv, h, pids)))
    return out


def _utilisation(nv, handle) -> int | None:
    try:
        return int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # noqa: BLE001 - not supported on this GPU
        return None


def _temperature(nv, handle) -> int | None:
    try:
        return int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
    except Exception:  # noqa: BLE001 - not supported on this GPU
        return None


def _trainer_mb(nv, handle, pids: set[int]) -> float | None:
    if not pids:
        return None
    try:
        procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001
        return None
    used = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory]
    return sum(used) / 2**20 if used else None


def resources_markdown(pid: int | None) -> str:
    """One line for the trainer's RAM and one per GPU, e.g. "GPU 0 NVIDIA H200: 12.1 / 139.8 GiB,
    87 %, 61 °C (trainer 11.9 GiB)"."""
    lines = []
    ram = trainer_ram_mb(pid)
    if ram is not None:
        lines.append(f"Trainer RAM: {ram / 1024:.2f} GiB")
    pids = _tree(pid)
    for g in gpus(pids):
        extra = [f"{g.utilisation} %" if g.utilisation is not None else "",
                 f"{g.temperature} °C" if g.temperature is not None else ""]
        mine = f" (trainer {g.trainer_mb / 1024:.1f} GiB)" if g.trainer_mb else ""
        lines.append(f"GPU {g.index} {g.name}: {g.used_mb / 1024:.1f} / {g.total_mb / 1024:.1f} GiB"
                     + "".join(f", {e}" for e in extra if e) + mine)
    if not lines:
        return ""
    if len(lines) == 1 and ram is not None:
        lines.append("GPU: none seen by NVML (CPU run, or no NVIDIA driver)")
    return " · ".join(lines)


def _tree(pid: int | None) -> set[int]:
    if not pid:
        return set()
    try:
        import psutil

        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except Exception:  # noqa: BLE001
        return {pid}
