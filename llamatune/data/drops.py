"""Drops: records that yield no example are counted by source and reason with their first places, bounded by
data.max_drop_fraction, and explained when nothing is left. A record is measured in characters before it is
tokenized, so a huge one is too long without being tokenized or compared whole."""

from __future__ import annotations

import difflib
from collections import Counter

from llamatune.data.fields import parse_template
from llamatune.data.formats import Drop, Rendered, Turn
from llamatune.data.records import Record
from llamatune.errors import RecipeError
from llamatune.schema import DataSpec, SourceSpec

EXAMPLES_SHOWN = 3  # drop examples kept per source and reason (file:line each)
TEMPLATE_KEYS = ("prompt", "response", "system", "text", "answer", "options", "messages")


def longest_token_chars(tokenizer) -> int:
    """The most characters one token can stand for (its vocabulary entry's length bounds its text), so
    max_length tokens can never hold more than max_length times this many characters."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def nothing_left(split: str, manifest: dict, held_out_from_train: bool) -> str:
    """Why a split is empty: its files, their record counts and drops by reason with one example each."""
    sources = [s for s in manifest["sources"] if s["split"] == ("train" if held_out_from_train else split)]
    parts = []
    for source in sources:
        files = ", ".join(f["path"] for f in source["files"]) or source["path"]
        drops = "; ".join(f"{reason} {n} (e.g. {source['drop_examples'][reason][0]})" for reason, n in source["dropped"].items())
        parts.append(f"{files}: {source['records']} records, {source['examples']} kept" + (f", dropped {drops}" if drops else ""))
    length = {reason: n for reason, n in manifest.get("length", {}).get(split, {}).items() if n and reason != "truncated"}
    if length:
        parts.append("after tokenizing, dropped " + ", ".join(f"{reason} {n}" for reason, n in length.items())
                     + " (see data.max_length and data.length_policy)")
    return (f"data.{split}: no examples left after reading and dropping: " + "; ".join(parts)
            + ". Fix the templates or the data (llamatune data check shows every count)")


def bounded(rendered: Rendered, max_chars: int, spec: DataSpec, origin: str) -> Rendered:
    """Measures a conversation in characters before it is tokenized: more than max_length tokens can
    hold is too long whatever the tokenizer does, so it is dropped (or refused) without tokenizing it,
    or, with length_policy truncate, cut to what can still fit. Documents (format text) are windowed."""
    if rendered.document is not None:
        return rendered
    # A pair is two sequences (prompt + chosen, prompt + rejected): each must fit max_length on its own.
    size = max(sum(len(t.content) for t in turns) for turns in (rendered.turns, rendered.rejected))
    if size <= max_chars:
        return rendered
    detail = f"{size:,} characters, more than data.max_length={spec.max_length} tokens can hold"
    if spec.length_policy == "error":
        raise RecipeError([f"{origin}: {detail} (data.length_policy: error); raise max_length or choose drop/truncate"])
    if spec.length_policy == "drop":
        raise Drop("too_long", detail)
    # Each turn keeps at most max_chars: that is already more than the max_length tokens truncation keeps.
    cut = lambda turns: tuple(Turn(t.role, t.content[:max_chars]) for t in turns)  # noqa: E731
    return Rendered(turns=cut(rendered.turns), document=None, choices=rendered.choices, rejected=cut(rendered.rejected))


def count_drop(entry: dict, reason: str, example: str) -> None:
    entry["dropped"][reason] = entry["dropped"].get(reason, 0) + 1
    shown = entry["drop_examples"].setdefault(reason, [])
    if len(shown) < EXAMPLES_SHOWN:
        shown.append(example)


def _fields_read(source: SourceSpec, name: str) -> list[str]:
    """The field paths a source key reads: templates name them in braces; messages and options are paths."""
    value = getattr(source, name)
    return [value] if name in ("messages", "options") else parse_template(value).fields


def fields_nobody_has(missing: Counter, n_records: int, records: list[Record], source: SourceSpec, key: str) -> list[str]:
    """A template field that not one record of the source has is a typo in the recipe, not bad data."""
    problems = []
    for path, count in missing.items():
        if count < n_records or n_records == 0:
            continue
        present = sorted({k for r in records[:1000] for k in r.fields})
        close = difflib.get_close_matches(path.split(".")[0], present, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if any(sep in name for name in present for sep in ";\t|"):  # one column named 'question;answer'
            hint += " The file may use another delimiter than its extension says (.csv: comma, .tsv: tab)."
        templates = [name for name in TEMPLATE_KEYS if getattr(source, name) and path in _fields_read(source, name)]
        where = ", ".join(f"{key}.{name}" for name in templates) or f"{key} ({source.format} format)"
        problems.append(f"{where}: field {path!r} is in none of the {n_records} records of {source.path}; the "
                        f"records have: {', '.join(present[:20])}.{hint}")
    return problems


def check_drops(manifest: dict, limit: float) -> list[str]:
    """One problem per source that lost more than `limit` of its records, with counts by reason and examples."""
    problems = []
    for entry in manifest["sources"]:
        lost = sum(entry["dropped"].values())
        if entry["records"] and lost / entry["records"] > limit and not entry.get("template_typo"):
            reasons = "; ".join(f"{reason} {n} (e.g. {entry['drop_examples'][reason][0]})" for reason, n in entry["dropped"].items())
            problems.append(f"{entry['path']} (data.{entry['split']}.{entry['index']}): {lost} of {entry['records']} records "
                            f"dropped ({lost / entry['records']:.1%}), more than data.max_drop_fraction={limit:g}: {reasons}. "
                            "Fix the records or the source's templates/labels, or raise data.max_drop_fraction to accept the loss "
                            "(llamatune data check lists the drops)")
    return problems
