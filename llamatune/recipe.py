"""Loading a recipe: YAML → overrides → path resolution → the frozen schema in schema.py.

Unknown keys are errors, never silently ignored, and all problems are reported at once with the
dotted key, the YAML line (or "--set") and a suggestion.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llamatune.errors import RecipeError
from llamatune.recipe_paths import resolve_paths
from llamatune.schema import Recipe
from llamatune.schema_doc import model_in
from llamatune.secrets import Redactor

# Names other tools (peft, transformers, axolotl) use for our keys: spelling is not close, intent is.
_KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "sequence_len": "max_length", "max_seq_length": "max_length",
    "model_name_or_path": "path", "base_model": "path", "output_dir": "dir", "mixed_precision": "precision",
    "lr_scheduler_type": "scheduler", "optim": "optimizer",
}


_MAX_NODES = 100_000  # a recipe is a few hundred values; more is an alias bomb, not a recipe

# Keys that no longer exist where people (or older recipes) put them, and what replaced them.
_MOVED = {
    "prompt_field": "fields are now templates on each source: data.train: {path: ..., prompt: '{question}'}",
    "response_field": "fields are now templates on each source: data.train: {path: ..., response: '{answer}'}",
}


def load_recipe(path: str | Path, overrides: list[str] = (), saved: bool = False) -> Recipe:
    """Reads, resolves and validates a recipe file.

    Args:
        path: YAML recipe file.
        overrides: `key.sub=value` strings; values are parsed as YAML. Relative paths in
            overrides are relative to the current directory.
        saved: The file is a run directory's recipe.yaml, written by llamatune (perhaps an older version).

    Returns:
        The validated, frozen recipe with absolute data paths.

    Raises:
        RecipeError: Listing every problem found (unknown keys, wrong types, bad ranges, bad overrides).
    """
    path = Path(path)
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
        lines, duplicates, written = _key_lines(text)
    except yaml.YAMLError as exc:
        hint = "; YAML cannot indent with tabs: use spaces" if "'\\t'" in str(exc) else ""
        raise RecipeError([f"not valid YAML: {exc}{hint}"], source=str(path)) from None
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(path)) from None
    if raw is None:
        raise RecipeError(["the recipe is empty (nothing but blanks or comments); at least data.train is needed, "
                           "e.g. data: {train: train.jsonl} (see recipes/quickstart.yaml)"], source=str(path))
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections (model:, lora:, data:, ...), not "
                           f"{type(raw).__name__} {_short(raw)}"], source=str(path))

    # YAML keeps the last of two equal keys without a word: a silent override, so it is an error here.
    problems: list[str] = [f"{'.'.join(key)} (line {second}): set twice in one mapping, first at line {first}; "
                           "YAML would silently keep the last one: delete one of them" for key, first, second in duplicates]
    if saved:
        _upgrade_saved(raw)
    from_cli: set[tuple] = set()
    lines = _normalize_sources(raw, lines)
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            from_cli.add(key)
            # A value set on the command line has no line in the file: say where it came from instead.
            lines = {k: v for k, v in lines.items() if k[: len(key)] != key} | {key: "--set"}
    # Paths are resolved after overrides, so --set data.root=... applies to the file's sources.
    secrets: list[tuple[str, str]] = []
    resolve_paths(raw, path.parent, from_cli, problems, secrets)
    return _validate(raw, lines, str(path), problems, Redactor.of(secrets), written)


def _upgrade_saved(raw: dict) -> None:
    """llamatune 0.2.0 wrote the default `epochs: 1` beside `max_steps` in every run's recipe.yaml; both set is now
    an error, so such a run's epochs is read as unset (max_steps always decided its length)."""
    train = raw.get("train")
    if isinstance(train, dict) and train.get("max_steps") is not None and train.get("epochs") == 1:
        train["epochs"] = None


def place(recipe: Recipe, problems: list[str]) -> list[str]:
    """Adds the recipe line to problems found after loading that start with a dotted key
    ("data.train.0.path: ..." becomes "data.train.0.path (line 7): ..."), and hides secrets."""
    return _shown(problems, recipe._provenance.lines if recipe._provenance else {}, redactor_of(recipe))


def _shown(problems: list[str], lines: dict[tuple, int | str], redactor: Redactor) -> list[str]:
    """Problems as the user sees them: each bare dotted key given its line, every secret hidden."""
    return [redactor.text(_placed(p, lines)) for p in problems]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_text(path: Path) -> str:
    """The recipe file's text; a missing, unreadable or non-UTF-8 file is a RecipeError naming it."""
    if path.is_dir():
        raise RecipeError([f"{path} is a folder, not a recipe file; give the path of a .yaml file (see recipes/)"])
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path} (check the path, or see recipes/ for examples)"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe file {path}: {exc.strerror}"]) from None
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is not content
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError([f"not valid UTF-8 at byte offset {exc.start} (line {line}); save the recipe as UTF-8"],
                          source=str(path)) from None


def parse_recipe(raw: dict[str, Any], base_dir: Path = Path(".")) -> Recipe:
    """Validates an in-memory recipe mapping (paths relative to base_dir)."""
    problems: list[str] = []
    secrets: list[tuple[str, str]] = []
    raw = _copy(raw)
    resolve_paths(raw, base_dir, set(), problems, secrets)
    return _validate(raw, {}, None, problems, Redactor.of(secrets))


@dataclass(frozen=True)
class Provenance:
    """Where a loaded recipe's values came from; two recipes with equal keys are equal whatever their provenance."""

    lines: dict = dataclass_field(default_factory=dict, compare=False)  # key path -> YAML line or "--set"
    redactor: Redactor = dataclass_field(default_factory=Redactor, compare=False)


def redactor_of(recipe: Recipe) -> Redactor:
    """What to hide when showing or writing anything derived from this recipe (see secrets.py)."""
    return recipe._provenance.redactor if recipe._provenance else Redactor()


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialises a recipe to YAML that load_recipe reads back to an equal recipe (in the same environment:
    values taken from environment variables are written as the ${NAME} they came from)."""
    return yaml.safe_dump(redactor_of(recipe).data(recipe.model_dump(mode="json")), sort_keys=False)


def _validate(raw: dict, lines: dict[tuple, int | str], source: str | None, problems: list[str],
              redactor: Redactor, written: dict[tuple, str] | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, lines, written or {}) for err in exc.errors()]
        recipe = None
    if problems:
        raise RecipeError(_shown(problems, lines, redactor), source=source)
    recipe._provenance = Provenance(lines=lines, redactor=redactor)
    return recipe


def _describe(err: dict, lines: dict[tuple, int | str], written: dict[tuple, str]) -> str:
    """Turns one pydantic error into 'dotted.key (line N): what is wrong (did you mean ...)'."""
    loc = tuple(str(p) for p in err["loc"] if not _is_union_tag(p))
    keys = (err.get("ctx") or {}).get("keys")
    if keys:  # a cross-field check (schema.conflict): point at every key it names, not at the section
        return f"{', '.join(_where(loc + tuple(k.split('.')), lines) for k in keys)}: {err['msg']}"
    where = _where(loc, lines)
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
        text = written.get(loc, "yes")
        shown = f" (written {text}, which YAML reads as the boolean {given}); quote it: \"{text}\""
    return f"{where}: {msg}{shown}"


def _placed(problem: str, lines: dict[tuple, int | str]) -> str:
    """Adds the line to a problem that starts with a bare dotted key ("data.train.0.path: ...")."""
    key, sep, rest = problem.partition(": ")
    if not sep or " " in key or "." not in key:
        return problem
    return f"{_where(tuple(key.split('.')), lines)}: {rest}"


def _where(loc: tuple, lines: dict[tuple, int | str]) -> str:
    dotted = ".".join(loc) or "(top level)"
    line = _nearest_line(loc, lines)
    return dotted if line is None else f"{dotted} ({line})" if line == "--set" else f"{dotted} (line {line})"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member it tried into loc, e.g. ('lora', 'target_modules', "literal['all-linear']").
    return isinstance(part, str) and (part.startswith(("literal[", "tuple[")))


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    cls: Any = Recipe
    for part in loc:
        if part.isdigit():  # an item of a list of sections (data.train.0): its keys are the section's
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        cls = model_in(field.annotation) if field else None
        if cls is None:
            return []
    return list(cls.model_fields)


def _key_lines(text: str) -> tuple[dict[tuple, int | str], list[tuple[tuple, int, int]], dict[tuple, str]]:
    """Maps each dotted key path in the YAML text to its 1-based line number.

    Returns:
        (key path -> line, [(key path, first line, repeated line)] for keys that occur twice in one mapping,
        key path -> scalar value as written).
    """
    out: dict[tuple, int | str] = {}
    duplicates: list[tuple[tuple, int, int]] = []
    written: dict[tuple, str] = {}  # scalars as written (YAML turns `off` into False: the message shows `off`)

    visited = [0]

    def walk(node: Any, prefix: tuple) -> None:
        visited[0] += 1
        if visited[0] > _MAX_NODES:  # aliases can make a few lines expand exponentially ("billion laughs")
            raise RecipeError([f"the recipe expands to more than {_MAX_NODES:,} values (YAML aliases?); write it out plainly"])
        if isinstance(node, yaml.ScalarNode):
            written[prefix] = node.value
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (str(key.value),)
                if here in out:
                    duplicates.append((here, out[here], key.start_mark.line + 1))
                else:
                    out[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):  # list items by index, as pydantic reports them
                out[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    walk(yaml.compose(text), ())
    return out, duplicates, written


def _nearest_line(loc: tuple, lines: dict[tuple, int | str]) -> int | str | None:
    # A missing key has no line of its own: point at its parent section instead.
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


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
