"""Records and the bytes they come from: the record type with its origin, text decoding with the checks that
name a file's real problem (a byte-order mark, a UTF-16 file, a Git LFS pointer, a wrong encoding), and the
collection of every malformed row of a file into one error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import RecipeError
from llamatune.schema import SourceSpec

_UTF8 = {"utf-8", "utf8", "utf_8"}
MAX_LISTED = 10  # malformed rows listed per file; the rest are counted


class SourceKeyError(RecipeError):
    """A problem that a key of the source (records, explode, encoding) must fix: the pipeline prefixes the
    source's dotted key, so the message names e.g. data.train.0.records."""

    def __init__(self, key: str, problem: str):
        super().__init__([problem])
        self.key = key


@dataclass(frozen=True)
class Record:
    """One source record: its fields and a human-readable origin ("file:line", "file[key]")."""

    fields: dict
    origin: str
    document: str  # split unit: exploded questions or text windows of one document share it


def text_of(path: Path, spec: SourceSpec, notes: list[str]) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{path}: cannot be read ({exc.strerror})"]) from None
    if data.startswith(b"version https://git-lfs.github.com/spec/"):
        raise RecipeError([f"{path}:1: a Git LFS pointer, not the data itself ({len(data)} bytes); fetch the real file "
                           "with `git lfs pull` (or download it again)"])
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") and spec.encoding.lower() in _UTF8:
        raise RecipeError([f"{path}:1: starts with a UTF-16 byte-order mark, but the source's encoding is "
                           f"{spec.encoding}; set encoding: utf-16 on the source, or re-save the file as UTF-8"])
    if data.startswith(b"\xef\xbb\xbf") and spec.encoding.lower() in _UTF8:
        # Excel and Notepad write one; left in, it would become part of the first column's name.
        notes.append(f"{path}: starts with a UTF-8 byte-order mark; stripped")
        data = data[3:]
    try:
        return data.decode(spec.encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError([f"{path}:{line}: not valid {spec.encoding} at byte offset {exc.start} (byte "
                           f"{data[exc.start]:#04x}); set the source's encoding: (e.g. latin-1, cp1252) or re-encode the file"]) from None
    except LookupError:
        raise SourceKeyError("encoding", f"unknown encoding {spec.encoding!r} (for {path}); e.g. utf-8, latin-1, "
                             "cp1252, utf-16") from None


def no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (write null, or a number)")


class BadRows:
    """Collects every malformed row of a file, so one error lists them all (the first MAX_LISTED, then a count)."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, line: int, what: str) -> None:
        self.rows.append(f"{self.path}:{line}: {what}")

    def check(self, expected: str) -> None:
        if not self.rows:
            return
        shown = self.rows[:MAX_LISTED]
        more = [f"... and {len(self.rows) - len(shown)} more malformed rows in {self.path}"] if len(self.rows) > len(shown) else []
        raise RecipeError(shown + more + [f"{self.path}: {len(self.rows)} malformed row(s); expected {expected}"])


def short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}")
