"""Paths in a recipe: made absolute against the right folder (the recipe's, data.root, or the current directory
for --set values), with `~` and `${VARS}` expanded and every variable's value recorded, so it can be shown as
`${NAME}` everywhere (secrets.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def resolve_paths(raw: dict, recipe_dir: Path, from_cli: set[tuple], problems: list[str],
                   secrets: list[tuple[str, str]]) -> None:
    """Makes every local path absolute: values from --set against the cwd, values from the file
    against the recipe's folder, and relative data sources against data.root when it is set.

    Args:
        secrets: Receives (value, '${NAME}') for every environment variable interpolated.
    """

    def base_for(key: tuple) -> Path:
        return Path.cwd() if any(key[: len(k)] == k for k in from_cli) else recipe_dir

    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        value, base = model["path"], base_for(("model", "path"))
        # Only a value that names a local file/folder is rebased; aliases and hub ids stay as written.
        if value.startswith((".", "/", "~", "$")) or value.endswith(".gguf") or (base / value).exists():
            model["path"] = _resolve_one("model.path", value, base, problems, secrets)
    if isinstance(model, dict) and isinstance(model.get("adapter"), str):
        model["adapter"] = _resolve_one("model.adapter", model["adapter"], base_for(("model", "adapter")), problems, secrets)
    distill = raw.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("teacher"), str):
        value, base = distill["teacher"], base_for(("distill", "teacher"))
        if value.startswith((".", "/", "~", "$")) or value.endswith(".gguf") or (base / value).exists():
            distill["teacher"] = _resolve_one("distill.teacher", value, base, problems, secrets)
    output = raw.get("output")
    if isinstance(output, dict) and isinstance(output.get("dir"), str) and "$" in output["dir"]:
        # Relative to the current directory (as documented), so only variables are expanded here.
        output["dir"] = _expand("output.dir", output["dir"], problems, secrets)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    if isinstance(data.get("root"), str):
        data["root"] = _resolve_one("data.root", data["root"], base_for(("data", "root")), problems, secrets)
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
            source["path"] = _resolve_one(f"data.{split}.{i}.path", source["path"], base, problems, secrets)


def _resolve_one(key: str, value: str, base: Path, problems: list[str], secrets: list[tuple[str, str]]) -> str:
    expanded = Path(_expand(key, value, problems, secrets))
    try:
        return str(expanded if expanded.is_absolute() else (base / expanded).resolve())
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symbolic link loop (Python < 3.13)
        problems.append(f"{key}: {value!r} cannot be resolved ({exc}); is it a symbolic link loop?")
        return value


def _expand(key: str, value: str, problems: list[str], secrets: list[tuple[str, str]]) -> str:
    """Expands ~ and $VAR / ${VAR}; records each variable's value as a secret to show as ${VAR}."""
    names = re.findall(r"\$\{?(\w+)\}?", value)
    missing = [name for name in names if name not in os.environ]
    if missing:
        problems.append(f"{key}: environment variable ${missing[0]} is not set (in {value!r}); export it or write the path out")
        return value
    secrets += [(os.environ[name], "${" + name + "}") for name in names]
    return os.path.expanduser(os.path.expandvars(value))
