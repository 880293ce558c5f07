"""The data pipeline, in order: sources → records → split by document → render (format) → dedup →
overlap check → chat template + tokenize + mask → length policy → pack. Everything counted in a manifest."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from llamatune.data import cache
from llamatune.data.batches import Row, pack, unpacked
from llamatune.data.drops import bounded, check_drops, count_drop, fields_nobody_has, longest_token_chars, nothing_left
from llamatune.data.encode import (IGNORE_INDEX, Example, encode_document, encode_pair, encode_turns, end_of_turn_trained,
                                   set_chat_template, system_decision)
from llamatune.data.formats import FORMATS, Drop, RecordProblem, Rendered, fill
from llamatune.data.leakage import normalized_key, overlap
from llamatune.data.readers import read_source, source_files
from llamatune.data.records import Record, SourceKeyError
from llamatune.errors import RecipeError
from llamatune.progress import Phase
from llamatune.schema import DataSpec, SourceSpec


@dataclass(frozen=True)
class Datasets:
    """Rows ready for batching, the examples behind them, and the manifest that explains them."""

    train: list[Row]
    eval: list[Row]
    manifest: dict = field(default_factory=dict)

    @property
    def train_examples(self) -> int:
        return sum(len(r) for r in self.train)


@dataclass
class _Item:
    rendered: Rendered
    origin: str
    text: str  # what dedup and the overlap check compare
    document: str  # the held-out split keeps a document's items together
    source: int  # index of its source in data.train / data.eval


def build_datasets(spec: DataSpec, tokenizer, seed: int, use_cache: bool = True,
                   say: Callable[[str], None] | None = None) -> Datasets:
    """Builds train and held-out rows from the recipe's data section, or reads them from the cache
    (keyed on file contents, tokenizer, template and the data section; see cache.py).

    The tokenizer's chat template is set here (data.chat_template), so it is the one saved with the run.
    With `say`, each source read and each split tokenized is a progress phase (progress.Phase) printed there.

    Raises:
        RecipeError: See _build.
    """
    if any(s.format != "text" for s in spec.train + (spec.eval or ())):
        set_chat_template(tokenizer, spec.chat_template, spec.system_prompt)
    hashes = cache.file_hashes(spec)
    key = cache.cache_key(spec, tokenizer, seed, hashes) if use_cache else None
    hit = cache.load(key) if key else None
    if hit is not None:
        train_rows, eval_rows, manifest = hit
        if say is not None:
            say(f"data: {len(train_rows)} train / {len(eval_rows)} held-out rows from the cache (files unchanged)")
        return Datasets(train=train_rows, eval=eval_rows, manifest={**manifest, "cache": {"key": key, "hit": True}})
    data = _build(spec, tokenizer, seed, hashes, say)
    if key:
        cache.save(key, data.train, data.eval, data.manifest)
    return Datasets(train=data.train, eval=data.eval, manifest={**data.manifest, "cache": {"key": key, "hit": False}})


def _build(spec: DataSpec, tokenizer, seed: int, hashes: dict[str, str], say: Callable[[str], None] | None) -> Datasets:
    """Builds train and held-out rows from the recipe's data section.

    Order matters: duplicates are removed from the whole training pool before a held-out share is
    split off (else copies of one record would land on both sides), and the split is by document.
    Records are measured in characters before anything else touches them, so one huge record is
    dropped (or cut, with length_policy truncate) without being tokenized or compared whole.

    Raises:
        RecipeError: Listing every problem found: unreadable data (naming file and line), a template
            field no record has, an unknown chat role, strict-mode drops, more drops than
            data.max_drop_fraction, a held-out set that overlaps training above data.max_overlap, or an
            empty split.
    """
    manifest: dict = {"sources": [], "seed": seed, "notes": []}
    if any(s.format != "text" for s in spec.train + (spec.eval or ())):
        manifest["system_prompt"] = system_decision(spec.system_prompt, tokenizer)
    problems: list[str] = []
    train_items, eval_items = _render_all(spec, manifest, hashes, problems, spec.max_length * longest_token_chars(tokenizer),
                                          say)
    train_items = _dedup(train_items, spec.dedup, manifest, "train")
    if spec.eval is not None:
        manifest["split"] = {"held_out": "eval sources"}
    else:
        train_items, eval_items = _split_by_document(train_items, spec.eval_fraction, seed, manifest)
        manifest["split"] = {"held_out": f"{spec.eval_fraction:g} of train documents", "seed": seed,
                             "train_items": len(train_items), "held_out_items": len(eval_items)}
    eval_items = _dedup(eval_items, spec.dedup, manifest, "eval")
    problems += _check_overlap(train_items, eval_items, spec.max_overlap, manifest)

    train = _weighted(_encode_all(train_items, tokenizer, spec, manifest, "train", say), spec.train, seed)
    held_out = [e for _, examples in _encode_all(eval_items, tokenizer, spec, manifest, "eval", say) for e in examples]
    problems += check_drops(manifest, spec.max_drop_fraction)
    for name, examples in (("train", train), ("eval", held_out)):
        if not examples and not problems and (name == "eval" or spec.train):  # no train sources: an eval-only recipe
            problems.append(nothing_left(name, manifest, held_out_from_train=spec.eval is None))
    if problems:
        raise RecipeError(problems)
    rows = (lambda ex, s: pack(ex, spec.max_length, s)) if spec.packing else (lambda ex, s: unpacked(ex))
    train_rows, eval_rows = rows(train, seed), rows(held_out, seed)
    manifest["totals"] = _totals(train, held_out, train_rows, spec.max_length)
    return Datasets(train=train_rows, eval=eval_rows, manifest=manifest)


def check_records(spec: DataSpec) -> None:
    """The data checks that need no tokenizer (reading, templates, formats, drops while rendering), so a recipe
    whose data is wrong fails before a model is fetched or converted to get its tokenizer.

    Raises:
        RecipeError: As build_datasets would for the same problems.
    """
    _render_all(spec, {"sources": [], "notes": []}, cache.file_hashes(spec), [], max_chars=None)


def _render_all(spec: DataSpec, manifest: dict, hashes: dict[str, str], problems: list[str],
                max_chars: int | None, say: Callable[[str], None] | None = None) -> tuple[list[_Item], list[_Item]]:
    """Every source rendered into items, drops counted; raises when rendering alone already shows a problem."""
    def render(split: str, sources: tuple[SourceSpec, ...]) -> list[_Item]:
        items = []
        for k, source in enumerate(sources):
            with Phase(say or _silent, f"data: reading data.{split}.{k} ({source.path})", enabled=say is not None) as phase:
                items += _render_source(k, source, spec, split, manifest, hashes, problems, max_chars)
                phase.note = f"{manifest['sources'][-1]['records']:,} records"
        return items

    train_items = render("train", spec.train)
    eval_items = render("eval", spec.eval) if spec.eval is not None else []
    # Drops while rendering are already decisive (a wrong template or label set): say so before splitting.
    problems += check_drops(manifest, spec.max_drop_fraction)
    if problems:
        raise RecipeError(problems)
    return train_items, eval_items


def fingerprint(manifest: dict) -> str:
    """A digest of what the data is (every source file's sha256, the counts): a resume refuses
    to continue on different data."""
    import hashlib
    import json

    files = [(f["path"], f["sha256"]) for s in manifest["sources"] for f in s["files"]]
    return hashlib.sha256(json.dumps([files, manifest["totals"]], sort_keys=True).encode()).hexdigest()


def _split_by_document(items: list[_Item], fraction: float, seed: int,
                       manifest: dict) -> tuple[list[_Item], list[_Item]]:
    """Holds out a seeded share of documents (not examples): exploded questions or windows of one
    document stay on one side, so the held-out score is not inflated by siblings seen in training."""
    documents = sorted({i.document for i in items})
    if not documents:
        raise RecipeError([nothing_left("train", manifest, held_out_from_train=True)])
    random.Random(seed).shuffle(documents)
    held = set(documents[: max(1, round(fraction * len(documents)))])
    if len(held) == len(documents):
        raise RecipeError([f"data.eval_fraction: the training sources hold {len(documents)} document(s) after "
                           f"dropping and deduplication; holding out "
                           f"{fraction:g} of them leaves nothing to train on: add data, or give held-out data in data.eval"])
    return [i for i in items if i.document not in held], [i for i in items if i.document in held]


def _render_source(index: int, source: SourceSpec, spec: DataSpec, split: str, manifest: dict,
                   hashes: dict[str, str], problems: list[str], max_chars: int | None) -> list[_Item]:
    key = f"data.{split}.{index}"
    notes: list[str] = []
    try:
        records = list(read_source(source, notes))
    except SourceKeyError as exc:
        raise RecipeError([f"{key}.{exc.key}: {p}" for p in exc.problems]) from None
    manifest["notes"] += notes
    render = FORMATS[source.format]
    labels = source.labels or _labels_in(source, records)
    entry = {"split": split, "index": index, "path": source.path, "reader": source.reader, "format": source.format,
             "files": [{"path": str(f), "sha256": hashes[str(f)], "bytes": f.stat().st_size} for f in source_files(source)],
             "records": len(records), "dropped": {}, "drop_examples": {}}
    manifest["sources"].append(entry)
    items: list[_Item] = []
    missing: Counter = Counter()
    for record in records:
        try:
            rendered = render(source, record.fields, spec.system_prompt, labels)
            if max_chars is not None:
                rendered = bounded(rendered, max_chars, spec, record.origin)
        except RecordProblem as exc:
            problems.append(f"{record.origin}{_record_id(record)}: {exc} ({key}.{exc.key})")
            break  # one is enough to show what to change; the rest say the same
        except Drop as drop:
            if spec.strict:
                raise RecipeError([f"{record.origin}: {drop.detail} (data.strict is on; turn it off to drop and count)"]) from None
            missing[drop.field] += drop.field is not None
            count_drop(entry, drop.reason, f"{record.origin}: {drop.detail}")
            if drop.reason == "too_long":  # measured in characters here; the length policy's count includes it
                counts = manifest.setdefault("length", {}).setdefault(split, {})
                counts["too_long"] = counts.get("too_long", 0) + 1
            continue
        # A pair's rejected answer is part of what makes it this pair (dedup), and of what a held-out set may leak.
        text = rendered.document if rendered.document is not None else "\n".join(
            [t.content for t in rendered.turns] + [t.content for t in rendered.rejected[len(rendered.turns) - 1:]])
        items.append(_Item(rendered=rendered, origin=record.origin, text=text, document=record.document, source=index))
    typos = fields_nobody_has(missing, len(records), records, source, key)
    entry["template_typo"] = bool(typos)  # its drops follow from the typo: check_drops need not repeat them
    problems += typos
    if labels:
        entry["labels"] = list(labels)
    entry["examples"] = len(items)
    return items


def _record_id(record: Record) -> str:
    value = record.fields.get("id") if isinstance(record.fields, dict) else None
    return f" (record id {value!r})" if value is not None and not record.origin.endswith(f"[{value}]") else ""


def _labels_in(source: SourceSpec, records: list[Record]) -> tuple[str, ...]:
    if source.format != "classification":
        return ()
    found = set()
    for record in records:
        try:
            found.add(fill(source.answer, record.fields).strip())
        except Drop:
            pass
    return tuple(sorted(found))


def _dedup(items: list[_Item], enabled: bool, manifest: dict, split: str) -> list[_Item]:
    if not enabled:
        return items
    seen: set[str] = set()
    kept = []
    for item in items:
        key = normalized_key(item.text)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    manifest.setdefault("duplicates_removed", {})[split] = len(items) - len(kept)
    return kept


def _check_overlap(train: list[_Item], held_out: list[_Item], limit: float, manifest: dict) -> list[str]:
    found = overlap([i.text for i in train], [i.text for i in held_out])
    share = (found["exact"] + found["near"]) / max(len(held_out), 1)
    manifest["overlap"] = {"exact": found["exact"], "near": found["near"], "share": round(share, 4),
                           "examples": [held_out[j].origin for j in found["examples"]]}
    if 0 < share <= limit:
        manifest.setdefault("warnings", []).append(
            f"{found['exact'] + found['near']} held-out examples ({share:.1%}) duplicate training examples "
            f"(exact {found['exact']}, near {found['near']}), within data.max_overlap={limit:g}")
    if share > limit:
        return [
            f"data: {found['exact']} held-out examples duplicate training examples exactly and {found['near']} nearly "
            f"({share:.1%} of {len(held_out)}, above data.max_overlap={limit:g}); e.g. "
            f"{', '.join(manifest['overlap']['examples'][:3])}. Deduplicate the sources, or raise data.max_overlap"
        ]
    return []


def _weighted(encoded: list[tuple[_Item, list[Example]]], sources: tuple[SourceSpec, ...], seed: int) -> list[Example]:
    """Repeats (weight > 1) or subsamples (weight < 1, seeded) each source's items, after encoding (so a
    repeated item is encoded, and a dropped one counted, once)."""
    if all(s.weight == 1.0 for s in sources):
        return [e for _, examples in encoded for e in examples]
    out: list[Example] = []
    rng = random.Random(f"weight-{seed}")
    for k, source in enumerate(sources):
        mine = [examples for item, examples in encoded if item.source == k]
        whole, frac = int(source.weight), source.weight - int(source.weight)
        for examples in mine * whole + rng.sample(mine, round(frac * len(mine))):
            out += examples
    return out


def _encode_all(items: list[_Item], tokenizer, spec: DataSpec, manifest: dict, split: str,
                say: Callable[[str], None] | None = None) -> list[tuple[_Item, list[Example]]]:
    """Tokenizes and masks every item; length drops are counted per split and on the item's source."""
    with Phase(say or _silent, f"data: tokenizing {split}", len(items), "examples", enabled=say is not None) as phase:
        return _encode_items(items, tokenizer, spec, manifest, split, phase.advance)


def _silent(_: str) -> None:
    pass


def _encode_items(items: list[_Item], tokenizer, spec: DataSpec, manifest: dict, split: str,
                  tick: Callable[[], None]) -> list[tuple[_Item, list[Example]]]:
    encoded: list[tuple[_Item, list[Example]]] = []
    dropped: Counter = Counter(manifest.get("length", {}).get(split, {}))  # too_long by characters, when rendered
    missing_eot = chat_examples = 0
    entries = {e["index"]: e for e in manifest["sources"] if e["split"] == (split if spec.eval is not None else "train")}

    def drop(item: _Item, reason: str, detail: str) -> None:
        dropped[reason] += 1
        count_drop(entries[item.source], reason, f"{item.origin}: {detail}")
        entries[item.source]["examples"] -= 1

    for item in items:
        tick()
        if item.rendered.document is not None:
            encoded.append((item, encode_document(tokenizer, item.rendered.document, spec.max_length, spec.text_overlap)))
            continue
        if item.rendered.rejected:
            example = encode_pair(tokenizer, item.rendered.turns, item.rendered.rejected)
        else:
            example = encode_turns(tokenizer, item.rendered.turns)
        chat_examples += 1
        if item.rendered.choices:
            example = replace(example, choices=item.rendered.choices)
        # A pair is two sequences, prompt + chosen and prompt + rejected: each must fit max_length.
        size = max(len(example.input_ids), example.branch + len(example.rejected_ids))
        if size > spec.max_length:
            if spec.length_policy == "error":
                raise RecipeError([f"{item.origin}: {size} tokens, over data.max_length={spec.max_length} "
                                   "(data.length_policy: error); raise max_length or choose drop/truncate"])
            if spec.length_policy == "drop":
                drop(item, "too_long", f"{size} tokens, over data.max_length={spec.max_length}")
                continue
            keep = max(spec.max_length - example.branch, 0)
            example = replace(example, input_ids=example.input_ids[: spec.max_length], labels=example.labels[: spec.max_length],
                              rejected_ids=example.rejected_ids[:keep], rejected_labels=example.rejected_labels[:keep])
            if example.n_label_tokens == 0 or (example.branch and not any(t != IGNORE_INDEX for t in example.rejected_labels)):
                # the prompt alone fills max_length: nothing left to learn (or, of a pair, to compare)
                drop(item, "too_long", f"the prompt alone fills data.max_length={spec.max_length} tokens")
                continue
            dropped["truncated"] += 1  # kept, but counted: its answer may have lost its end
        if example.n_label_tokens == 0 or (example.branch and not any(t != IGNORE_INDEX for t in example.rejected_labels)):
            drop(item, "no_trained_tokens", "no token left to train on after masking the prompt")
            continue
        if not end_of_turn_trained(example, tokenizer):
            missing_eot += 1  # kept, but a model that never learns to stop is worth a warning
        encoded.append((item, [example]))
    manifest.setdefault("length", {})[split] = {k: v for k, v in dropped.items() if v}
    # The doctor's findings: encode_turns already refused any template whose prompt differs from the
    # inference rendering, so every chat example counted here passed that check.
    manifest.setdefault("doctor", {})[split] = {
        "chat_examples_rendered_as_at_inference": chat_examples,
        "dropped_without_trained_tokens": dropped["no_trained_tokens"],
        "without_trained_end_of_turn": missing_eot,
    }
    if missing_eot:
        manifest.setdefault("warnings", []).append(f"{split}: {missing_eot} examples do not train the end-of-turn token "
                                                   f"{tokenizer.eos_token!r}; the model may not learn to stop")
    return encoded


def _totals(train: list[Example], held_out: list[Example], rows: list[Row], max_length: int) -> dict:
    tokens = sum(e.length for e in train)
    return {
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "train_tokens": tokens,
        "train_label_tokens": sum(e.n_label_tokens for e in train),
        "train_rows": len(rows),
        "longest_row": max((sum(e.length for e in row) for row in rows), default=0),  # tokens: sizes the peak batch
        # share of the padded batch area that holds real tokens when rows are padded to max_length
        "packing_efficiency": round(tokens / (len(rows) * max_length), 4) if rows else 0.0,
    }
