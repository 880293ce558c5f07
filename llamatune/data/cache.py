"""Cache of tokenized datasets, keyed on everything that determines them.

The key hashes the data section of the recipe, the seed, the sha256 of every source file, the
tokenizer (vocabulary, merges, special tokens), the chat template and llamatune's version: editing a
data file, switching model or template, or upgrading llamatune can never serve a stale cache.
Entries are plain JSON (no pickle: a cache file must not be able to run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from llamatune import __version__, strictjson
from llamatune.catalog import cache_dir
from llamatune.data.encode import Example
from llamatune.data.readers import source_files
from llamatune.fingerprint import sha256_file
from llamatune.schema import DataSpec


_FORMAT = 3  # bumped when the rows or the manifest change shape (2: drops per source with examples, read notes;
# 3: the system-prompt decision)


def cache_key(spec: DataSpec, tokenizer, seed: int, file_hashes: dict[str, str]) -> str | None:
    """Hex key for this data + tokenizer + template, or None when a source cannot be fingerprinted (hub).

    Args:
        file_hashes: sha256 of every local source file, by path (see file_hashes()).
    """
    if any(s.reader == "hub" for s in spec.train + (spec.eval or ())):
        return None  # a hub dataset has no local files to hash
    files = sorted(file_hashes.items())
    payload = {
        "format": _FORMAT,
        "data": spec.model_dump(mode="json"),
        "seed": seed,
        "files": files,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template,
        "llamatune": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_hashes(spec: DataSpec) -> dict[str, str]:
    """sha256 of every local source file, by path: computed once, used by the key and the manifest."""
    return {str(f): sha256_file(f) for s in spec.train + (spec.eval or ()) for f in source_files(s)}


def load(key: str) -> tuple[list, list, dict] | None:
    """Returns (train rows, eval rows, manifest) for a key, or None on a miss or an unreadable entry."""
    path = _path(key)
    try:
        entry = json.loads(path.read_text())
        return _rows(entry["train"]), _rows(entry["eval"]), entry["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: rebuild (and overwrite) rather than fail


def save(key: str, train: list, held_out: list, manifest: dict) -> None:
    """Writes an entry atomically (temp file + rename), so a crash never leaves half an entry.

    No lock, unlike the model cache: an entry is a pure function of its key, so two processes that
    build the same one at once write the same content, each to its own temporary file, and os.replace
    is atomic. A reader sees no entry or a whole one, never a mix; a race only costs doing the work twice.
    """
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"train": _plain(train), "eval": _plain(held_out), "manifest": manifest}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(strictjson.dumps(entry, separators=(",", ":")))
    os.replace(tmp, path)


def _path(key: str) -> Path:
    return cache_dir() / "data" / f"{key}.json"


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((text + json.dumps(specials)).encode()).hexdigest()


def _plain(rows: list) -> list:
    return [[[list(e.input_ids), list(e.labels), list(e.choices), e.document, e.branch, list(e.rejected_ids),
              list(e.rejected_labels)] for e in row] for row in rows]


def _rows(data: list) -> list:
    # An entry written before examples said whether they are document windows (or before pairs) has fewer fields:
    # unpacking fails with ValueError, so load() treats it as a miss and rebuilds it.
    return [tuple(Example(tuple(i), tuple(l), tuple(c), bool(d), int(b), tuple(ri), tuple(rl)) for i, l, c, d, b, ri, rl in row)
            for row in data]
