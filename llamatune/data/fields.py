"""A small, safe template language over record fields, so any dataset shape maps to prompts by
configuration alone (no code, no eval, no imports from YAML).

    {question}              a top-level field
    {context.contexts}      a nested path; dict keys by name, list items by index (rows.0)
    {paragraphs.text}       a name over a list of objects maps over it (every paragraph's text)
    {labels?}               optional: renders as "" when missing or null
    {contexts|\\n\\n}         lists are joined with the separator after `|` (default: newline);
                            a list of lists (a table) renders one row per line, cells joined by " | "
    {{ and }}               literal braces

Templates are parsed when the recipe is validated, so a malformed one is a recipe error with its key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PATH = re.compile(r"^[A-Za-z0-9_\-. ]+$")


class MissingField(KeyError):
    """A required field is absent from a record; carries the dotted path."""

    def __init__(self, path: str, available: list[str]):
        super().__init__(path)
        self.path, self.available = path, available


@dataclass(frozen=True)
class _Slot:
    path: tuple[str, ...]
    optional: bool
    sep: str


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and field slots, in order."""

    source: str
    parts: tuple[str | _Slot, ...]

    @property
    def fields(self) -> list[str]:
        """Dotted paths this template reads."""
        return [".".join(p.path) for p in self.parts if isinstance(p, _Slot)]

    def render(self, record: dict) -> str:
        """Fills the template from a record.

        Raises:
            MissingField: If a non-optional field is missing or null.
        """
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = lookup(record, part.path)
            if value is None:
                if part.optional:
                    continue
                raise MissingField(".".join(part.path), _keys(record))
            out.append(to_text(value, part.sep))
        return "".join(out)


def parse_template(text: str) -> Template:
    """Parses a template string.

    Raises:
        ValueError: For an unmatched brace or an empty/invalid field path (message says where).
    """
    parts: list[str | _Slot] = []
    pos = 0
    for m in _FIELD.finditer(text):
        parts.append(text[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif m.group(1) is None:
            raise ValueError(f"unmatched {token!r} at character {m.start()} of {text!r}; write {token * 2} for a literal brace")
        else:
            parts.append(_slot(m.group(1), text))
    parts.append(text[pos:])
    return Template(source=text, parts=tuple(p for p in parts if p != ""))


def _slot(inner: str, text: str) -> _Slot:
    path_text, bar, sep = inner.partition("|")
    optional = path_text.endswith("?")
    path_text = path_text.removesuffix("?").strip()
    if not path_text or not _PATH.match(path_text) or "" in path_text.split("."):
        raise ValueError(f"{{{inner}}} in {text!r} is not a field path like {{question}} or {{context.contexts}}")
    # Separators are written in YAML, where a backslash-n is easier than a real newline.
    sep = sep.replace("\\n", "\n").replace("\\t", "\t") if bar else "\n"
    return _Slot(path=tuple(path_text.split(".")), optional=optional, sep=sep)


def lookup(record: Any, path: tuple[str, ...]) -> Any:
    """Follows a dotted path through dicts (by key) and lists (by index); None when absent.

    A name applied to a list of objects maps over it: `paragraphs.text` is the list of every
    paragraph's text (items without it are skipped).
    """
    value = record
    for n, key in enumerate(path):
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.lstrip("-").isdigit():
            value = value[int(key)] if -len(value) <= int(key) < len(value) else None
        elif isinstance(value, list):
            found = [lookup(item, path[n:]) for item in value if isinstance(item, dict)]
            found = [f for f in found if f is not None]
            return found or None
        else:
            return None
    return value


def to_text(value: Any, sep: str = "\n") -> str:
    """Renders a field value: strings as-is, numbers via str, lists joined, tables row by row."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        if value and all(isinstance(row, list) for row in value):
            return "\n".join(" | ".join(to_text(c, " ") for c in row) for row in value)
        return sep.join(to_text(v, sep) for v in value if v is not None)
    return json.dumps(value, ensure_ascii=False)


def _keys(record: Any) -> list[str]:
    return [str(k) for k in record] if isinstance(record, dict) else []
