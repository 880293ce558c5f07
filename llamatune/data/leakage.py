"""Duplicates and train↔held-out overlap: exact (normalized text) and near (shared word n-grams)."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from typing import Sequence

NGRAM = 8  # words; long enough that shared boilerplate phrases rarely match, short enough for paraphrase-free copies
NEAR = 0.8  # share of a held-out example's n-grams found in one training example


def normalized_key(text: str) -> str:
    """Hash of the text lowercased with whitespace and punctuation folded: equal keys = same example."""
    folded = " ".join(re.findall(r"\w+", text.lower()))
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


def _shingles(text: str) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i : i + NGRAM])) for i in range(max(len(words) - NGRAM + 1, 0))}


def overlap(train_texts: Sequence[str], eval_texts: Sequence[str]) -> dict:
    """Counts held-out examples that duplicate a training example exactly or nearly.

    Near duplicate: at least NEAR of the held-out example's word 8-grams occur in a single training
    example (containment, so a held-out question copied into a longer training prompt is caught).
    Texts shorter than 8 words are compared exactly only.

    Returns:
        {"exact": n, "near": n, "examples": [up to 5 held-out indices]}
    """
    train_keys = {normalized_key(t) for t in train_texts}
    index: dict[int, list[int]] = defaultdict(list)
    for i, text in enumerate(train_texts):
        for s in _shingles(text):
            index[s].append(i)
    exact = near = 0
    flagged: list[int] = []
    for j, text in enumerate(eval_texts):
        if normalized_key(text) in train_keys:
            exact += 1
            flagged.append(j)
            continue
        shingles = _shingles(text)
        if not shingles:
            continue
        hits = Counter(i for s in shingles for i in set(index.get(s, ())))
        if hits and hits.most_common(1)[0][1] / len(shingles) >= NEAR:
            near += 1
            flagged.append(j)
    return {"exact": exact, "near": near, "examples": flagged[:5]}
