"""Loading a recipe: YAML → overrides → path resolution → the frozen schema in schema.py.

Unknown keys are errors, never silently ignored, and all problems are reported at once with the
dotted key, the YAML line (or "--set") and a suggestion.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from llamatune.errors import RecipeError
from llamatune.schema import Recipe

# Names other tools (peft, transformers, axolotl) use for our keys: spelling is not close, intent is.
_KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "sequence_len": "max_length", "max_seq_length": "max_length",
    "model_name_or_path": "path", "base_model": "path", "output_dir": "dir", "mixed_precision": "precision",
    "lr_scheduler_type": "scheduler", "optim": "optimizer",
}


# Keys that no longer exist where people (or older recipes) put them, and what replaced them.
_MOVED = {
    "prompt_field": "fields are now templates on each source: data.train: {path: ..., prompt: '{question}'}",
    "response_field": "fields are now templates on each source: data.train: {path: ..., response: '{answer}'}",
}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Reads, resolves and validates a recipe file.

    Args:
        path: YAML recipe file.
        overrides: `key.sub=value` strings; values are parsed as YAML. Relative paths in
            overrides are relative to the current directory.

    Returns:
        The validated, frozen recipe with absolute data paths.

    Raises:
        RecipeError: Listing every problem found (unknown keys, wrong types, bad ranges, bad overrides).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path} (check the path, or see recipes/ for examples)"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text at byte {exc.start}"
        raise RecipeError([f"cannot read the recipe: {why}"], source=str(path)) from None
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["the top level must be a mapping of sections (model:, lora:, data:, ...)"], source=str(path))

    problems: list[str] = []
    from_cli: set[tuple] = set()
    lines = _normalize_sources(raw, lines)
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            from_cli.add(key)
            # A value set on the command line has no line in the file: say where it came from instead.
            lines = {k: v for k, v in lines.items() if k[: len(key)] != key} | {key: "--set"}
    # Paths are resolved after overrides, so --set data.root=... applies to the file's sources.
    _resolve_paths(raw, path.parent, from_cli, problems)
    return _validate(raw, lines, str(path), problems)


def parse_recipe(raw: dict[str, Any], base_dir: Path = Path(".")) -> Recipe:
    """Validates an in-memory recipe mapping (paths relative to base_dir)."""
    problems: list[str] = []
    raw = _copy(raw)
    _resolve_paths(raw, base_dir, set(), problems)
    return _validate(raw, {}, None, problems)


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialises a recipe to YAML that load_recipe reads back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Lists (dotted key, type, default, description) for every leaf key of the schema."""
    rows = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is not None:
            rows += describe_keys(sub, f"{prefix}{name}.")
            continue
        ann = field.annotation
        type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace("pathlib.", "")
        default = "required" if field.is_required() else repr(field.default)
        rows.append((f"{prefix}{name}", type_name, default, field.description or ""))
    return rows


def _validate(raw: dict, lines: dict[tuple, int | str], source: str | None, problems: list[str]) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, lines) for err in exc.errors()]
        recipe = None
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def _describe(err: dict, lines: dict[tuple, int | str]) -> str:
    """Turns one pydantic error into 'dotted.key (line N): what is wrong (did you mean ...)'."""
    loc = tuple(str(p) for p in err["loc"] if not _is_union_tag(p))
    dotted = ".".join(loc) or "(top level)"
    line = _nearest_line(loc, lines)
    where = dotted if line is None else f"{dotted} ({line})" if line == "--set" else f"{dotted} (line {line})"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        if loc[-1] in _MOVED:
            return f"{where}: unknown key ({_MOVED[loc[-1]]})"
        alias = _KNOWN_ALIASES.get(loc[-1])
        close = [alias] if alias in allowed else difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_type" and isinstance(given, bool):
        shown += "; YAML reads yes/no/on/off/true/false as booleans: quote it, e.g. \"yes\""
    return f"{where}: {msg}{shown}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member it tried into loc, e.g. ('lora', 'target_modules', "literal['all-linear']").
    return isinstance(part, str) and (part.startswith(("literal[", "tuple[")))


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        cls = _model_in(field.annotation) if field else None
        if cls is None:
            return []
    return list(cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


def _key_lines(text: str) -> dict[tuple, int | str]:
    """Maps each dotted key path in the YAML text to its 1-based line number."""
    out: dict[tuple, int | str] = {}

    def walk(node: Any, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (str(key.value),)
                out[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):  # list items by index, as pydantic reports them
                out[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    walk(yaml.compose(text), ())
    return out


def _nearest_line(loc: tuple, lines: dict[tuple, int | str]) -> int | str | None:
    # A missing key has no line of its own: point at its parent section instead.
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _resolve_paths(raw: dict, recipe_dir: Path, from_cli: set[tuple], problems: list[str]) -> None:
    """Makes every local path absolute: values from --set against the cwd, values from the file
    against the recipe's folder, and relative data sources against data.root when it is set."""

    def base_for(key: tuple) -> Path:
        return Path.cwd() if any(key[: len(k)] == k for k in from_cli) else recipe_dir

    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        value, base = model["path"], base_for(("model", "path"))
        # Only a value that names a local file/folder is rebased; aliases and hub ids stay as written.
        if value.startswith((".", "/", "~", "$")) or value.endswith(".gguf") or (base / value).exists():
            model["path"] = _resolve_one("model.path", value, base, problems)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    if isinstance(data.get("root"), str):
        data["root"] = _resolve_one("data.root", data["root"], base_for(("data", "root")), problems)
    for split in ("train", "eval"):
        value = data.get(split)
        if isinstance(value, (str, dict)):
            value = data[split] = [value]
        if not isinstance(value, list):
            continue
        for i, source in enumerate(value):
            key = ("data", split, str(i))
            if isinstance(source, str):
                source = value[i] = {"path": source}
            if not isinstance(source, dict) or not isinstance(source.get("path"), str):
                continue
            from_file = base_for(key) == recipe_dir and base_for(key + ("path",)) == recipe_dir
            base = Path(data["root"]) if from_file and isinstance(data.get("root"), str) else base_for(key + ("path",))
            if source.get("reader") == "hub" and not (base / source["path"]).exists():
                continue  # a dataset id, not a local folder
            source["path"] = _resolve_one(f"data.{split}.{i}.path", source["path"], base, problems)


def _resolve_one(key: str, value: str, base: Path, problems: list[str]) -> str:
    missing = [name for name in re.findall(r"\$\{?(\w+)\}?", value) if name not in os.environ]
    if missing:
        problems.append(f"{key}: environment variable ${missing[0]} is not set (in {value!r}); export it or write the path out")
        return value
    expanded = Path(os.path.expanduser(os.path.expandvars(value)))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


def _apply_override(raw: dict, item: str, problems: list[str]) -> tuple[str, ...] | None:
    """Sets one `key.sub=value` (list items by index: data.train.0.path) in the raw mapping.

    Returns:
        The key path, or None if the override is malformed (a problem is recorded).
    """
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        problems.append(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
        return None
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text  # not YAML: take it as a plain string, validation decides
    parts = key.strip().split(".")
    node: Any = raw
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            problems.append(f"--set {item!r}: '{'.'.join(parts[:n])}' is a value, not a section"
                            if not isinstance(node, list) else f"--set {item!r}: no item {part} in '{'.'.join(parts[:n])}'")
            return None
    return tuple(parts)


def _normalize_sources(raw: dict, lines: dict[tuple, int | str]) -> dict[tuple, int | str]:
    """Turns the shorthands `train: path` and `train: {path: ...}` into one-item lists, so overrides
    and error messages address every source the same way (data.train.0.path).

    Returns:
        The key → line map with the shorthand's keys moved under index 0.
    """
    data = raw.get("data")
    for split in ("train", "eval"):
        if isinstance(data, dict) and isinstance(data.get(split), (str, dict)):
            data[split] = [data[split]]
            head = ("data", split)
            lines = {(head + ("0",) + k[2:] if k[:2] == head and len(k) > 2 else k): v for k, v in lines.items()}
    return lines


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj
