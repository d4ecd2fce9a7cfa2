"""Server-side file browsing limited to allowed roots, and safe extraction of uploaded dataset zips.
No gradio here. A browser user never sees a desktop dialog: the server lists its own folders."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

UP = "⬆ .."
FOLDER_MARK = "📁 "
FILE_MARK = "📄 "
MAX_ENTRIES = 500
MAX_ZIP_BYTES = 8 * 1024**3  # uncompressed total; a zip bomb stops here
MAX_ZIP_RATIO = 20  # JPEG/PNG/WebP barely compress; captions do, but they are small
RATIO_CHECK_FROM = 64 * 1024**2  # small zips of captions may compress well
FREE_MARGIN = 512 * 1024**2  # left free on the disk after unpacking
MAX_NAME_BYTES = 255  # one path component (ext4, xfs, btrfs, NTFS)
MAX_PATH_BYTES = 3000  # the whole relative path (PATH_MAX is 4096 with the folder above it)


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


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def settings_file(raw: str, roots: list[Path], default: Path, *, for_writing: bool) -> Path:
    """The settings file a path typed in the page names, if it lies inside the configured roots
    (symbolic links resolved): the page must not write, or read, files anywhere on the server."""
    text = (raw or "").strip()
    path = Path(text).expanduser() if text else default
    path = path if path.is_absolute() else Path.cwd() / path
    if for_writing and path.suffix.lower() != ".json":
        path = path.with_suffix(".json")
    resolved = path.resolve()
    if not within(resolved, roots):
        verb = "saves" if for_writing else "reads"
        raise BrowseError(f"{path} is outside the folders this server {verb} settings in "
                          f"({', '.join(map(str, roots))}): choose a path inside one of them (the GUI's "
                          "--browse-root option adds a folder).")
    if for_writing and resolved.is_dir():
        raise BrowseError(f"{path} is a folder: give a file name ending in .json.")
    return resolved


class ServedFiles:
    """The files the page may show, and the one way to hand them to gradio.

    gradio serves a file returned by a handler only if it lies in the working folder, the temp
    folder or ``allowed_paths``, and anything in ``allowed_paths`` can be fetched by URL by every
    session. So ``allowed_paths`` stays empty and fixed; a file inside the configured roots but
    outside the working folder is linked (or copied) into a private temp folder first. A path that is
    not a file inside the roots (e.g. named by a damaged events file) is never shown. At most
    ``limit`` staged files are kept; the oldest go first."""

    def __init__(self, roots: list[Path], limit: int = 256) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.limit = limit
        self.folder: Path | None = None
        self._staged: dict[tuple, Path] = {}

    def servable(self, path: str | Path) -> str | None:
        try:
            path = Path(path).resolve()
            info = path.stat()
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(info.st_mode) or not within(path, self.roots):
            return None
        if _inside(path, Path.cwd().resolve()) and not path.name.startswith("."):
            return str(path)
        return str(self._stage(path, (str(path), info.st_mtime_ns, info.st_size)))

    def _stage(self, path: Path, key: tuple) -> Path:
        staged = self._staged.get(key)
        if staged is not None and staged.exists():
            return staged
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="lora-gui-served-"))
        target = self.folder / hashlib.sha256(repr(key).encode()).hexdigest()[:20] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(path, target)
        self._staged[key] = target
        while len(self._staged) > self.limit:
            old = self._staged.pop(next(iter(self._staged)))
            shutil.rmtree(old.parent, ignore_errors=True)
        return target

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self._staged = None, {}


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
    Every member is checked first (no absolute paths, no '..', no links, no duplicates or file/folder
    clashes, names the file system can hold, a bounded size and expansion ratio, room on the disk);
    nothing is written unless all pass. A zip whose content sits in one top folder is unwrapped."""
    datasets_dir.mkdir(parents=True, exist_ok=True)
    base = safe_folder_name(name)
    dest = datasets_dir / base
    n = 1
    while dest.exists():
        n += 1
        dest = datasets_dir / f"{base}-{n}"
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BrowseError(f"the upload is not a zip file ({exc}): zip the image folder and upload it "
                          "again") from None
    with archive:
        members = archive.infolist()
        check_zip_size(members, Path(zip_path).stat().st_size, datasets_dir)
        staging = _abs(dest.with_name(f".{dest.name}.partial"))
        plan = plan_zip(members, staging)  # raises before writing anything
        shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted upload
        staging.mkdir(parents=True)
        try:
            _write_members(archive, plan, datasets_dir)
            _unwrap_single_folder(staging)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dest


def check_zip_size(members: list[zipfile.ZipInfo], zip_bytes: int, folder: Path) -> None:
    """Refuse a zip bomb from its directory, before anything is written: more than the cap in all,
    an expansion ratio no image dataset has (images do not compress), or more than the free space."""
    total = sum(m.file_size for m in members)
    gib = 1024**3
    if total > MAX_ZIP_BYTES:
        raise BrowseError(f"the zip would unpack to {total / gib:.1f} GiB, more than the "
                          f"{MAX_ZIP_BYTES / gib:.0f} GiB allowed per upload: split the dataset")
    ratio = total / max(zip_bytes, 1)
    if total > RATIO_CHECK_FROM and ratio > MAX_ZIP_RATIO:
        raise BrowseError(f"the zip would unpack {zip_bytes / 1024**2:.1f} MiB into "
                          f"{total / 1024**2:.0f} MiB ({ratio:.0f} times larger); images barely "
                          f"compress, so more than {MAX_ZIP_RATIO} times is refused as a zip bomb")
    free = shutil.disk_usage(folder).free
    if total + FREE_MARGIN > free:
        raise BrowseError(f"the zip would unpack to {total / gib:.2f} GiB but {folder} has "
                          f"{free / gib:.2f} GiB free (and {FREE_MARGIN / gib:.2f} GiB is kept "
                          "for training): free some space first")


def plan_zip(members: list[zipfile.ZipInfo], dest: Path) -> list[tuple[zipfile.ZipInfo, Path]]:
    """(member, target) for every member to extract, or a BrowseError naming the first bad one."""
    plan: list[tuple[zipfile.ZipInfo, Path]] = []
    files: dict[Path, str] = {}
    folders: set[Path] = set()
    for member in members:
        target = _member_target(member, dest)
        if target is None:
            continue
        rel = target.relative_to(dest)
        _check_name_length(member, rel)
        parents = [p for p in rel.parents if p != Path(".")]
        clash = next((p for p in parents if p in files), None)
        if clash is None and (rel in files if member.is_dir() else rel in folders):
            clash = rel
        if clash is not None:
            raise BrowseError(f"the zip holds both a file and a folder named {clash.as_posix()}: "
                              "rename one and zip again")
        if not member.is_dir():
            if rel in files:
                raise BrowseError(f"the zip holds {member.filename} twice: zip the folder again so "
                                  "each file is in it once")
            files[rel] = member.filename
        else:
            folders.add(rel)
        folders.update(parents)
        plan.append((member, target))
    return plan


def _check_name_length(member: zipfile.ZipInfo, rel: Path) -> None:
    for part in rel.parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise BrowseError(f"the zip member {member.filename[:80]}… has a name longer than "
                              f"{MAX_NAME_BYTES} bytes, which the file system cannot hold: shorten it")
    if len(os.fsencode(str(rel))) > MAX_PATH_BYTES:
        raise BrowseError(f"the zip member {member.filename[:80]}… has a path longer than "
                          f"{MAX_PATH_BYTES} bytes: use shorter folder names")


def _write_members(archive: zipfile.ZipFile, plan: list, folder: Path) -> None:
    for member, target in plan:
        if member.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(member) as src, open(target, "xb") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)
        except zipfile.BadZipFile as exc:  # e.g. "Bad CRC-32": the upload is corrupt
            raise BrowseError(f"the zip member {member.filename} is damaged ({exc}): the upload "
                              "is corrupt, zip the folder again and upload it again") from None
        except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
            raise BrowseError(f"the zip member {member.filename} cannot be unpacked ({exc}): zip "
                              "the folder again without a password, with normal compression") from None
        except OSError as exc:
            raise BrowseError(f"cannot write {member.filename} into {folder}: "
                              f"{exc.strerror or exc}") from None


def _abs(path: Path) -> Path:
    return path.parent.resolve() / path.name


def _unwrap_single_folder(folder: Path) -> None:
    """A zip made by zipping a folder holds one top folder: move its content up one level, unless it
    is an 'N_name' repeats folder (that must stay a sub-folder)."""
    children = [c for c in folder.iterdir()]
    if len(children) == 1 and children[0].is_dir() and not re.match(r"^\d+_", children[0].name):
        inner = children[0].rename(folder / f".unwrap-{os.getpid()}")  # it may hold its own name
        for item in inner.iterdir():
            item.rename(folder / item.name)
        inner.rmdir()
