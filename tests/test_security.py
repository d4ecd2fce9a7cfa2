"""Issue 11, security: each fault reproduced against a real server over HTTP (the page's own events,
called as the browser calls them), or on the engine's real resume path."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
from gui_http import EventError, GuiServer, upload  # noqa: E402


@pytest.fixture(scope="module")
def gui(tmp_path_factory):
    top = tmp_path_factory.mktemp("security")
    cwd = top / "gui"
    (cwd / "mine").mkdir(parents=True)
    (top / "outside").mkdir()
    (top / "outside" / "secret.txt").write_text("not for the web")
    (cwd / "mine" / "other.txt").write_text("private too")
    with GuiServer(cwd) as server:
        yield server, top


def _served(server: GuiServer, path: Path) -> int:
    return server.get(f"/gradio_api/file={path}")[0]


@pytest.mark.slow
def test_saving_settings_stays_inside_the_roots_and_serves_no_new_folder(gui):
    server, top = gui
    page = server.page()
    outside = top / "outside"
    assert _served(server, outside / "secret.txt") == 403
    try:
        page.call("save-settings", values={"save-path": str(outside / "s.json")})
        refusal = ""
    except EventError as exc:
        refusal = exc.message
    # Before the fix: saved there, and the folder became readable over HTTP by every session.
    assert _served(server, outside / "secret.txt") == 403
    assert not (outside / "s.json").exists()
    assert "outside the folders this server saves settings in" in refusal
    # A traversal and a symbolic link out of the roots are refused the same way.
    (server.cwd / "link").symlink_to(outside)
    for sneaky in ("mine/../../outside/t.json", "link/t.json"):
        with pytest.raises(EventError):
            page.call("save-settings", values={"save-path": sneaky})
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # Inside the roots: saved, offered as a download, and its folder is still not served.
    out = page.call("save-settings", values={"save-path": "mine/s.json"})
    assert json.loads((server.cwd / "mine" / "s.json").read_text())["settings_version"] == 1
    download = out[page.component_id("save-download")]["value"]
    assert download["orig_name"] == "s.json"
    status, body = server.get(f"/gradio_api/file={download['path']}")
    assert status == 200 and json.loads(body)["settings_version"] == 1
    assert _served(server, server.cwd / "mine" / "other.txt") == 403
    assert _served(server, server.cwd / "mine" / "s.json") == 403


@pytest.mark.slow
def test_loading_settings_stays_inside_the_roots(gui):
    server, top = gui
    page = server.page()
    (top / "outside" / "x.json").write_text(json.dumps({"model": {"output_name": "leak"}}))
    with pytest.raises(EventError) as err:
        page.call("load-settings", values={"field-runs-load_json_path": str(top / "outside" / "x.json")})
    assert "outside the folders this server reads settings in" in err.value.message


def _bomb(path: Path, mib: int) -> Path:
    """A zip of ``mib`` MiB of zeros: a few hundred KB on disk."""
    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("10_cat/a.png", "w") as f:
        for _ in range(mib):
            f.write(chunk)
    return path


@pytest.mark.slow
def test_zip_bomb_upload_is_refused_before_writing(gui, tmp_path):
    server, _ = gui
    page = server.page()
    bomb = _bomb(tmp_path / "bomb.zip", 256)
    assert bomb.stat().st_size < 2 * 1024**2
    with pytest.raises(EventError) as err:
        page.call("zip-upload", "upload", values={"zip-upload": upload(server, bomb)})
    assert "zip bomb" in err.value.message and "256 MiB" in err.value.message
    datasets = server.cwd / "data" / "datasets"
    assert not datasets.exists() or list(datasets.iterdir()) == []


def test_zip_needing_more_than_the_free_space_is_refused(tmp_path, monkeypatch):
    from lora_gui.ui import files

    small = tmp_path / "ok.zip"
    with zipfile.ZipFile(small, "w") as z:
        z.writestr("10_cat/a.txt", b"x" * 4096)
    usage = files.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda p: usage._replace(free=files.FREE_MARGIN + 1000))
    with pytest.raises(files.BrowseError, match=r"has 0\.50 GiB free.*free some space first"):
        files.extract_dataset_zip(small, tmp_path / "datasets", "ok.zip")
    assert list((tmp_path / "datasets").iterdir()) == []
