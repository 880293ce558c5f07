"""What a closed-answer evaluation (classification, multiple choice) predicted, not only how often it was right:
the predicted-label histogram of base and tuned beside the gold one, the confusion matrix, macro-F1 with a
bootstrap interval, and a warning when one answer takes over COLLAPSE_SHARE of the predictions (of at least
COLLAPSE_MIN_N examples).

An adapter that learned to answer the majority label can lower the answer loss a lot and leave accuracy where it
was; only the histogram shows it. Examples are grouped by their answer set: a label set (or letter set, A-D)
shared by several examples is one group with those labels; questions whose options are their own texts
(`answer_with: option`) are pooled into one group by option position (option 1, option 2, ...).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from llamatune.evaluate.metrics import bootstrap

# Above this share of one answer among the predictions, the report warns that the model may have collapsed; not
# below COLLAPSE_MIN_N examples, where any answer easily takes that share (the small-sample warning is given then).
COLLAPSE_SHARE = 0.8
COLLAPSE_MIN_N = 5


def breakdown(choice_sets: list[tuple[str, ...]], tuned: list[dict], base: list[dict] | None) -> list[dict]:
    """One entry per answer group of the examples that have choices.

    Args:
        choice_sets: Each evaluated example's choices (empty for an open question), in score order.
        tuned: Per-example scores with the adapter on (records with "gold" and "predicted" for choice examples).
        base: The same with the adapter off, or None.

    Returns:
        [{"by": "label" | "option position", "labels": [...], "n": N, "gold": {label: count},
          "predicted": {"tuned": {label: count}, "base": ...}, "confusion": {"tuned": [[count]], ...} (rows gold,
          columns predicted, in `labels` order), "macro_f1": {"tuned": [est, lo, hi], "base": ..., "delta": ...},
          "collapse": {"tuned": {"label", "share", "gold_share"} | None, ...}}]
    """
    shared = Counter(c for c in choice_sets if c)
    groups: dict[tuple, list[int]] = {}
    for i, choices in enumerate(choice_sets):
        if choices:
            groups.setdefault(choices if shared[choices] > 1 else ("by position",), []).append(i)
    passes = {"tuned": tuned, **({"base": base} if base is not None else {})}
    out = []
    for key, rows in groups.items():
        by_position = key == ("by position",)
        if by_position:
            labels = [f"option {k + 1}" for k in range(max(len(choice_sets[i]) for i in rows))]
            name = lambda i, answer: f"option {choice_sets[i].index(answer) + 1}"  # noqa: E731
        else:
            labels = list(key)
            name = lambda i, answer: answer  # noqa: E731
        gold = [labels.index(name(i, tuned[i]["gold"])) for i in rows]
        predicted = {p: [labels.index(name(i, scores[i]["predicted"])) for i in rows] for p, scores in passes.items()}
        out.append(_group(labels, "option position" if by_position else "label", np.array(gold),
                          {p: np.array(v) for p, v in predicted.items()}))
    return out


def _group(labels: list[str], by: str, gold: np.ndarray, predicted: dict[str, np.ndarray]) -> dict:
    k, n = len(labels), len(gold)
    entry = {"by": by, "labels": labels, "n": n, "gold": _histogram(labels, gold),
             "predicted": {p: _histogram(labels, v) for p, v in predicted.items()},
             "confusion": {p: _confusion(k, gold, v).tolist() for p, v in predicted.items()},
             "macro_f1": {p: list(bootstrap(lambda idx, v=v: macro_f1(k, gold[idx], v[idx]), n)) for p, v in predicted.items()},
             "collapse": {p: _collapse(labels, gold, v) for p, v in predicted.items()}}
    if "base" in predicted:  # the same resampled examples for both, so the difference is paired
        t, b = predicted["tuned"], predicted["base"]
        entry["macro_f1"]["delta"] = list(bootstrap(lambda idx: macro_f1(k, gold[idx], t[idx]) - macro_f1(k, gold[idx], b[idx]), n))
    return entry


def macro_f1(k: int, gold: np.ndarray, predicted: np.ndarray) -> float:
    """The mean per-class F1 over the classes that occur among the gold answers or the predictions.

    A class that is neither a gold answer nor predicted in the (re)sample has no F1 and is left out of the mean, as
    is usual; a class predicted but never gold scores 0 (its precision is 0).
    """
    matrix = _confusion(k, gold, predicted)
    tp = np.diag(matrix).astype(np.float64)
    support, guessed = matrix.sum(1), matrix.sum(0)
    present = (support + guessed) > 0
    f1 = np.divide(2 * tp, support + guessed, out=np.zeros(k), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def collapse_warnings(groups: list[dict]) -> list[str]:
    """One warning per pass and group in which one answer takes over COLLAPSE_SHARE of the predictions."""
    out = []
    for group in groups:
        for name, hit in group["collapse"].items():
            if hit is not None:
                out.append(f"{name} predicts {hit['label']!r} for {hit['count']} of {group['n']} examples "
                           f"({hit['share']:.0%}; the held-out answers are {hit['label']!r} {hit['gold_share']:.0%} of the "
                           f"time): the model may have collapsed onto one {'option' if group['by'] != 'label' else 'label'}; "
                           "see the histogram and confusion matrix, and macro-F1 rather than accuracy")
    return out


def _histogram(labels: list[str], values: np.ndarray) -> dict[str, int]:
    counts = np.bincount(values, minlength=len(labels))
    return {label: int(c) for label, c in zip(labels, counts)}


def _confusion(k: int, gold: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return np.bincount(gold * k + predicted, minlength=k * k).reshape(k, k)


def _collapse(labels: list[str], gold: np.ndarray, predicted: np.ndarray) -> dict | None:
    counts = np.bincount(predicted, minlength=len(labels))
    top = int(counts.argmax())
    share = counts[top] / len(predicted)
    if len(labels) < 2 or len(predicted) < COLLAPSE_MIN_N or share <= COLLAPSE_SHARE:
        return None
    return {"label": labels[top], "count": int(counts[top]), "share": float(share),
            "gold_share": float((gold == top).mean())}
