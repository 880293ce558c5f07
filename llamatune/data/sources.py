"""Read instruction records from files. Each reader returns (prompt, response) pairs and names the
file and line of anything it cannot use."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from llamatune.errors import RecipeError

_MAX_REPORTED = 5  # enough to see a pattern without flooding the terminal


def read_jsonl(path: Path, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    """Reads a JSON Lines file of objects holding a prompt and a response string.

    Args:
        path: The .jsonl file. Blank lines are skipped.
        prompt_field: Key of the prompt in each object.
        response_field: Key of the response in each object.

    Returns:
        (prompt, response) pairs in file order.

    Raises:
        RecipeError: Naming file:line for malformed JSON, missing keys (with a did-you-mean) or
            non-string/empty values; every bad line up to a handful is reported at once.
    """
    records: list[tuple[str, str]] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            values = [_field(obj, key, role, path, lineno, problems) for key, role in
                      ((prompt_field, "data.prompt_field"), (response_field, "data.response_field"))]
            if None not in values:
                records.append((values[0], values[1]))
            if len(problems) >= _MAX_REPORTED:
                problems.append("... stopping after the first few problems; fix these and run again")
                break
    if problems:
        raise RecipeError(problems, source=str(path))
    if not records:
        raise RecipeError([f"{path}: no records (the file is empty)"], source=str(path))
    return records


def _field(obj: dict, key: str, role: str, path: Path, lineno: int, problems: list[str]) -> str | None:
    if key not in obj:
        close = difflib.get_close_matches(key, [str(k) for k in obj], n=1, cutoff=0.4)
        hint = f"; set {role}: {close[0]}" if close else f"; keys here: {', '.join(map(str, obj))}"
        problems.append(f"{path}:{lineno}: no key {key!r} ({role}){hint}")
        return None
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}:{lineno}: {key!r} must be a non-empty string, got {value!r:.60}")
        return None
    return value
