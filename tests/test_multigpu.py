"""Several processes through ``accelerate launch`` (issue 15), on the CPU: 2 gloo processes
(``ACCELERATE_USE_CPU=1`` and ``--multi_gpu``), the tiny demo, the real engine.

Each slow test starts its launcher through ``WorkerClient`` and reaps it and every rank.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_gui.engine.data import DataOptions, TrainDataset
from lora_gui.engine.loader import RunBatches
from lora_gui.engine.train import run_training
from lora_gui.events import RunState
from lora_gui.settings import SettingsError, io
from lora_gui.settings.schema import parse_launch_args
from lora_gui.worker.client import WorkerClient
from lora_gui.worker.launch import Gpu, gpu_ids_problem, trainer_argv, trainer_env
from lora_gui.worker.processes import pid_alive

TWO = ("launch.multi_gpu=true", "launch.num_processes=2")


@pytest.fixture(autouse=True)
def _real_engine(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("LORA_GUI_WORKER_ENGINE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _run_processes(root: Path) -> list:
    """Every live process whose command line names a folder under ``root``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(str(root) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _none_left(root: Path, timeout: float = 10) -> bool:
    """Whether every process of the runs under ``root`` has ended within ``timeout`` s (a run is
    final as soon as rank 0 writes its end; the launcher and the ranks exit just after)."""
    deadline = time.monotonic() + timeout
    while _run_processes(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _run_processes(root)


def _reap(clients: list[WorkerClient], root: Path) -> None:
    for client in clients:
        for popen in client._popens.values():
            if popen.poll() is None:
                try:
                    os.killpg(popen.pid, signal.SIGKILL)
                except ProcessLookupError:  # ended between poll() and killpg()
                    popen.kill()
            popen.wait(10)
    for proc in _run_processes(root):
        proc.kill()


@pytest.fixture
def clients(tmp_path):
    made: list[WorkerClient] = []

    def make(name: str = "runs") -> WorkerClient:
        made.append(WorkerClient(tmp_path / name))
        return made[-1]

    try:
        yield make
    finally:
        _reap(made, tmp_path)


def settings_for(demo, out: Path, *extra: str):
    return io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        f"model.base_model={demo.model_dir}", f"model.img_folder={demo.dataset_dir}",
        f"model.output_folder={out}", "samples.sample_every_n_epochs=0",
        "images.save_every_n_epochs=0", "training.validation_split=0",
        "training.validation_every_n_steps=0", "images.cache_latents=true", *extra])


def _lora(path: Path) -> dict:
    return load_file(str(path))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _ranks_step(run) -> dict[int, tuple[str, int]]:
    """What each rank > 0 printed at its end: rank -> (status, step)."""
    ends = {}
    for line in (run.run_dir / "train.log").read_text(errors="replace").splitlines():
        if line.startswith("rank ") and " at step " in line:
            head, step = line.rsplit(" at step ", 1)
            rank, status = head[5:].split(": ")
            ends[int(rank)] = (status, int(step))
    return ends


# --- settings and the command line (fast) --------------------------------------------------------

def test_launch_settings_build_an_accelerate_argv_without_a_shell(tmp_path):
    s = io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
        *TWO, "launch.gpu_ids=0, 1", "launch.main_process_port=29511",
        "launch.extra_accelerate_launch_args=--num_cpu_threads_per_process 2 --same_network"])
    argv = trainer_argv(tmp_path / "run", s, python="py")
    assert argv == ["py", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--main_process_port", "29511", "--gpu_ids", "0,1",
                    "--max_restarts", "0", "--monitor_interval", "0.5",
                    "--num_cpu_threads_per_process", "2", "--same_network",
                    "-m", "lora_gui.worker", str(tmp_path / "run")]
    one = io.apply_overrides(s, ["launch.multi_gpu=false"])
    assert trainer_argv(tmp_path / "run", one, python="py") == ["py", "-m", "lora_gui.worker",
                                                                str(tmp_path / "run")]
    assert trainer_env(s, gpus=[]) == {"ACCELERATE_USE_CPU": "1"}
    assert trainer_env(s, gpus=[Gpu(0, "H100", 81559)]) == {}
    assert trainer_env(one, gpus=[]) == {}


@pytest.mark.parametrize("text, words", [
    ("--config_file x.yaml", "'--config_file' is not an accelerate launch flag"),
    ("--num_cpu_threads_per_process", "needs a value"),
    ("; rm -rf /", "';' is not an accelerate launch flag"),
])
def test_launch_args_outside_the_allow_list_are_refused_with_a_sentence(text, words):
    with pytest.raises(ValueError, match=words):
        parse_launch_args(text)
    with pytest.raises(SettingsError) as err:
        io.apply_overrides(io.load_preset("demo-tiny-cpu"), [f"launch.extra_accelerate_launch_args={text}"])
    assert "extra_accelerate_launch_args" in str(err.value)


def test_gpu_ids_and_machines_are_checked_with_sentences():
    gpus = [Gpu(0, "A", 1024), Gpu(1, "B", 2048)]
    assert gpu_ids_problem("0,1", gpus) is None
    assert gpu_ids_problem("2", gpus) == ("launch.gpu_ids: this machine has no GPU 2 (GPUs found: 0, "
                                          "1): choose among those or leave it empty.")
    assert "none (the CPU is used)" in gpu_ids_problem("0", [])
    assert Gpu(1, "B", 2048).describe() == "GPU 1: B, 2 GiB"
    with pytest.raises(SettingsError, match="gpu_ids"):
        io.apply_overrides(io.load_preset("demo-tiny-cpu"), ["launch.gpu_ids=0;1"])
    with pytest.raises(SettingsError, match="main_process_ip"):
        io.apply_overrides(io.load_preset("demo-tiny-cpu"), [*TWO, "launch.num_machines=2"])
    with pytest.raises(SettingsError, match="machine_rank"):
        io.apply_overrides(io.load_preset("demo-tiny-cpu"), [
            *TWO, "launch.num_machines=2", "launch.machine_rank=2", "launch.main_process_ip=10.0.0.1"])


def test_a_gpu_id_the_machine_lacks_ends_the_run_with_a_sentence(clients, demo, tmp_path,
                                                                  monkeypatch):
    from lora_gui.worker import client as client_module

    monkeypatch.setattr(client_module, "find_gpus", lambda: [])
    info = clients().start(settings_for(demo, tmp_path / "out", *TWO, "launch.gpu_ids=3")).info()
    assert info.state == RunState.FAILED
    assert info.message.startswith("launch.gpu_ids: this machine has no GPU 3")


# --- the batches of each rank (fast) --------------------------------------------------------------

def test_ranks_see_disjoint_slices_covering_every_sample_once_and_match_one_process(demo):
    s = settings_for(demo, Path("unused"), "training.batch_size=3", "images.buckets=true",
                     "images.repeats=3", "images.resolution=128,128", "images.min_bucket_resolution=64",
                     "images.max_bucket_resolution=256")
    from lora_gui.dataset.scan import scan_dataset

    info = scan_dataset(demo.dataset_dir, None, repeats=3, caption_extension=".txt",
                        trigger_words="demoshape")
    dataset = TrainDataset(info, DataOptions.from_settings(s))
    ranks = [RunBatches(dataset, r, 2) for r in range(2)]
    one = RunBatches(TrainDataset(info, DataOptions.from_settings(
        io.apply_overrides(s, ["training.batch_size=6"]))), 0, 1)
    assert len(dataset.bucket_counts()) > 1  # buckets included
    for epoch in range(2):
        per_rank = [[item for b in range(r.per_epoch()) for item in r.slice(r.batches(epoch)[b])]
                    for r in ranks]
        assert ranks[0].per_epoch() == ranks[1].per_epoch() == one.per_epoch()
        seen = Counter(id(item) for items in per_rank for item in items)
        epoch_items = dataset.train_items + dataset.reg_items
        assert sorted(seen) == sorted(id(i) for i in epoch_items) and set(seen.values()) == {1}
        # batch 3 x 2 processes is batch 6 x 1 process: rank r holds [3r, 3r + 3) of each batch
        for b, whole in enumerate(one.batches(epoch)):
            assert [i.path for i in ranks[0].slice(ranks[0].batches(epoch)[b])] == [i.path for i in whole[:3]]
            assert [i.path for i in ranks[1].slice(ranks[1].batches(epoch)[b])] == [i.path for i in whole[3:]]
    # the loaded slice carries the global batch's size and draws by global position
    index, batch, size = ranks[1][0]
    assert index == 0 and size == len(ranks[1].batches(0)[0])
    _, whole_batch, _ = one[0]
    assert batch is None or batch.captions == whole_batch.captions[3:]


# --- real 2-process runs (slow) -------------------------------------------------------------------

@pytest.mark.slow  # one 2-process run and one in-process run: ~1-2 min on 2 shared cores
@pytest.mark.parametrize("network", [
    # LoRA through peft; LoHa through lycoris-lora: neither is acc.prepare'd, so this proves the
    # trainer's own averaging (distributed.average_gradients) covers the LyCORIS modules as well.
    (), ("advanced.network_type=LoHa", "advanced.conv_dim=2", "advanced.conv_alpha=1")],
    ids=["LoRA", "LoHa"])
def test_two_processes_of_batch_1_equal_one_process_of_batch_2(clients, demo, tmp_path, network):
    extra = ("images.max_steps=3", "images.flip_aug=true", *network)
    run = clients().start(settings_for(demo, tmp_path / "two", *TWO, "training.batch_size=1", *extra))
    info = run.wait(240)
    assert info.state == RunState.FINISHED, (info.message, info.detail)
    assert info.step == 3 and _ranks_step(run) == {1: ("finished", 3)}
    single = run_training(settings_for(demo, tmp_path / "one", "training.batch_size=2", *extra),
                          lambda e: None)
    assert single.status == "finished" and single.step == 3
    two, one = _lora(tmp_path / "two" / "demo-lora.safetensors"), _lora(single.output_path)
    assert _max_diff(two, one) < 1e-5
    zero_at_start = "hada_w2_a" if network else "lora_up"  # LoHa's w2_a and LoRA's up start at 0
    assert max(v.abs().max().item() for k, v in two.items() if zero_at_start in k) > 1e-4  # it trained
    # only rank 0 wrote files: one LoRA, one settings copy, one tag report, the logs
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    assert _none_left(tmp_path / "runs")


@pytest.mark.slow  # three 2-process runs: ~3 min on 2 shared cores
def test_stop_during_two_processes_then_resume_continues_bit_identically(clients, demo, tmp_path):
    from test_worker import training_progress

    client = clients()
    extra = (*TWO, "training.batch_size=1", "images.max_steps=16")
    run = client.start(settings_for(demo, tmp_path / "stopped", *extra))
    training_progress(run, at_least=2, timeout=240)
    run.stop()
    info = run.wait(120)
    assert info.state == RunState.STOPPED, (info.message, info.detail)
    stop_step = info.step
    assert 2 <= stop_step < 16 and _ranks_step(run) == {1: ("stopped", stop_step)}  # the same step
    out = tmp_path / "stopped"
    loras = sorted(p.name for p in out.glob("*.safetensors"))
    states = sorted(p.name for p in out.glob("*-state"))
    assert loras == [f"demo-lora-step{stop_step:06d}.safetensors"]
    assert states == [f"demo-lora-step{stop_step:06d}-state"]
    state = out / states[0]
    assert sorted(p.name for p in state.glob("rng_*.json")) == ["rng_0.json", "rng_1.json"]

    # a different number of processes: a sentence, not a wrong resume
    one = run_training(settings_for(demo, tmp_path / "one", "training.batch_size=1", "images.max_steps=6",
                                    f"model.load_previous_save_state={state}"), lambda e: None)
    assert one.status == "failed"
    assert one.message == (f"model.load_previous_save_state: the state in {state} was saved by a run "
                           "on 2 process(es) and this run has 1: set num_processes to 2 to resume it "
                           "(or start a new run from its LoRA with lora_model_for_resume).")

    resumed = client.start(settings_for(demo, tmp_path / "stopped", *extra,
                                        f"model.load_previous_save_state={state}"))
    assert resumed.wait(240).state == RunState.FINISHED, resumed.info().detail
    whole = client.start(settings_for(demo, tmp_path / "whole", *extra))
    assert whole.wait(240).state == RunState.FINISHED, whole.info().detail
    a, b = _lora(out / "demo-lora.safetensors"), _lora(tmp_path / "whole" / "demo-lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _none_left(tmp_path / "runs")


@pytest.mark.slow  # one 2-process run killed early: ~40 s
def test_kill_9_of_rank_1_fails_the_run_within_5_s_naming_it_and_leaves_no_process(
        clients, demo, tmp_path):
    from test_worker import training_progress

    run = clients().start(settings_for(demo, tmp_path / "out", *TWO, "training.batch_size=1",
                                       "images.max_steps=200"))
    training_progress(run, at_least=1, timeout=240)
    pid = int((run.run_dir / "ranks" / "1.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + 5
    while not run.info().final and time.monotonic() < deadline:
        time.sleep(0.05)
    info = run.info()
    assert info.state == RunState.FAILED, info
    assert time.monotonic() - killed < 5
    assert info.message.startswith(f"Process 1 of 2 (rank 1, pid {pid}) died, which ended the whole run")
    assert _none_left(tmp_path / "runs")
    status_pid = run.info().pid
    assert status_pid and not pid_alive(status_pid)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two machines of one process each on localhost: ~1 min
def test_two_machines_on_localhost_train_the_demo_to_the_end(clients, demo, tmp_path):
    machine = ("launch.num_machines=2", "launch.num_processes=2", "launch.main_process_ip=127.0.0.1",
               f"launch.main_process_port={_free_port()}", "images.max_steps=3",
               "training.batch_size=1")
    first = clients("machine0").start(settings_for(demo, tmp_path / "out0", *machine,
                                                   "launch.machine_rank=0"))
    second = clients("machine1").start(settings_for(demo, tmp_path / "out1", *machine,
                                                    "launch.machine_rank=1"))
    a, b = first.wait(300), second.wait(120)
    assert a.state == RunState.FINISHED and a.step == 3, (a.message, a.detail)
    assert b.state == RunState.FINISHED and b.step == 3, (b.message, b.detail)
    assert (tmp_path / "out0" / "demo-lora.safetensors").exists()
    assert not list((tmp_path / "out1").glob("*.safetensors"))  # only rank 0 writes files


@pytest.mark.slow  # one 2-process run killed early: ~40 s
def test_kill_9_of_the_launcher_ends_its_ranks_and_fails_the_run_with_a_sentence(
        clients, demo, tmp_path):
    from test_worker import training_progress

    client = clients()
    run = client.start(settings_for(demo, tmp_path / "out", *TWO, "training.batch_size=1",
                                    "images.max_steps=200"))
    training_progress(run, at_least=1, timeout=240)
    launcher = client._popens[run.run_id]
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: its ranks lead their own sessions
    launcher.wait(5)
    info = run.wait(10)
    assert info.state == RunState.FAILED, info
    assert info.message == "The accelerate launcher of this run ended, which ended the whole run."
    assert _none_left(tmp_path / "runs")
