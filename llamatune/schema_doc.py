"""`llamatune schema`: every recipe key at every depth, read off the pydantic models in schema.py, in plain words.

Sources are lists of mappings (`data.train`, `data.eval`); their keys are shown once under the list's name
(`data.train.path`), since each source of the list takes the same keys.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llamatune.schema import Recipe


@dataclass(frozen=True)
class KeyDoc:
    """One recipe key as `llamatune schema` shows it."""

    key: str
    kind: str  # the type in plain words
    default: str  # "required" when the key has none
    description: str


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[KeyDoc]:
    """Every key of `model` and of the models inside it, depth first, in declaration order."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = model_in(field.annotation)
        if sub is not None:
            if _is_sequence(field.annotation):  # a list of sections: the list itself is a key too
                rows.append(KeyDoc(key, f"a list of {_section(key)} (or one, or just a path)", _default(field),
                                   field.description or ""))
            rows += describe_keys(sub, f"{key}.")
            continue
        rows.append(KeyDoc(key, plain_type(field.annotation), _default(field), field.description or ""))
    return rows


def show(key: str | None, say) -> None:
    """Prints every key (or `key` and the keys below it): name, type and default, then the description.

    Raises:
        RecipeError: For a key the recipe does not have, with the closest ones.
    """
    from rich.markup import escape

    from llamatune.errors import RecipeError

    try:
        rows = lookup(key) if key else describe_keys()
    except KeyError as exc:
        close = exc.args[0]
        raise RecipeError([f"schema: no recipe key {key!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                               else "; `llamatune schema` lists them all")]) from None
    for row in rows:
        say(f"[bold]{escape(row.key)}[/]  [dim]{escape(row.kind)}; default: {escape(row.default)}[/]\n"
            f"    {escape(row.description)}")


def lookup(key: str) -> list[KeyDoc]:
    """The keys equal to `key` or below it (a section); a list index (`data.train.0.path`) may be given.

    Raises:
        KeyError: With the closest known keys, when there is no such key.
    """
    wanted = ".".join(p for p in key.strip().split(".") if not p.isdigit())
    rows = describe_keys()
    found = [r for r in rows if r.key == wanted or r.key.startswith(wanted + ".")]
    if not found:
        close = difflib.get_close_matches(wanted, [r.key for r in rows], n=3, cutoff=0.5)
        raise KeyError(close)
    return found


def plain_type(annotation: Any) -> str:
    """`Literal['a', 'b'] | None` -> "a | b, or not set"; int -> "integer"; tuple[str, ...] -> "list of text"."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = [plain_type(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(kinds))
        return f"{text}, or not set (null)" if type(None) in args else text
    if origin is Literal:
        return "one of: " + " | ".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {plain_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {plain_type(args[0])} to {plain_type(args[1])}"
    return {str: "text", int: "integer", float: "number", bool: "true | false", Path: "path"}.get(annotation,
                                                                                             getattr(annotation, "__name__", str(annotation)))


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined and field.default_factory else field.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return repr(value)
    return str(value)


def _section(key: str) -> str:
    return "sources" if key.startswith("data.") else "entries"


def _is_sequence(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (tuple, list):
        return True
    return any(_is_sequence(a) for a in typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType))


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds, through Optional, unions and sequences."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            if (found := model_in(arg)) is not None:
                return found
    return None
