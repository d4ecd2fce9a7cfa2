"""Issue 11, reliability: bad files and full disks end in sentences, never tracebacks or raw
errno text; every fault is reproduced first (each test fails on the code before the fix)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from lora_gui.ui.files import BrowseError, extract_dataset_zip

sys.path.insert(0, str(Path(__file__).parent / "support"))
from gui_http import ROOT, EventError, GuiServer, upload  # noqa: E402


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name" is what one test wants
        for name, data in members:
            if name.endswith("/"):
                z.mkdir(name.rstrip("/"))
            else:
                z.writestr(name, data)
    return path


@pytest.mark.parametrize(("members", "sentence"), [
    ([("10_cat/a.txt", b"x"), ("10_cat/a.txt", b"y")], "holds 10_cat/a.txt twice"),
    ([("10_cat/a", b"x"), ("10_cat/a/b.txt", b"y")], "both a file and a folder named 10_cat/a"),
    ([("10_cat/a/b.txt", b"y"), ("10_cat/a", b"x")], "both a file and a folder named 10_cat/a"),
    ([("10_cat/", b""), ("10_cat", b"x")], "both a file and a folder named 10_cat"),
    ([("10_cat/" + "n" * 300 + ".png", b"x")], "longer than 255 bytes"),
    ([("/".join(["d" * 200] * 20) + "/a.png", b"x")], "path longer than"),
], ids=["duplicate", "file-then-folder", "folder-then-file", "dir-entry-clash", "long-name",
        "long-path"])
def test_bad_zips_get_sentences_and_write_nothing(tmp_path, members, sentence):
    bad = _zip(tmp_path / "bad.zip", members)
    with pytest.raises(BrowseError, match=sentence):
        extract_dataset_zip(bad, tmp_path / "datasets", "bad.zip")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_zip_with_a_bad_crc_gets_a_sentence(tmp_path):
    good = _zip(tmp_path / "crc.zip", [("10_cat/a.txt", b"a cat sitting on a mat")])
    data = bytearray(good.read_bytes())
    at = data.index(b"a cat sitting")
    data[at] = ord("A")  # stored, not deflated: the content changes, the CRC does not
    good.write_bytes(bytes(data))
    with pytest.raises(BrowseError, match="10_cat/a.txt is damaged.*zip the folder again"):
        extract_dataset_zip(good, tmp_path / "datasets", "crc.zip")
    assert list((tmp_path / "datasets").iterdir()) == []


def test_zip_of_a_folder_holding_its_own_name_is_unwrapped(tmp_path):
    z = _zip(tmp_path / "set.zip", [("set/set/a.txt", b"x"), ("set/10_cat/b.txt", b"y")])
    dest = extract_dataset_zip(z, tmp_path / "datasets", "set.zip")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "10_cat", "10_cat/b.txt", "set", "set/a.txt"]


# --- item 9: deeply nested JSON ----------------------------------------------------------------------

def _deep(path: Path, levels: int) -> Path:
    path.write_text('{"model": ' * levels + "1" + "}" * levels)
    return path


@pytest.mark.parametrize("levels", [40, 5000])
@pytest.mark.parametrize("command", [["config", "validate"], ["train"]])
def test_deeply_nested_json_gets_a_sentence_on_the_command_line(tmp_path, command, levels):
    deep = _deep(tmp_path / "deep.json", levels)
    proc = subprocess.run([sys.executable, "-m", "lora_gui.cli", *command, str(deep)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert f"{deep} nests lists or objects" in proc.stderr and "levels deep" in proc.stderr


def test_json_depth_is_measured_without_recursion():
    from lora_gui.settings.io import json_depth, loads_bounded

    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    value = []
    for _ in range(100_000):  # deeper than any recursion limit
        value = [value]
    assert json_depth(value) == 100_001
    with pytest.raises(ValueError, match="the queue file nests lists or objects 33 levels deep"):
        loads_bounded("[" * 33 + "]" * 33, "the queue file")


# --- items 5, 6, 7 and 9 on a real server (the simulated engine: no torch in the trainer) --------------

def _children(pid: int) -> dict[int, str]:
    """pid -> state letter of every child process of ``pid`` (from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out[int(stat.parent.name)] = fields[0]
    return out


def _seed_damaged_runs(runs: Path) -> dict[str, str]:
    """Run folders with a damaged status.json (what the issue found), keyed by why."""
    good = {"run_id": "x", "state": "finished", "created": 1.7e9}
    cases = {"array": [1, 2], "created-null": {**good, "created": None},
             "created-string": {**good, "created": "yesterday"}, "not-json": "{",
             "deep": "[" * 5000 + "]" * 5000, "state-unknown": {**good, "state": "exploded"}}
    for name, content in cases.items():
        folder = runs / f"20260101-000000-{name}"
        folder.mkdir(parents=True)
        text = content if isinstance(content, str) else json.dumps({**content, "run_id": folder.name}
                                                                   if isinstance(content, dict) else content)
        (folder / "status.json").write_text(text)
    return {name: f"20260101-000000-{name}" for name in cases}


def _seed_bad_events_run(runs: Path) -> str:
    """A finished run, the newest, whose events file has lines of the wrong types among good ones."""
    run_id = "20991231-235959-badevents"
    folder = runs / run_id
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps(
        {"run_id": run_id, "state": "finished", "created": 4.1e9, "output_path": None}))
    lines = [{"kind": "started", "total_steps": 3, "steps_per_epoch": 3, "epochs": 1,
              "num_train_images": 1, "num_reg_images": 0, "device": "cpu", "output_dir": "o"},
             {"kind": "loss", "step": 1, "epoch": 1, "loss": 0.5, "lr": 1e-4},
             {"kind": "loss", "step": "two", "epoch": 1, "loss": "low", "lr": None},
             {"kind": "progress", "step": 2, "total_steps": 3, "epoch": 1, "epochs": 1,
              "elapsed_s": "long", "steps_per_s": "fast", "eta_s": [], "phase": "training"},
             {"kind": "sample", "step": 1, "epoch": 1, "path": {"a": 1}, "prompt": 3},
             {"kind": "loss", "step": 3, "epoch": 1, "loss": 0.25, "lr": 1e-4}, [1, 2, 3]]
    (folder / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                         + "[" * 3000 + "\n")
    return run_id


def _sim_server(cwd: Path) -> GuiServer:
    (cwd / "images").mkdir(exist_ok=True)
    env = {"LORA_GUI_WORKER_ENGINE": "simulated_engine:run_training",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "support"), str(ROOT)]),
           "LORA_GUI_SIMULATE_STEP_S": "0.2"}
    return GuiServer(cwd, "--no-queue", env=env)


@pytest.fixture(scope="module")
def sim_gui(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reliability")
    bad_events = _seed_bad_events_run(cwd / "runs")
    with _sim_server(cwd) as server:
        try:
            yield server, bad_events
        finally:
            _kill_trainers(cwd / "runs")


@pytest.fixture(scope="module")
def damaged_gui(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("damaged")
    damaged = _seed_damaged_runs(cwd / "runs")
    with _sim_server(cwd) as server:
        yield server, damaged


def _kill_trainers(runs: Path) -> None:
    for status in runs.glob("*/status.json"):
        try:
            pid = json.loads(status.read_text()).get("pid")
            if isinstance(pid, int) and pid > 0 and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, AttributeError, RecursionError):
            continue


def _settings_json(cwd: Path, steps: int) -> str:
    from lora_gui.settings import io

    return io.dumps(io.validate_document({"model": {"img_folder": str(cwd / "images"),
                                                    "output_folder": str(cwd / "out")},
                                          "images": {"max_steps": steps}}))


def _status_until(page, run_id: str, ok, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(page.api("run_status", run_id))
        if ok(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


@pytest.mark.slow
def test_damaged_run_folders_are_listed_not_fatal(damaged_gui):
    server, damaged = damaged_gui
    page = server.page()  # the server started: before the fix, reconcile raised at start-up
    rows = page.call("runs-refresh")[page.component_id("runs-table")]["data"]
    by_id = {row[0]: row for row in rows}
    for why, run_id in damaged.items():
        assert by_id[run_id][1] == "damaged", (why, by_id[run_id])
        assert "This run folder is damaged: status.json is damaged" in by_id[run_id][4]
        assert json.loads(page.api("run_status", run_id))["state"] == "damaged"
    # A run folder damaged while the GUI runs is listed the same way.
    late = server.cwd / "runs" / "20260102-000000-late"
    late.mkdir()
    (late / "status.json").write_text(json.dumps({"run_id": late.name, "state": "running",
                                                  "created": "now"}))
    rows = page.call("runs-refresh")[page.component_id("runs-table")]["data"]
    assert [r[1] for r in rows if r[0] == late.name] == ["damaged"]
    assert "created must be float, not str" in [r[4] for r in rows if r[0] == late.name][0]


@pytest.mark.slow
def test_events_of_the_wrong_types_are_skipped_not_shown_raw(sim_gui):
    server, bad_events = sim_gui
    page = server.page()
    out = page.load()  # the newest run is drawn in the run panel on load
    status = json.loads(page.api("run_status", bad_events))
    assert status["state"] == "finished" and status["losses"] == [[1, 0.5], [3, 0.25]]
    assert status["samples"] == [] and status["step"] == 0
    assert out[page.component_id("run-status")].startswith(f"**Finished** `{bad_events}`")
    plot = out[page.component_id("run-plot")]["value"]["data"]
    assert [row for row in plot if row[2] == "loss"] == [[1, 0.5, "loss"], [3, 0.25, "loss"]]


@pytest.mark.slow
def test_run_status_agrees_with_the_folder_after_a_kill_9(sim_gui):
    server, _ = sim_gui
    page = server.page()
    run_id = page.api("start_run", _settings_json(server.cwd, 500))
    status = _status_until(page, run_id, lambda s: s["step"] >= 2)
    assert status["state"] == "running", status
    pid = json.loads((server.cwd / "runs" / run_id / "status.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    status = _status_until(page, run_id, lambda s: s["state"] != "running", timeout=20)
    on_disk = json.loads((server.cwd / "runs" / run_id / "status.json").read_text())
    assert status["state"] == on_disk["state"] == "failed", status
    assert "SIGKILL" in status["message"] or "killed" in status["message"].lower()
    time.sleep(1.0)  # a later call says the same (the view of the events alone said "running")
    assert json.loads(page.api("run_status", run_id))["state"] == "failed"


@pytest.mark.slow
def test_finished_trainers_are_reaped(sim_gui):
    server, _ = sim_gui
    page = server.page()
    run_id = page.api("start_run", _settings_json(server.cwd, 3))
    status = _status_until(page, run_id, lambda s: s["state"] == "finished")
    assert status["state"] == "finished", status
    deadline = time.monotonic() + 10
    while (zombies := [p for p, st in _children(server.proc.pid).items() if st == "Z"]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert zombies == [], f"defunct children of the GUI server: {zombies}"


@pytest.mark.slow
def test_deep_json_in_the_page_gets_a_sentence(sim_gui, tmp_path):
    server, _ = sim_gui
    page = server.page()
    deep = '{"model": ' * 5000 + "1" + "}" * 5000
    with pytest.raises(EventError) as err:
        page.api("start_run", deep)
    assert "nests lists or objects about a thousand levels deep" in err.value.message
    path = tmp_path / "deep.json"
    path.write_text(deep)
    out = page.call("load-upload", "upload", values={"load-upload": upload(server, path)})
    report = out[page.component_id("files-report")]
    assert "Not loaded" in report and "levels deep" in report and "Recursion" not in report
