"""Turn per-example scores into metrics with 95% intervals, a terminal table and the report files
eval.json, eval.md and samples.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llamatune import strictjson
from llamatune.errors import LlamatuneError
from llamatune.evaluate.metrics import bootstrap_ci

# metric -> (per-example key, weighted by answer tokens?, higher is better?)
METRICS = {
    "loss": ("loss", True, False),
    "text_loss": ("text_loss", True, False),  # free-text answers only, when mixed with choice questions
    "accuracy": ("accuracy", False, True),
    "accuracy_norm": ("accuracy_norm", False, True),
    "exact_match": ("exact_match", False, True),
    "f1": ("f1", False, True),
    "rouge_l": ("rouge_l", False, True),
    "preference_accuracy": ("preference_accuracy", False, True),  # preference pairs
    "preference_accuracy_norm": ("preference_accuracy_norm", False, True),
    "preference_margin": ("preference_margin", False, True),
    "preference_margin_norm": ("preference_margin_norm", False, True),
}


def summarize(tuned: list[dict], base: list[dict] | None) -> dict:
    """Every metric the scores support: {name: {"tuned": [est, lo, hi], "base": ..., "delta": ...}}.

    Loss is token-weighted (each example counts by its answer tokens); perplexity is exp(loss).
    Deltas are tuned - base from a paired bootstrap over the same resampled examples.
    """
    out: dict = {}
    mixed = any("accuracy" in r for r in tuned) and any("accuracy" not in r for r in tuned)
    for name, (key, weighted, _) in METRICS.items():
        if key == "text_loss":
            # A one-letter answer has a very different loss from a paragraph: report free text on its own.
            rows = [i for i, r in enumerate(tuned) if mixed and "accuracy" not in r and r["tokens"]]
        else:
            rows = [i for i, r in enumerate(tuned) if key in r or (key == "loss" and r["tokens"])]
        if not rows:
            continue

        def values(scores):
            if key in ("loss", "text_loss"):
                return [scores[i]["loss_sum"] / scores[i]["tokens"] for i in rows]
            return [scores[i][key] for i in rows]

        weights = [tuned[i]["tokens"] for i in rows] if weighted else None
        entry = {"n": len(rows), "tuned": list(bootstrap_ci(values(tuned), weights))}
        if base is not None:
            entry["base"] = list(bootstrap_ci(values(base), weights))
            entry["delta"] = list(bootstrap_ci(values(tuned), weights, paired=values(base)))
        out[name] = entry
        if name in ("loss", "text_loss"):
            ppl = name.replace("loss", "perplexity")
            out[ppl] = {k: [math.exp(x) for x in v] for k, v in entry.items() if k in ("tuned", "base")}
            out[ppl]["n"] = entry["n"]
            if "delta" in entry:  # tuned / base perplexity = exp(loss delta), with its paired interval
                out[ppl]["ratio"] = [math.exp(x) for x in entry["delta"]]
    return out


def side_by_side(summaries: dict[str, dict]) -> dict:
    """Several comparisons' summaries (each from summarize: tuned, base, delta) as one: per metric the tuned
    estimate once, each comparison's under its own name, and its paired difference as delta_<name> (ratio_<name>
    for perplexities)."""
    out: dict = {}
    for name, summary in summaries.items():
        for metric, v in summary.items():
            entry = out.setdefault(metric, {"n": v["n"], "tuned": v["tuned"]})
            for part, key in (("base", name), ("delta", f"delta_{name}"), ("ratio", f"ratio_{name}")):
                if part in v:
                    entry[key] = v[part]
    return out


def _columns(against: str | list[str]) -> list[tuple[str, str, str]]:
    """(column title, estimate key, change key) of each comparison; one comparison is stored as base / delta."""
    if isinstance(against, str):
        return [(against, "base", "")]
    return [(name, name, f"_{name}") for name in against]


def _change(v: dict, suffix: str) -> str:
    return _fmt(v.get(f"delta{suffix}"), signed=True) if f"ratio{suffix}" not in v else "×" + _fmt(v[f"ratio{suffix}"])


# Below this many examples a percentile bootstrap interval is too narrow and too unstable to lean on.
MIN_RELIABLE_N = 30


def small_samples(summary: dict) -> list[str]:
    """One warning per metric measured on fewer than MIN_RELIABLE_N examples."""
    few = [f"{name} (n={v['n']})" for name, v in summary.items() if v["n"] < MIN_RELIABLE_N]
    if not few:
        return []
    return [f"{', '.join(few)}: fewer than {MIN_RELIABLE_N} examples, so the 95% intervals are unreliable "
            "(too narrow and unstable); evaluate on more held-out data before trusting a difference"]


def show(summary: dict, console: Console, against: str | list[str] = "base") -> None:
    """The metric table: each comparison (base, or start: the adapter the run started from, or several of base,
    start, teacher), tuned, and Δ tuned − each, with 95% intervals."""
    columns = [c for c in _columns(against) if any(c[1] in v for v in summary.values())]
    table = Table(title="held-out evaluation (95% bootstrap intervals)")
    for column in ["metric", "n", *(c[0] for c in columns), "tuned", *(f"Δ tuned − {c[0]}" for c in columns)]:
        table.add_column(column, justify="right" if column != "metric" else "left")
    for name, v in summary.items():
        table.add_row(name, str(v["n"]), *(_fmt(v.get(key)) for _, key, _ in columns), _fmt(v["tuned"]),
                      *(_change(v, suffix) for _, _, suffix in columns))
    console.print(table)


def with_macro_f1(summary: dict, groups: list[dict]) -> dict:
    """The summary with each answer group's macro-F1 as a metric (named after its labels when there are several)."""
    out = dict(summary)
    for group in groups:
        name = "macro_f1" if len(groups) == 1 else f"macro_f1 ({_short(', '.join(group['labels']), 40)})"
        out[name] = {"n": group["n"], **group["macro_f1"]}
    return out


# Beyond this many answers the terminal shows the most frequent ones and no matrix; eval.json has everything.
SHOWN_LABELS = 12


def show_answers(groups: list[dict], console: Console) -> None:
    """Per answer group: gold and predicted counts for base and tuned, and each pass's confusion matrix."""
    for group in groups:
        passes = [p for p in ("base", "tuned") if p in group["predicted"]]
        labels = _shown(group)
        table = Table(title=f"answers by {group['by']} ({group['n']} examples)", title_justify="left")
        for column in ["answer", "gold", *passes]:
            table.add_column(column, justify="left" if column == "answer" else "right")
        for label in labels:
            table.add_row(label, *(_count(counts[label], group["n"]) for counts in
                                   [group["gold"], *(group["predicted"][p] for p in passes)]))
        console.print(table)
        if len(labels) < len(group["labels"]):
            console.print(f"({len(group['labels']) - len(labels)} rarer answers and the confusion matrices: eval.json)",
                          highlight=False)
            continue
        for p in passes:
            matrix = Table(title=f"confusion matrix, {p} (rows: gold answer, columns: predicted)", title_justify="left")
            matrix.add_column("gold \\ predicted")
            for label in group["labels"]:
                matrix.add_column(_short(label, 16), justify="right")
            for label, row in zip(group["labels"], group["confusion"][p]):
                matrix.add_row(_short(label, 24), *map(str, row))
            console.print(matrix)


def _shown(group: dict) -> list[str]:
    if len(group["labels"]) <= SHOWN_LABELS:
        return group["labels"]
    weight = lambda label: group["gold"][label] + sum(c[label] for c in group["predicted"].values())  # noqa: E731
    return sorted(group["labels"], key=weight, reverse=True)[:SHOWN_LABELS]


def _count(count: int, n: int) -> str:
    return f"{count} ({count / max(n, 1):.0%})"


def _fmt(triple, signed: bool = False) -> str:
    if not triple:
        return "–"
    est, low, high = triple
    sign = "+" if signed else ""
    return f"{est:{sign}.4f} [{low:{sign}.4f}, {high:{sign}.4f}]"


def write(out_dir: Path, summary: dict, header: dict, samples: list[dict]) -> None:
    """Writes eval.json, eval.md and samples.jsonl into out_dir.

    Raises:
        LlamatuneError: If out_dir cannot be written (checked before scoring; this is for what changed since).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        strictjson.write(out_dir / "eval.json", {**header, "metrics": summary})
        (out_dir / "samples.jsonl").write_text("".join(strictjson.dumps(s) + "\n" for s in samples))
        (out_dir / "eval.md").write_text(markdown(summary, header, samples))
    except OSError as exc:
        raise LlamatuneError(f"cannot write the report into {out_dir}: {exc.strerror or exc}; choose another --out") from None


def markdown(summary: dict, header: dict, samples: list[dict]) -> str:
    """eval.md: the table, the report's notes, and the examples where the adapter helped and hurt most."""
    lines = [f"# Evaluation of {header['target']}", "", f"{header['examples']} held-out examples; 95% bootstrap intervals.", ""]
    for note in header.get("notes", []):
        lines += [f"Note: {note}.", ""]
    for warning in header.get("warnings", []):
        lines += [f"Warning: {warning}.", ""]
    columns = _columns(header.get("compare") or "base")  # one comparison is stored as "base" whichever model it is
    row = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    lines += [row(["metric", "n", *(c[0] for c in columns), "tuned", *(f"Δ tuned − {c[0]}" for c in columns)]),
              "|---" * (3 + 2 * len(columns)) + "|"]
    for name, v in summary.items():
        lines.append(row([name, v["n"], *(_fmt(v.get(key)) for _, key, _ in columns), _fmt(v["tuned"]),
                          *(_change(v, suffix) for _, _, suffix in columns)]))
    for group in header.get("answers", []):
        passes = [p for p in ("base", "tuned") if p in group["predicted"]]
        lines += ["", f"## Answers by {group['by']} ({group['n']} examples)", "",
                  "| answer | gold | " + " | ".join(passes) + " |", "|---" * (2 + len(passes)) + "|"]
        for label in group["labels"]:
            cells = [group["gold"][label], *(group["predicted"][p][label] for p in passes)]
            lines.append(f"| {label} | " + " | ".join(_count(c, group["n"]) for c in cells) + " |")
        for p in passes:
            lines += ["", f"Confusion matrix, {p} (rows: gold answer, columns: predicted):", "",
                      "| gold \\ predicted | " + " | ".join(group["labels"]) + " |", "|---" * (1 + len(group["labels"])) + "|"]
            lines += [f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(group["labels"], group["confusion"][p])]
    if any("base" in s for s in samples):
        delta = lambda s: s["tuned"]["loss"] - s["base"]["loss"]  # noqa: E731
        helped = sorted((s for s in samples if delta(s) < 0), key=delta)[:10]
        hurt = sorted((s for s in samples if delta(s) > 0), key=delta, reverse=True)[:10]
        for title, picked in (("helped most", helped), ("hurt most", hurt)):
            lines += ["", f"## Where the adapter {title} (answer loss, base → tuned)", ""]
            if not picked:
                lines.append("- none")
            for s in picked:
                lines.append(f"- {s['base']['loss']:.3f} → {s['tuned']['loss']:.3f}: …{_short(s['prompt'][-200:])} "
                             f"— reference: {_short(s['reference'])}"
                             + (f" — tuned: {_short(s['tuned']['output'])}" if s['tuned'].get('output') is not None else ""))
    return "\n".join(lines) + "\n"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
