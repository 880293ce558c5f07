"""Opening what earlier commands wrote (a run's adapter and tokenizer, a model folder, a GGUF file) so that a
damaged or missing file is reported by its name with a way to get a good copy, never as a library traceback.

Libraries fail on a truncated safetensors file or a config that is not JSON with errors that seldom say which
file of a folder is at fault. `opened` runs the library's load and, only when it fails with an error a damaged
file can cause, looks through the folder for that file (headers only: a few reads, no tensor data). When it
finds none, the original error is re-raised with its traceback: then it is a bug, not a damaged file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal, TypeVar

from llamatune.errors import LlamatuneError, RecipeError

T = TypeVar("T")
Kind = Literal["model", "tokenizer", "adapter"]

FIX_RUN = "copy the whole run directory again from where it was trained, or train it again"
FIX_GGUF = "copy it again, or export it again (llamatune export MODEL_FOLDER)"


def fix_for_model(folder: Path) -> str:
    """How to get a good copy of a model folder: llamatune's own converted cache is simply made again."""
    from llamatune.catalog import is_cached  # here: catalog imports this module

    if is_cached(folder):
        return f"it is llamatune's converted copy of a model: delete {folder} and it is fetched and converted again"
    return "if it came from llamatune merge, merge again (llamatune merge RUN --out NEW_DIR); otherwise copy the folder again"


def opened(load: Callable[[], T], folder: Path, kind: Kind, fix: str) -> T:
    """Returns load(); if it fails because a file of `folder` is missing or damaged, raises a LlamatuneError
    naming that file and `fix` instead.

    Args:
        load: The library call that reads `folder` (from_pretrained and the like).
        kind: What `folder` holds, which says the files to examine.
        fix: How the user gets a good copy, appended to the message.
    """
    from safetensors import SafetensorError

    try:
        return load()
    except (OSError, ValueError, SafetensorError) as exc:  # what missing, truncated or non-JSON files raise
        problem = PROBLEMS[kind](Path(folder))
        if problem is None:
            raise
        raise LlamatuneError(f"{problem}; {fix}") from exc
    except Exception as exc:
        # The tokenizers library (Rust) raises a bare Exception for a tokenizer.json that is JSON but not a
        # tokenizer; nothing else in a tokenizer load does.
        if kind != "tokenizer" or type(exc) is not Exception:
            raise
        raise LlamatuneError(f"{Path(folder) / 'tokenizer.json'} is JSON but not a tokenizer the tokenizers library "
                             f"can read ({exc}); {fix}") from None


def is_run(source: Path) -> bool:
    """True for a run directory (recipe.yaml and the adapter), which export merges on the fly."""
    return (source / "recipe.yaml").is_file() and (source / "adapter").is_dir()


def run_dir_problem(run: Path) -> str | None:
    """What keeps `run` from being a complete run directory (recipe.yaml, adapter/, tokenizer/), or None."""
    for name, folder in (("recipe.yaml", False), ("adapter", True), ("tokenizer", True)):
        path = run / name
        if not path.exists():
            return f"{path} is missing, so {run} is not a complete run directory (recipe.yaml, adapter/, tokenizer/)"
        if path.is_dir() != folder:
            return f"{path} is a {'file' if folder else 'folder'}, where a run directory has a {'folder' if folder else 'file'}"
    return None


def model_problem(folder: Path) -> str | None:
    """The first missing or damaged file of a transformers model folder (config, index, weights), or None."""
    problem = _folder_problem(folder) or _json_problem(folder / "config.json")
    if problem:
        return problem
    index = folder / "model.safetensors.index.json"
    if index.exists():
        problem = _json_problem(index)
        if problem:
            return problem
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            return f"{index} has no weight_map: it is damaged"
        for shard in sorted(set(map(str, weight_map.values()))):
            problem = safetensors_problem(folder / shard)
            if problem:
                return problem
    elif (folder / "model.safetensors").exists():
        problem = safetensors_problem(folder / "model.safetensors")
        if problem:
            return problem
    else:
        return f"{folder / 'model.safetensors'} is missing (and there is no model.safetensors.index.json)"
    return _json_problem(folder / "generation_config.json", required=False)


def tokenizer_problem(folder: Path) -> str | None:
    """The first missing or damaged tokenizer file in `folder`, or None."""
    problem = _folder_problem(folder)
    if problem:
        return problem
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return f"{folder / 'tokenizer.json'} is missing"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json"):
        problem = _json_problem(folder / name, required=False)
        if problem:
            return problem
    return _text_problem(folder / "chat_template.jinja", required=False)


def adapter_problem(folder: Path) -> str | None:
    """The first missing or damaged file of a PEFT adapter folder, or None."""
    return (_folder_problem(folder) or _json_problem(folder / "adapter_config.json")
            or safetensors_problem(folder / "adapter_model.safetensors"))


PROBLEMS: dict[str, Callable[[Path], str | None]] = {
    "model": model_problem, "tokenizer": tokenizer_problem, "adapter": adapter_problem,
}


def safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole: its 8-byte header length, JSON header and the data it describes
    must all fit in the file (a copy cut short fails here, not halfway through loading)."""
    problem = _file_problem(path)
    if problem:
        return problem
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if 8 + n > size:
            return f"{path} is {size:,} bytes, shorter than its own header says: it is truncated, or not a safetensors file"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path} has no valid safetensors header: it is damaged, or not a safetensors file"
    if 8 + n + end != size:
        return f"{path} is {size:,} bytes but its header describes {8 + n + end:,}: the file is truncated or damaged"
    return None


def gguf_problem(path: Path, error: Exception) -> str:
    """What is wrong with a GGUF file the reader failed on (`error`), for the message."""
    problem = _file_problem(path)
    if problem:
        return problem
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
    return f"{path} is truncated or damaged (the GGUF reader says: {error})"


def check_output(path: Path, flag: str, existing_folder_ok: bool = False) -> None:
    """Fails early, before any model is loaded, when `path` cannot be written.

    Args:
        path: The file or folder a command is about to create.
        flag: The option that named it (--out), for the message.
        existing_folder_ok: An existing folder is written into (eval's reports); otherwise nothing is overwritten.

    Raises:
        LlamatuneError: If `path` exists (or is a file where a folder is wanted), sits below a file, or its
            nearest existing folder is not writable.
    """
    if path.exists() and existing_folder_ok and not path.is_dir():
        raise LlamatuneError(f"{flag} {path} is a file, where a folder is expected; remove it or choose another {flag}")
    if path.exists() and not existing_folder_ok:
        raise LlamatuneError(f"{path} already exists; remove it or choose another {flag} (llamatune never overwrites)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LlamatuneError(f"{flag} {path}: {parent} is a file, so nothing can be created below it; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlamatuneError(f"{flag} {path}: {parent} is not writable (permission denied); choose another {flag}")


def target_kind(path: Path) -> Literal["run", "checkpoint", "folder", "gguf"]:
    """What `llamatune eval` / `chat` was pointed at, or a RecipeError saying what it is instead.

    Raises:
        LlamatuneError: For a run directory that lacks one of its parts, or a checkpoint whose run has no recipe.
    """
    if path.is_dir() and path.parent.name == "checkpoints" and (path / "manifest.json").exists():
        if not (path.parent.parent / "recipe.yaml").is_file():
            raise LlamatuneError(f"{path} is a checkpoint, but its run directory {path.parent.parent} has no recipe.yaml "
                                 "(the base model and LoRA settings the checkpoint needs); evaluate it inside its run")
        return "checkpoint"
    if path.is_dir():
        if (path / "recipe.yaml").exists() or (path / "adapter").exists():
            problem = run_dir_problem(path)
            if problem:
                raise LlamatuneError(f"{problem}; {FIX_RUN}")
            return "run"
        if (path / "config.json").exists():
            return "folder"
        what = "a folder, not a .gguf file" if path.suffix == ".gguf" else "a folder without recipe.yaml + adapter/ or config.json"
    elif path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        what = "a file, not a .gguf file"
    else:
        what = "not there"
    raise RecipeError([f"{path} is {what}; give a run directory (recipe.yaml + adapter/), a checkpoint of one "
                       "(RUN/checkpoints/step-N), a model folder (config.json) or a .gguf file"])


def _folder_problem(folder: Path) -> str | None:
    if not folder.exists():
        return f"{folder} is missing"
    return None if folder.is_dir() else f"{folder} is a file, where a folder is expected"


def _file_problem(path: Path, required: bool = True) -> str | None:
    if not path.exists():
        return f"{path} is missing" if required else None
    if path.is_dir():
        return f"{path} is a folder, where a file is expected"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror}); fix its permissions"
    return f"{path} is empty (0 bytes)" if path.stat().st_size == 0 else None


def _text_problem(path: Path, required: bool = True) -> str | None:
    problem = _file_problem(path, required)
    if problem or not path.exists():
        return problem
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text (byte {exc.start}): it is damaged"
    return None


def _json_problem(path: Path, required: bool = True) -> str | None:
    problem = _text_problem(path, required)
    if problem or not path.exists():
        return problem
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return f"{path} is not valid JSON ({exc}): it is damaged or truncated"
    return None
