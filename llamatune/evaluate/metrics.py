"""Text metrics and bootstrap confidence intervals for `llamatune eval`.

Exact match and token F1 follow the SQuAD definitions (lowercase, drop punctuation and English
articles, fold whitespace). ROUGE-L comes from Google's `rouge-score` package, the reference
implementation that other toolkits wrap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalization: lowercase, no punctuation, no a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall over normalized tokens (bag of words)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens)."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def bootstrap_ci(values: Sequence[float], weights: Sequence[float] | None = None, paired: Sequence[float] | None = None,
                 resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and 95% percentile-bootstrap interval of a (weighted) mean.

    Args:
        values: Per-example values.
        weights: Per-example weights (e.g. token counts, so a loss stays token-weighted); default 1.
        paired: If given, the statistic is mean(values) - mean(paired), both resampled with the same
            indices (a paired bootstrap of the difference).
        resamples: Bootstrap resamples.
        seed: For reproducible intervals.

    Returns:
        (estimate, low, high).
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    p = None if paired is None else np.asarray(paired, dtype=np.float64)

    def stat(idx):
        est = (v[idx] * w[idx]).sum() / w[idx].sum()
        return est if p is None else est - (p[idx] * w[idx]).sum() / w[idx].sum()

    return bootstrap(stat, len(v), resamples, seed)


def bootstrap(stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and 95% percentile-bootstrap interval of any statistic of n examples (e.g. macro-F1, which
    is not a mean of per-example values).

    Args:
        stat: The statistic of the examples at the given indices (repeats allowed).
        n: Number of examples.
        resamples: Bootstrap resamples.
        seed: For reproducible intervals (the same seed draws the same indices, so two statistics computed with
            it are paired).

    Returns:
        (estimate, low, high); (0, 0, 0) for no examples.
    """
    if not n:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(stat(np.arange(n))), float(low), float(high)
