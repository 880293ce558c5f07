"""`llamatune data check` and `llamatune data preview`: show what the data pipeline did before any training.

check: per source, records → examples and drops by reason (with one example each), duplicates,
train↔held-out overlap, length policy, warnings, totals. preview: rendered examples with the trained
tokens highlighted, plus length statistics.
"""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from llamatune import preflight
from llamatune.data.batches import Row
from llamatune.data.encode import IGNORE_INDEX
from llamatune.data.pipeline import Datasets
from llamatune.schema import Recipe


def load(recipe: Recipe, source: str | None, say=print):
    """Builds the recipe's datasets with its model's tokenizer, through the same checks as train (no weights
    are loaded), quietly: report() shows the same facts in more detail."""
    checked = preflight.check(recipe, source, say=lambda *_: None, need_train=False)
    return checked.data, checked.tokenizer


def report(data: Datasets, console: Console) -> None:
    """Prints the manifest as a human would want to read it."""
    m = data.manifest
    preflight.show_data(m, lambda text: console.print(text, highlight=False))
    dup = m.get("duplicates_removed", {})
    ov = m["overlap"]
    console.print(f"duplicates removed: train {dup.get('train', 0)}, held-out {dup.get('eval', 0)}", highlight=False)
    console.print(f"held-out overlap with train: {ov['exact']} exact, {ov['near']} near ({ov['share']:.1%})"
                  + (f"; e.g. {escape(', '.join(ov['examples'][:3]))}" if ov["examples"] else ""), highlight=False)
    for split, counts in m.get("length", {}).items():
        if counts:
            console.print(f"length policy ({split}): " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    for split, d in m.get("doctor", {}).items():
        console.print(f"doctor ({split}): " + "; ".join([
            f"{_mark(True)} {d['chat_examples_rendered_as_at_inference']} chat examples rendered exactly as at inference",
            f"{_mark(d['dropped_without_trained_tokens'] == 0)} {d['dropped_without_trained_tokens']} dropped with no trained token",
            f"{_mark(d['without_trained_end_of_turn'] == 0)} {d['without_trained_end_of_turn']} without a trained end-of-turn token",
        ]), highlight=False)
    t = m["totals"]
    console.print(f"totals: {t['train_examples']} train / {t['eval_examples']} held-out examples, "
                  f"{t['train_tokens']:,} train tokens of which {t['train_label_tokens']:,} trained "
                  f"({t['train_label_tokens'] / max(t['train_tokens'], 1):.0%}); {t['train_rows']} rows, "
                  f"packing efficiency {t['packing_efficiency']:.0%}", highlight=False)


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[yellow]!![/]"


def preview(data: Datasets, tokenizer, n: int, console: Console) -> None:
    """Prints the first n training examples (held-out ones for an eval-only recipe): prompt tokens dim, trained
    tokens bold green."""
    rows, split = (data.train, "training") if data.train else (data.eval, "held-out")
    examples = [e for row in rows for e in row][:n]
    total = sum(len(row) for row in rows)
    if "system_prompt" in data.manifest:
        from llamatune.data.encode import describe_system

        console.print(describe_system(data.manifest["system_prompt"]), highlight=False, markup=False)
    for i, example in enumerate(examples):
        console.rule(f"{split} example {i + 1} of {total}: {len(example.input_ids)} tokens, "
                     f"{example.n_label_tokens} trained")
        text = Text()
        for segment, trained in _segments(example.input_ids, example.labels):
            text.append(tokenizer.decode(segment), style="bold green" if trained else "dim")
        console.print(text)
    lengths = [len(e.input_ids) for row in rows for e in row]
    console.rule(f"lengths ({split} examples)")
    console.print(f"tokens per example: min {min(lengths)}, median {statistics.median(lengths):g}, "
                  f"max {max(lengths)}; trained share {_trained_share(rows):.0%}; "
                  f"packing efficiency {data.manifest['totals']['packing_efficiency']:.0%} "
                  "(dim = prompt, not trained; [bold green]green[/] = trained)", highlight=False)


def _segments(ids, labels):
    """Runs of consecutive tokens that are all trained or all masked."""
    run: list[int] = []
    state = None
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if state is not None and trained != state:
            yield run, state
            run = []
        run.append(token)
        state = trained
    if run:
        yield run, state


def _trained_share(rows: list[Row]) -> float:
    total = sum(len(e.input_ids) for row in rows for e in row)
    return sum(e.n_label_tokens for row in rows for e in row) / max(total, 1)
