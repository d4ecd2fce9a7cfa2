"""Caption editing: one caption in place, bulk tag operations over a set of images, and an undo of
the last change.

Every write goes through :mod:`lora_gui.atomic` to the caption file next to the image
(``<stem><caption_extension>``). Only the caption line changes (the first non-empty line, the one
the scan and the trainer read); a BOM, the line ending and any further lines are kept, and a file
whose tags do not change is not written at all, so an operation touches exactly the files it
changes. Before the first write the previous bytes of every file it will change are saved in an
undo journal (a hidden JSON file), so :meth:`CaptionEditor.undo` restores them byte for byte, even
after a crash halfway through a bulk operation.

A caption file that is not UTF-8 is never rewritten: the operation stops before any write with a
sentence that names the file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_gui.atomic import write_bytes, write_json
from lora_gui.dataset.captions import split_tags
from lora_gui.dataset.scan import DatasetError

UNDO_FILE = ".lora_gui_caption_undo.json"

TagOp = Callable[[list[str]], list[str]]


class CaptionError(DatasetError):
    """A caption file that cannot be edited (not UTF-8, unreadable), as one sentence."""


# --- reading and writing one caption file ---------------------------------------------------------


def caption_path(image: str | Path, extension: str = ".txt") -> Path:
    """The caption file of ``image``; a symlinked caption is edited where it really lives."""
    path = Path(image)
    path = path.with_name(path.stem + extension)
    return path.resolve() if path.is_symlink() else path


def decode_caption(data: bytes, path: Path) -> str:
    """The text of a caption file, or :class:`CaptionError` naming the file when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionError(
            f"The caption file {path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8 in a "
            "text editor (or delete it and caption the image again); it was not changed."
        ) from None


@dataclass(frozen=True)
class CaptionText:
    """A caption file split around its caption line (the first non-empty one, as the scan reads it):
    ``head`` (BOM, blank lines, indentation) + ``line`` + ``tail`` (line ending, further lines)."""

    head: str
    line: str
    tail: str

    @classmethod
    def parse(cls, text: str) -> CaptionText:
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        body = text[len(bom):]
        offset = 0
        for raw in body.splitlines(keepends=True):
            if raw.strip():
                start = offset + len(raw) - len(raw.lstrip())
                end = offset + len(raw.rstrip())
                return cls(bom + body[:start], body[start:end], body[end:])
            offset += len(raw)
        return cls(bom, "", "")

    def with_line(self, line: str) -> str:
        # A file that had a caption keeps its ending (even none); a new caption line ends in "\n".
        return f"{self.head}{line}{self.tail if self.line else chr(10)}"


def read_caption(path: Path) -> str | None:
    """The caption line of a caption file (None when there is no file); CaptionError when not UTF-8."""
    if not path.is_file():
        return None
    return CaptionText.parse(decode_caption(path.read_bytes(), path)).line


def _new_bytes(path: Path, new_line: str) -> bytes | None:
    """The new content of ``path`` with ``new_line`` as its caption line; None when nothing changes."""
    if not path.is_file():
        return (new_line + "\n").encode("utf-8") if new_line else None
    parsed = CaptionText.parse(decode_caption(path.read_bytes(), path))
    if parsed.line == new_line:
        return None
    return parsed.with_line(new_line).encode("utf-8")


# --- tag operations (pure functions on a tag list) ------------------------------------------------


def _normal(tag: str) -> str:
    return " ".join(tag.split())


def add_tag(tag: str, front: bool = False) -> TagOp:
    tag = _normal(tag)
    return lambda tags: tags if tag in tags else ([tag, *tags] if front else [*tags, tag])


def remove_tag(tag: str) -> TagOp:
    tag = _normal(tag)
    return lambda tags: [t for t in tags if t != tag]


def replace_tag(old: str, new: str) -> TagOp:
    """``old`` becomes ``new`` where it stands; a ``new`` already present is not repeated."""
    old, new = _normal(old), _normal(new)

    def op(tags: list[str]) -> list[str]:
        if old not in tags:
            return tags
        return dedupe_tags([new if t == old else t for t in tags])

    return op


def triggers_first(trigger_words: str, add_missing: bool = True) -> TagOp:
    """Trigger words first, in their order; missing ones are added when ``add_missing``."""
    triggers = [_normal(t) for t in split_tags(trigger_words)]

    def op(tags: list[str]) -> list[str]:
        first = [t for t in triggers if add_missing or t in tags]
        return first + [t for t in tags if t not in first]

    return op


def dedupe_tags(tags: list[str]) -> list[str]:
    """The first occurrence of each tag, in order."""
    return list(dict.fromkeys(tags))


def sort_tags(keep: int = 0) -> TagOp:
    """Alphabetical (case-insensitive), the first ``keep`` tags left in place (keep_tokens)."""
    return lambda tags: tags[:keep] + sorted(tags[keep:], key=lambda t: (t.lower(), t))


def apply_ops(caption: str, ops: Sequence[TagOp]) -> str:
    tags = [_normal(t) for t in split_tags(caption)]
    for op in ops:
        tags = op(tags)
    return ", ".join(tags)


# --- the editor: writes with an undo journal ------------------------------------------------------


@dataclass(frozen=True)
class EditResult:
    """What an edit did: the caption files written (created or changed), and a sentence."""

    changed: list[Path]
    message: str


def _encode(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


class CaptionEditor:
    """Edits the captions of images whose caption files end in ``extension``.

    ``undo_file`` keeps the previous bytes of the files of the last change (one level of undo);
    it defaults to a hidden file in ``root`` (the image folder), where the scan never looks.
    """

    def __init__(self, root: str | Path, extension: str = ".txt", undo_file: str | Path | None = None):
        self.root = Path(root)
        self.extension = extension if extension.startswith(".") else "." + extension
        self.undo_file = Path(undo_file) if undo_file else self.root / UNDO_FILE

    def caption_of(self, image: str | Path) -> str | None:
        return read_caption(caption_path(image, self.extension))

    def set_caption(self, image: str | Path, caption: str) -> EditResult:
        """Write ``caption`` (one line) as the caption of ``image``."""
        line = " ".join(caption.split())
        return self._write({caption_path(image, self.extension): line}, f"the caption of {Path(image).name}")

    def bulk(self, images: Iterable[str | Path], ops: Sequence[TagOp], what: str = "a bulk edit") -> EditResult:
        """Apply tag operations to the captions of ``images``; images without a caption file start
        from an empty caption (a file is created only when tags are added)."""
        plan: dict[Path, str] = {}
        for image in images:
            path = caption_path(image, self.extension)
            plan[path] = apply_ops(read_caption(path) or "", ops)
        return self._write(plan, what)

    def set_captions(self, captions: dict[Path, str], what: str, *, extend: bool = False) -> EditResult:
        """Write several captions ({image: caption}) as one change. ``extend``: add to the last
        change's undo (a long job writing in parts stays one undo)."""
        plan = {caption_path(image, self.extension): " ".join(text.split())
                for image, text in captions.items()}
        return self._write(plan, what, extend=extend)

    def _write(self, plan: dict[Path, str], what: str, extend: bool = False) -> EditResult:
        # Every new content is computed (and every file decoded) before the first write, so a file
        # that is not UTF-8 stops the whole operation with nothing changed.
        new = {path: data for path, line in plan.items() if (data := _new_bytes(path, line)) is not None}
        if not new:
            return EditResult([], f"Nothing changed: {what} leaves every caption as it was.")
        before = {str(p): _encode(p.read_bytes() if p.is_file() else None) for p in new}
        if extend and self.undo_file.is_file():  # the first saved bytes of a file win
            before = {**before, **json.loads(self.undo_file.read_text(encoding="utf-8"))["files"]}
        write_json(self.undo_file, {"what": what, "files": before})
        for path, data in new.items():
            write_bytes(path, data)
        return EditResult(sorted(new), f"Changed {len(new)} caption file(s): {what}.")

    def can_undo(self) -> str | None:
        """What the last change was (None: nothing to undo)."""
        if not self.undo_file.is_file():
            return None
        return str(json.loads(self.undo_file.read_text(encoding="utf-8")).get("what", "the last change"))

    def undo(self) -> EditResult:
        """Restore the files of the last change byte for byte (a created file is removed)."""
        if not self.undo_file.is_file():
            return EditResult([], "Nothing to undo: no caption was changed since the last undo.")
        journal = json.loads(self.undo_file.read_text(encoding="utf-8"))
        restored = []
        for name, data in journal["files"].items():
            path, old = Path(name), _decode(data)
            if old is None:
                path.unlink(missing_ok=True)
            else:
                write_bytes(path, old)
            restored.append(path)
        self.undo_file.unlink()
        return EditResult(sorted(restored), f"Undid {journal.get('what', 'the last change')} "
                                            f"({len(restored)} file(s) restored).")
