"""The GUI without a browser: the form built from the schema, values <-> documents, validation, the
run view, files, the dataset preview, launch safety and import boundaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from lora_gui.events import (
    Failed,
    Finished,
    ForceStop,
    Log,
    LossReported,
    Progress,
    RunState,
    SampleNow,
    SampleReady,
    SaveNow,
    Started,
    Stop,
    ValidationLoss,
)
from lora_gui.settings import FIELD_GROUPS, GROUPS, io
from lora_gui.settings.schema import TrainingSettings
from lora_gui.ui import fields
from lora_gui.ui.config import UIConfig
from lora_gui.ui.files import (
    UP,
    BrowseError,
    enter,
    extract_dataset_zip,
    list_folder,
    resolve_start,
)
from lora_gui.ui.launch import check_exposure, is_loopback
from lora_gui.ui.launch import main as launch_main
from lora_gui.ui.runview import RunView, thin

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from lora_gui.ui.app import build_app
    from lora_gui.worker.client import WorkerClient

    tmp = tmp_path_factory.mktemp("ui")
    config = UIConfig(data_dir=tmp / "data", runs_dir=tmp / "runs", preset="demo-tiny-cpu")
    return build_app(config, WorkerClient(config.runs_dir))


# --- the form is the schema ------------------------------------------------------------------------

def test_every_setting_has_exactly_one_component(app):
    registry = app.lora_gui.registry
    keys = {f"{group}.{name}" for name, group in FIELD_GROUPS.items()}
    assert set(registry.components) == keys
    ids = [c._id for c in registry.components.values()]
    assert len(ids) == len(set(ids)) == len(keys)
    # and nothing else in the page claims a setting's elem_id
    elem_ids = [b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)]
    for key in keys:
        group, name = key.split(".")
        assert elem_ids.count(f"field-{group}-{name}") == 1


def test_components_follow_the_declaration(app):
    registry = app.lora_gui.registry
    for spec in fields.SPECS:
        comp = registry.components[spec.key]
        assert comp.label == spec.label
        assert spec.info.startswith(GROUPS[spec.group].model_fields[spec.name].description)
        assert comp.info == spec.info
        kind = type(comp).__name__
        expected = {"checkbox": "Checkbox", "dropdown": "Dropdown", "list": "Dropdown",
                    "number": "Number", "slider": "Slider", "text": "Textbox", "textarea": "Textbox",
                    "folder": "Textbox", "file": "Textbox"}[spec.widget]
        if spec.widget == "number" and spec.optional:
            expected = "Textbox"  # empty = None; gradio's number box cannot be empty
        assert kind == expected, spec.key
        if spec.widget == "dropdown":
            assert [c[1] for c in comp.choices] == list(spec.choices)
    assert registry.components["training.lr_scheduler"].label == "LR scheduler"
    assert fields.SPEC_BY_KEY["training.learning_rate"].minimum == 0
    assert "range 0 to 10" in fields.SPEC_BY_KEY["training.learning_rate"].info
    assert fields.SPEC_BY_KEY["training.unet_lr"].optional
    # one tab per group, titled by the group class, advanced fields in a closed accordion
    assert [t.label for t in app.lora_gui.registry.tabs.values()] == [g.title for g in GROUPS.values()]
    accordions = [b for b in app.blocks.values() if type(b).__name__ == "Accordion"
                  and b.label == "Advanced"]
    assert len(accordions) == sum(any(s.advanced for s in fields.SPECS if s.group == g) for g in GROUPS)
    assert all(a.open is False for a in accordions)


def test_path_fields_have_a_browse_button(app):
    registry = app.lora_gui.registry
    paths = {s.key for s in fields.SPECS if s.widget in ("folder", "file")}
    assert set(registry.browse_buttons) == paths


def test_humanised_labels():
    assert fields.humanise("lr_scheduler_num_cycles") == "Lr scheduler num cycles"
    assert fields.SPEC_BY_KEY["images.flip_aug"].label == "Flip aug"


# --- values <-> documents ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(io.list_presets()))
def test_values_round_trip_every_preset(preset):
    settings = io.load_preset(preset)
    values = fields.settings_to_values(settings)
    assert set(values) == set(fields.SPEC_BY_KEY)
    json.dumps(values)  # widget values are plain JSON
    assert io.validate_document(fields.values_to_document(values)) == settings
    assert fields.check_values(values) == (settings, [])


def test_values_round_trip_of_odd_values():
    settings = io.validate_document({
        "training": {"unet_lr": None, "text_encoder_lr": 0.0, "network_alpha": 3.5},
        "labels": {"max_token_length": 225},
        "runs": {"json_load_skip_list": ["base_model", "seed"]},
        "images": {"resolution": "768,512"},
    })
    values = fields.settings_to_values(settings)
    assert values["labels.max_token_length"] == "225"  # the dropdown shows text
    assert values["training.unet_lr"] == ""  # an empty optional-number box
    assert values["runs.json_load_skip_list"] == ["base_model", "seed"]
    assert io.validate_document(fields.values_to_document(values)) == settings


def test_values_to_document_is_nested_by_group():
    doc = fields.values_to_document({"training.learning_rate": 0.5, "model.output_name": "x",
                                     "not.a_setting": 1})
    assert doc == {"training": {"learning_rate": 0.5}, "model": {"output_name": "x"}}


# --- validation ----------------------------------------------------------------------------------

def test_validation_lists_every_invalid_field():
    values = fields.settings_to_values(TrainingSettings())
    values.update({"training.learning_rate": -1, "samples.sample_width": 100,
                   "images.resolution": "big", "images.epochs": None, "model.output_name": "a/b",
                   "runs.json_load_skip_list": ["base_model", "nonsense"]})
    settings, issues = fields.check_values(values)
    assert settings is None
    paths = {i.path for i in issues}
    assert paths == {"training.learning_rate", "samples.sample_width", "images.resolution",
                     "images.epochs", "model.output_name", "runs.json_load_skip_list"}
    text = fields.issues_markdown(issues)
    assert "Training › **Learning rate**: must be at least 0" in text
    assert "Samples › **Sample width**: must be a multiple of 8" in text
    assert "Image processing › **Epochs**: is required" in text
    counts = fields.tab_error_counts(issues)
    assert counts["images"] == 2 and counts["training"] == 1 and counts["labels"] == 0
    assert fields.tab_label("images", 2) == "Image processing (2 errors)"
    assert fields.tab_label("training", 1) == "Training (1 error)"
    assert fields.tab_label("training", 0) == "Training"


def test_validation_reports_cross_field_rules_on_the_field_to_change():
    values = fields.settings_to_values(TrainingSettings())
    values.update({"training.unet_only": True, "training.text_only": True})
    _, issues = fields.check_values(values)
    assert [i.path for i in issues] == ["training.text_only"]


def test_whole_numbers_are_not_rounded_silently():
    values = fields.settings_to_values(TrainingSettings())
    values["training.network_dim"] = 8.0
    assert fields.check_values(values)[0].training.network_dim == 8
    values["training.network_dim"] = 8.5
    _, issues = fields.check_values(values)
    assert [i.path for i in issues] == ["training.network_dim"]


def test_validator_marks_each_field(app):
    """The event validator returns one gr.validate per setting component."""
    import gradio as gr

    ctx = app.lora_gui
    start = next(fn for fn in app.fns.values() if fn.name == "start")
    assert start.validator is not None
    values = fields.settings_to_values(TrainingSettings())
    values["training.learning_rate"] = -1
    data = {ctx.registry.components[k]: v for k, v in values.items()}
    result = start.validator(data)
    assert set(result) == set(ctx.registry.components.values())
    bad = result[ctx.registry.components["training.learning_rate"]]
    assert bad == gr.validate(False, bad["message"]) and "at least 0" in bad["message"]
    assert result[ctx.registry.components["training.seed"]]["is_valid"] is True


def test_loading_keeps_skip_listed_values_even_with_an_invalid_form():
    from lora_gui.ui.context import keep_current

    values = fields.settings_to_values(TrainingSettings())
    values.update({"model.img_folder": "/mine/images", "samples.sample_width": 100,
                   "runs.json_load_skip_list": ["img_folder", "seed"], "training.seed": 7})
    current = keep_current(values)
    assert current.model.img_folder == "/mine/images" and current.training.seed == 7
    loaded = io.load_document({"model": {"img_folder": "/theirs"}, "training": {"seed": 1,
                               "network_dim": 64}}, current)
    assert loaded.model.img_folder == "/mine/images" and loaded.training.seed == 7
    assert loaded.training.network_dim == 64


def test_foreign_import_report_lists_mapped_and_ignored(app):
    from lora_gui.ui.files_panel import load_with_report

    doc = json.loads((FIXTURES / "kohya_ss_config.json").read_text())
    values = fields.settings_to_values(TrainingSettings())
    settings, report = load_with_report(doc, values, "kohya.json")
    assert "Imported kohya.json" in report and "Mapped:" in report and "Ignored:" in report
    assert "`max_resolution` → `images.resolution`" in report
    assert settings.advanced.conv_dim == 8


# --- the run view ------------------------------------------------------------------------------

def test_run_view_folds_events(tmp_path):
    sample = tmp_path / "s.png"
    Image.new("RGB", (8, 8)).save(sample)
    lora = tmp_path / "out.safetensors"
    lora.write_bytes(b"x" * 2048)
    view = RunView(run_id="r1", state=RunState.STARTING)
    view.apply([Started(10, 5, 2, 4, 0, "cpu", str(tmp_path)),
                Progress(0, 8, 0, 0, 0.1, 0, 0, phase="caching latents")])
    assert "Caching latents: 0 / 8" in view.progress_markdown()
    view.apply([LossReported(1, 1, 1.0, 1e-4), LossReported(2, 1, 0.5, 1e-4),
                ValidationLoss(2, 1, 0.8), Progress(2, 10, 1, 2, 4.0, 0.5, 16.0),
                SampleReady(2, 1, str(sample), "a cat"), SampleReady(2, 1, str(tmp_path / "gone.png"), "x"),
                Log("hello")])
    assert view.state == "running" and view.active
    assert "Step **2 / 10**" in view.progress_markdown() and "0.50 it/s" in view.progress_markdown()
    assert "ETA 0:16" in view.progress_markdown()
    rows = view.plot_rows()
    assert [r["series"] for r in rows] == ["loss", "loss", "smoothed", "smoothed", "validation"]
    assert rows[2]["loss"] == pytest.approx(1.0)  # the debiased EMA starts at the first value
    assert 0.5 < rows[3]["loss"] < 1.0
    assert view.gallery() == [(str(sample), "step 2: a cat")]  # missing files are left out
    assert view.plot_due(now=1e9)
    view.mark_drawn("plot")
    view.plot_drawn_at = 1e9
    assert not view.plot_due(now=1e9)
    view.apply([LossReported(3, 1, 0.4, 1e-4)])
    assert not view.plot_due(now=1e9 + 0.1) and view.plot_due(now=1e9 + 2)
    view.apply([Finished(3, str(lora), stopped=True)])
    assert view.state == "stopped" and not view.active
    assert "LoRA ready (stopped early and saved at step 3)" in view.result_markdown()
    assert "2.0 KiB" in view.result_markdown()
    assert view.result_file() == str(lora)
    assert "hello" in view.log_text()


def test_run_view_failure_and_thinning():
    view = RunView(run_id="r", state=RunState.RUNNING)
    view.fail("The GPU ran out of memory: lower the batch size.")
    assert view.state == "failed"
    assert "The GPU ran out of memory" in view.result_markdown()
    view.fail("second")  # a final state is never overwritten
    assert "second" not in view.result_markdown()
    view2 = RunView(run_id="r", state=RunState.RUNNING)
    view2.apply([Failed("bad", detail="Traceback...")])
    assert "<details>" in view2.result_markdown()
    points = [(i, float(i)) for i in range(5000)]
    kept = thin(points, 600)
    assert len(kept) <= 601 and kept[-1] == points[-1] and kept[0] == points[0]


# --- files ---------------------------------------------------------------------------------------

def test_browser_is_limited_to_its_roots(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("x")
    (root / ".hidden").mkdir()
    listing = list_folder(root, [root], "file")
    assert listing.entries == ["📁 a"]  # no ".." above a root, no hidden entries
    listing = list_folder(root / "a", [root], "file")
    assert listing.entries == [UP, "📁 b", "📄 x.txt"]
    assert list_folder(root / "a", [root], "folder").entries == [UP, "📁 b"]
    assert enter(root / "a", UP, [root]) == (root.resolve(), True)
    assert enter(root / "a", "📄 x.txt", [root]) == ((root / "a" / "x.txt").resolve(), False)
    with pytest.raises(BrowseError):
        list_folder(tmp_path, [root])
    with pytest.raises(BrowseError):
        enter(root, UP, [root])
    assert resolve_start(str(root / "a" / "missing" / "f.json"), [root]) == (root / "a").resolve()
    assert resolve_start("/etc", [root]) == root


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_dataset_zip_is_extracted_safely(tmp_path):
    png = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(png)
    good = _zip(tmp_path / "my set.zip", {"my set/10_cat/a.png": png.read_bytes(),
                                          "my set/10_cat/a.txt": b"a cat",
                                          "__MACOSX/._a.png": b"junk"})
    dest = extract_dataset_zip(good, tmp_path / "datasets", "my set.zip")
    assert dest == tmp_path / "datasets" / "my_set"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "10_cat", "10_cat/a.png", "10_cat/a.txt"]
    again = extract_dataset_zip(good, tmp_path / "datasets", "my set.zip")
    assert again.name == "my_set-2"
    for bad in ({"../evil.txt": b"x"}, {"/abs.txt": b"x"}, {"a/../../evil.txt": b"x"}):
        with pytest.raises(BrowseError):
            extract_dataset_zip(_zip(tmp_path / "bad.zip", bad), tmp_path / "datasets", "bad")
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["my_set", "my_set-2"]
    with pytest.raises(BrowseError):
        extract_dataset_zip(png, tmp_path / "datasets", "notzip")


# --- dataset preview -----------------------------------------------------------------------------

def test_dataset_preview(tmp_path):
    from lora_gui.ui.preview import build_preview

    folder = tmp_path / "data" / "5_cat"
    folder.mkdir(parents=True)
    for i, size in enumerate([(512, 512), (768, 512), (512, 768), (640, 640)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(folder / f"{i}.png")
        if i:
            (folder / f"{i}.txt").write_text(f"cat, pose{i}, red")
    values = fields.settings_to_values(TrainingSettings())
    values.update({"model.img_folder": str(tmp_path / "data"), "training.batch_size": 2,
                   "images.epochs": 3, "samples.sample_width": 100})  # an unrelated invalid field
    preview = build_preview(values)
    assert preview.ok
    md = preview.markdown
    assert "| 5_cat | train | 5 | 4 | 3 | 1 |" in md
    assert "Images without a .txt caption (1): 0.png" in md
    assert "Top tags: cat (4), red (3)" in md  # the uncaptioned image counts its class token
    assert "× 3 epochs" in md
    assert len(preview.thumbnails) == 4
    assert "→ bucket 512x512" in preview.thumbnails[0][1]
    missing = build_preview({**values, "model.img_folder": str(tmp_path / "nope")})
    assert not missing.ok and "does not exist" in missing.markdown
    assert "Choose an **Image folder**" in build_preview({}).markdown


# --- launching -----------------------------------------------------------------------------------

def test_non_loopback_without_auth_is_refused(capsys, monkeypatch):
    monkeypatch.delenv("LORA_GUI_AUTH", raising=False)
    assert launch_main(["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "Refusing to listen on 0.0.0.0 without a login" in err and "--auth" in err
    assert launch_main(["--share"]) == 2
    assert "Refusing --share without a login" in capsys.readouterr().err
    assert launch_main(["--host", "0.0.0.0", "--auth", "nopassword"]) == 2
    assert "user:password" in capsys.readouterr().err


def test_exposure_rules(monkeypatch):
    from lora_gui.ui.launch import build_parser, parse_auth

    monkeypatch.delenv("LORA_GUI_AUTH", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    args = build_parser().parse_args(["--host", "0.0.0.0"])
    assert check_exposure(args, []) and check_exposure(args, [("u", "p")]) is None
    monkeypatch.setenv("LORA_GUI_AUTH", "me:secret")
    assert parse_auth(build_parser().parse_args([])) == [("me", "secret")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@pytest.mark.slow
def test_auth_shows_the_login_page_not_the_app(tmp_path):
    """Also: --share on a machine without internet says so in one sentence and keeps serving."""
    port = _free_port()
    env = {**os.environ, "LORA_GUI_HOME": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port",
                             str(port), "--auth", "alice:wonder", "--runs-dir", str(tmp_path / "runs"),
                             "--no-queue", "--share"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/", proc)
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert "Train a LoRA for SD 1.x/2.x" not in page  # the app's config is not in the page
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/config", timeout=10)
        assert info.value.code == 401
        form = urllib.parse.urlencode({"username": "alice", "password": "wonder"}).encode()
        login = urllib.request.urlopen(urllib.request.Request(base + "/login", data=form), timeout=10)
        assert login.status == 200
        proc.terminate()  # SIGTERM: a clean shutdown
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "shutting down" in out
        assert ("No share link: this machine cannot reach the internet" in out
                or "Share link: https://" in out), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- import boundaries ---------------------------------------------------------------------------

def test_the_ui_never_imports_torch():
    code = ("import sys; import lora_gui.ui, lora_gui.ui.app, lora_gui.ui.launch, lora_gui.ui.preview;"
            "from lora_gui.ui.app import build_app;"
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_ui_imports_gradio():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "lora_gui").rglob("*.py")
                 if "ui" not in p.relative_to(ROOT / "lora_gui").parts[:1]
                 and any(line.strip().startswith(("import gradio", "from gradio"))
                         for line in p.read_text().splitlines())]
    assert offenders == []


# --- run list, queue, last settings ----------------------------------------------------------------

def test_run_list_and_queue(app, tmp_path):
    from lora_gui.ui.runs_panel import refresh_lists

    ctx = app.lora_gui
    client = ctx.runs.client
    first = client.enqueue(io.load_preset("demo-tiny-cpu"))
    client.enqueue(TrainingSettings())
    out = refresh_lists(ctx)
    assert [r[2] for r in out[ctx["queue_table"]]] == ["demo-lora", "my-lora"]
    assert out[ctx["queue_item"]]["value"] == first.name
    assert ctx.runs.queue_pending()
    client.queue_move(first.name, 1)
    assert [i.output_name for i in client.queue_items()] == ["my-lora", "demo-lora"]
    for item in client.queue_items():
        client.queue_remove(item.name)
    assert not ctx.runs.queue_pending()
    # a run that only saves its settings ends at once and is listed with its output
    only = io.validate_document({"model": {"output_folder": str(tmp_path), "output_name": "x"},
                                 "runs": {"save_json_only": True}})
    run_id = ctx.runs.start(only)
    rows = refresh_lists(ctx)[ctx["runs_table"]]
    assert rows[0][0] == run_id and rows[0][1] == "finished" and rows[0][4].endswith("x.json")
    view = ctx.runs.attach_view(run_id)  # no events: the run folder's own state and sentence
    assert view.state is RunState.FINISHED and view.failed is None
    assert "save_json_only is on" in view.status_markdown()
    assert ctx.runs.latest_id() == run_id
    for command in (SaveNow(), SampleNow(), Stop()):
        ctx.runs.command(run_id, command)
    inbox = (client.runs_root / run_id / "inbox.jsonl").read_text()
    assert [json.loads(line)["kind"] for line in inbox.splitlines()] == ["save_now", "sample_now",
                                                                        "stop"]


def test_last_settings_are_restored(tmp_path):
    config = UIConfig(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", preset="sd15-style")
    settings, note = config.initial_settings()
    assert settings == io.load_preset("sd15-style") and "Preset 'sd15-style'" in note
    mine = io.validate_document({"training": {"network_dim": 7},
                                 "runs": {"json_load_skip_list": ["seed"]}})
    config.save_last(mine)
    restored, note = config.initial_settings()
    assert restored == mine and "Restored the last used settings" in note  # skip-list included
    config.last_settings_path.write_text("{broken")
    settings, note = config.initial_settings()
    assert settings == io.load_preset("sd15-style") and note.startswith("Could not restore")


def test_demo_folder_is_recognised(tmp_path, monkeypatch):
    from lora_gui.worker.demo import demo_dir_for  # the rule the page and the command line share

    monkeypatch.chdir(tmp_path)  # the shipped preset's paths are relative: demo/model, demo/dataset
    demo = io.load_preset("demo-tiny-cpu")
    assert demo_dir_for(demo) == Path("demo")  # missing here: to be built
    (tmp_path / "demo" / "model").mkdir(parents=True)
    assert demo_dir_for(demo) is None  # exists: nothing to build
    elsewhere = io.validate_document({"model": {"base_model": str(tmp_path / "x" / "model"),
                                                "img_folder": str(tmp_path / "y" / "dataset")}})
    assert demo_dir_for(elsewhere) is None  # not the demo layout: a missing model is an error
    other = io.validate_document({"model": {"base_model": str(tmp_path / "m"),
                                            "img_folder": str(tmp_path / "d")}})
    assert demo_dir_for(other) is None


# --- streaming a run through the run controller (simulated engine: no torch) -------------------------------

@pytest.fixture
def simulated(monkeypatch, tmp_path):
    from lora_gui.ui.run_control import RunController
    from lora_gui.worker.client import WorkerClient

    monkeypatch.setenv("LORA_GUI_WORKER_ENGINE", "simulated_engine:run_training")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT / "tests" / "support"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LORA_GUI_SIMULATE_STEP_S", "0.02")
    (tmp_path / "images").mkdir()
    client = WorkerClient(tmp_path / "runs")
    yield RunController(client), tmp_path
    active = client.active_run()
    if active is not None:
        active.force_stop(grace_s=2)
    client.close()


def _settings(tmp_path, **images):
    return io.validate_document({"model": {"img_folder": str(tmp_path / "images"),
                                           "output_folder": str(tmp_path / "out")},
                                 "images": images})


def _follow(runs, view, timeout=60):
    deadline = time.monotonic() + timeout
    while view.active and time.monotonic() < deadline:
        runs.poll(view)
        time.sleep(0.05)
    return view


def test_controller_streams_a_run_and_a_reattached_view_has_its_history(simulated):
    runs, tmp = simulated
    run_id = runs.start(_settings(tmp, max_steps=8))
    assert runs.active_id() == run_id
    view = _follow(runs, RunView(run_id=run_id, state=RunState.STARTING))
    assert view.state == "finished", view.log_text()
    assert [s for s, _ in view.losses] == list(range(1, 9))
    assert view.result_file() and Path(view.result_file()).read_text() == "simulated\n"
    again = runs.attach_view(run_id)  # a reloaded page (or a restarted GUI) redraws everything
    assert again.losses == view.losses and again.state == "finished"
    assert runs.latest_id() == run_id and runs.active_id() is None


def test_a_failing_run_shows_the_workers_sentence(simulated, monkeypatch):
    runs, tmp = simulated
    monkeypatch.setenv("LORA_GUI_SIMULATE", "raise")
    view = _follow(runs, RunView(run_id=runs.start(_settings(tmp)), state=RunState.STARTING))
    assert view.state == "failed"
    assert "simulated failure inside the engine" in view.result_markdown()


def test_stop_ends_the_run_with_a_saved_lora(simulated, monkeypatch):
    runs, tmp = simulated
    monkeypatch.setenv("LORA_GUI_SIMULATE_STEP_S", "0.2")
    run_id = runs.start(_settings(tmp, max_steps=200))
    view = RunView(run_id=run_id, state=RunState.STARTING)
    deadline = time.monotonic() + 60
    while not view.losses and time.monotonic() < deadline:
        runs.poll(view)
        time.sleep(0.05)
    assert view.losses, f"no loss within 60 s: {view.log_text()}"
    runs.command(run_id, Stop())
    view = _follow(runs, view)
    assert view.state is RunState.STOPPED and "stopped early and saved" in view.result_markdown()
    assert view.finished.step < 200


def test_force_stop_ends_a_trainer_that_ignores_stop(simulated, monkeypatch):
    runs, tmp = simulated
    monkeypatch.setenv("LORA_GUI_SIMULATE", "ignore-stop")
    monkeypatch.setenv("LORA_GUI_SIMULATE_STEP_S", "0.2")
    run_id = runs.start(_settings(tmp, max_steps=500))
    view = RunView(run_id=run_id, state=RunState.STARTING)
    deadline = time.monotonic() + 60
    while view.state is not RunState.RUNNING and time.monotonic() < deadline:
        runs.poll(view)
        time.sleep(0.05)
    assert view.state is RunState.RUNNING, view.log_text()
    sent = time.monotonic()
    runs.command(run_id, ForceStop(grace_s=1))
    assert time.monotonic() - sent < 0.5  # the grace period is waited out in a thread, not here
    view = _follow(runs, view, timeout=30)
    assert view.state is RunState.FAILED
    assert "The trainer was ended by SIGTERM" in view.result_markdown()  # after the 1 s grace
    assert runs.client.active_run() is None


def test_the_page_picks_up_a_run_the_queue_started(simulated, tmp_path):
    from lora_gui.ui.app import build_app
    from lora_gui.ui.context import PageState
    from lora_gui.worker.queue import QueueRunner

    runs, tmp = simulated
    app = build_app(UIConfig(data_dir=tmp / "data", runs_dir=runs.client.runs_root),
                    runs.client)
    ctx = app.lora_gui
    tick = next(fn for fn in app.fns.values() if fn.name == "tick").fn
    page = PageState()
    runs.client.enqueue(_settings(tmp, max_steps=5))
    assert ctx.runs.queue_pending()
    QueueRunner(runs.client).tick()  # the GUI's queue runner starts it (a thread in launch)
    ctx.runs._last_active_check = 0  # no cache between the two
    out = tick(page)
    assert page.view.run_id and page.view.run_id == ctx.runs.active_id()
    assert out[ctx["timer"]].active is True  # polls fast while the run goes
    deadline = time.monotonic() + 30
    while page.view.active and time.monotonic() < deadline:
        out = tick(page)
        time.sleep(0.05)
    assert page.view.state == "finished"
