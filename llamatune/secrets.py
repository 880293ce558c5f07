"""Values a recipe takes from the environment (`${HF_TOKEN}/x`) are shown as the `${NAME}` they were
written as: on the console, in errors and in every file of a run or merged folder. A path that holds a
token must not leak it into a log, a model card or a run directory shared with colleagues.

The recipe loader (recipe.py) builds a Redactor from the variables it interpolated; the CLI's consoles
and the writers of run directories apply it (`Redactor.text`, `scrub`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# A value shorter than this is not replaced in free text ("." or "1" would garble every message);
# paths built from it are still shown with ${NAME} (recipe.py redacts them as a whole).
_MIN_LENGTH = 4
# Files a run or merge writes as text; weights and optimizer state are binary and hold no paths.
_TEXT_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".md", ".txt", ".jinja", ""}


@dataclass(frozen=True)
class Redactor:
    """Replaces each secret string by how it was written: pairs (value, '${NAME}'), longest first."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> "Redactor":
        kept = {(value, shown) for value, shown in pairs if len(value) >= _MIN_LENGTH and value != shown}
        return cls(tuple(sorted(kept, key=lambda p: (-len(p[0]), p))))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def text(self, value: str) -> str:
        """The string with every secret replaced."""
        for secret, shown in self.pairs:
            value = value.replace(secret, shown)
        return value

    def data(self, value: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value


def scrub(folder: Path, redactor: Redactor, skip: tuple[str, ...] = ("checkpoints",)) -> None:
    """Rewrites every text file under `folder` that contains a secret (libraries such as peft and
    transformers write paths into adapter_config.json and tokenizer_config.json themselves).

    Args:
        skip: Top-level subfolders left alone: checkpoints carry checksums of their files, and hold no paths.
    """
    if not redactor or not folder.is_dir():
        return
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix not in _TEXT_SUFFIXES or path.relative_to(folder).parts[0] in skip:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        clean = redactor.text(text)
        if clean != text:
            path.write_text(clean, encoding="utf-8")
