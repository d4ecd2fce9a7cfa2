"""Server-side file browsing limited to allowed roots, and safe extraction of uploaded dataset zips.
No gradio here. A browser user never sees a desktop dialog: the server lists its own folders."""

from __future__ import annotations

import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

UP = "⬆ .."
FOLDER_MARK = "📁 "
FILE_MARK = "📄 "
MAX_ENTRIES = 500
MAX_ZIP_BYTES = 8 * 1024**3  # uncompressed total; a zip bomb stops here


class BrowseError(ValueError):
    """A path the browser will not show, as a sentence."""


def within(path: Path, roots: list[Path]) -> bool:
    path = path.resolve()
    return any(path == r or r in path.parents for r in roots)


def resolve_start(text: str, roots: list[Path]) -> Path:
    """The folder to show for what is typed in a path field: the field's folder (or its parent when
    it names a file or does not exist yet), else the first root."""
    if text:
        path = Path(text).expanduser()
        path = (Path.cwd() / path) if not path.is_absolute() else path
        for candidate in (path, *path.parents):
            if candidate.is_dir() and within(candidate, roots):
                return candidate.resolve()
    return roots[0]


@dataclass
class Listing:
    folder: Path
    entries: list[str]  # UP, "📁 name", "📄 name"
    truncated: bool = False


def list_folder(folder: Path, roots: list[Path], want: str = "folder") -> Listing:
    """The entries of ``folder``: sub-folders always, files too when ``want == "file"``."""
    folder = folder.resolve()
    if not within(folder, roots):
        raise BrowseError(f"{folder} is outside the folders this server lets you browse "
                          f"({', '.join(map(str, roots))}); start the GUI with --browse-root to add one.")
    if not folder.is_dir():
        raise BrowseError(f"{folder} is not a folder.")
    dirs, files = [], []
    try:
        children = sorted(folder.iterdir(), key=lambda p: p.name.lower())
    except OSError as exc:
        raise BrowseError(f"cannot list {folder}: {exc.strerror or exc}") from None
    for child in children:
        if child.name.startswith("."):
            continue
        try:
            is_dir = child.is_dir()
        except OSError:
            continue
        if is_dir:
            dirs.append(FOLDER_MARK + child.name)
        elif want == "file":
            files.append(FILE_MARK + child.name)
    entries = dirs + files
    up = [UP] if folder not in roots and within(folder.parent, roots) else []
    return Listing(folder, up + entries[:MAX_ENTRIES], len(entries) > MAX_ENTRIES)


def enter(folder: Path, entry: str, roots: list[Path]) -> tuple[Path, bool]:
    """(path chosen by clicking ``entry``, whether it is a folder)."""
    if entry == UP:
        target = folder.parent
    elif entry.startswith(FOLDER_MARK):
        target = folder / entry[len(FOLDER_MARK):]
    elif entry.startswith(FILE_MARK):
        target = folder / entry[len(FILE_MARK):]
    else:
        raise BrowseError(f"{entry!r} is not an entry of {folder}.")
    target = target.resolve()
    if not within(target, roots):
        raise BrowseError(f"{target} is outside the folders this server lets you browse.")
    return target, target.is_dir()


def display_path(path: Path, base: Path | None = None) -> str:
    """A path relative to the working folder when it is inside it (what presets use)."""
    base = (base or Path.cwd()).resolve()
    path = path.resolve()
    try:
        return str(path.relative_to(base)) or "."
    except ValueError:
        return str(path)


# --- uploaded datasets ------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_folder_name(name: str) -> str:
    name = _SAFE_NAME.sub("_", Path(name).stem).strip("._") or "dataset"
    return name[:80]


def _member_target(member: zipfile.ZipInfo, dest: Path) -> Path | None:
    """Where a zip member goes inside ``dest``; None to skip it. Raises on an unsafe name."""
    name = member.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BrowseError(f"the zip holds an absolute path ({member.filename}): it was not extracted")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise BrowseError(f"the zip holds a path that leaves its folder ({member.filename}): "
                          "it was not extracted")
    if not parts or parts[0] == "__MACOSX" or any(p.startswith("._") for p in parts):
        return None
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BrowseError(f"the zip holds a symbolic link ({member.filename}): it was not extracted")
    target = dest.joinpath(*parts)
    if dest not in target.parents:
        raise BrowseError(f"the zip member {member.filename} would be written outside its folder")
    return target


def extract_dataset_zip(zip_path: str | Path, datasets_dir: Path, name: str) -> Path:
    """Extract an uploaded zip of images and captions into a new folder under ``datasets_dir``.
    Every member is checked first (no absolute paths, no '..', no links, bounded size); nothing is
    written unless all are safe. A zip whose content sits in one top folder is unwrapped."""
    datasets_dir.mkdir(parents=True, exist_ok=True)
    base = safe_folder_name(name)
    dest = datasets_dir / base
    n = 1
    while dest.exists():
        n += 1
        dest = datasets_dir / f"{base}-{n}"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BrowseError(f"the upload is not a zip file ({exc}): zip the image folder and upload it "
                          "again") from None
    with archive:
        members = archive.infolist()
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_BYTES:
            raise BrowseError(f"the zip would unpack to {total / 1024**3:.1f} GiB, more than the "
                              f"{MAX_ZIP_BYTES / 1024**3:.0f} GiB allowed")
        staging = _abs(dest.with_name(f".{dest.name}.partial"))
        plan = [(m, _member_target(m, staging)) for m in members]  # raises before writing anything
        shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted upload
        staging.mkdir(parents=True)
        try:
            for member, target in plan:
                if target is None:
                    continue
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            _unwrap_single_folder(staging)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def _abs(path: Path) -> Path:
    return path.parent.resolve() / path.name


def _unwrap_single_folder(folder: Path) -> None:
    """A zip made by zipping a folder holds one top folder: move its content up one level, unless it
    is an 'N_name' repeats folder (that must stay a sub-folder)."""
    children = [c for c in folder.iterdir()]
    if len(children) == 1 and children[0].is_dir() and not re.match(r"^\d+_", children[0].name):
        inner = children[0]
        for item in inner.iterdir():
            item.rename(folder / item.name)
        inner.rmdir()
