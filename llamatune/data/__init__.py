"""Data: records from files → chat-rendered, tokenized, prompt-masked examples, split train/held-out."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from llamatune.data.encode import Example, encode
from llamatune.data.sources import read_jsonl
from llamatune.errors import RecipeError
from llamatune.recipe import DataSpec


@dataclass(frozen=True)
class Datasets:
    """Tokenized train and held-out examples plus counts for the run's summary."""

    train: list[Example]
    eval: list[Example]
    stats: dict = field(default_factory=dict)


def build_datasets(spec: DataSpec, tokenizer, seed: int) -> Datasets:
    """Reads, splits, renders and tokenizes the recipe's data.

    The held-out split (when `spec.eval` is not given) is drawn from the records before tokenization
    with a generator seeded by `seed`, so the same recipe always holds out the same records.

    Raises:
        RecipeError: For unreadable records (file:line) or when every example is longer than max_length.
    """
    train_records = read_jsonl(spec.train, spec.prompt_field, spec.response_field)
    if spec.eval is not None:
        eval_records = read_jsonl(spec.eval, spec.prompt_field, spec.response_field)
    else:
        if len(train_records) < 2:
            raise RecipeError([f"data.train: {spec.train} has 1 record; a held-out split needs at least 2 (or set data.eval)"])
        order = list(range(len(train_records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(spec.eval_fraction * len(order)))
        eval_records = [train_records[i] for i in sorted(order[:n_eval])]
        train_records = [train_records[i] for i in sorted(order[n_eval:])]

    train, train_dropped = _encode_all(train_records, tokenizer, spec)
    held_out, eval_dropped = _encode_all(eval_records, tokenizer, spec)
    for name, kept, records in (("data.train", train, train_records), ("data.eval", held_out, eval_records)):
        if not kept:
            raise RecipeError([f"{name}: all {len(records)} examples are longer than data.max_length={spec.max_length} tokens; raise data.max_length"])
    stats = {
        "train_examples": len(train),
        "eval_examples": len(held_out),
        "eval_source": "file" if spec.eval is not None else f"{spec.eval_fraction:g} of train (seed {seed})",
        "dropped_too_long": {"train": train_dropped, "eval": eval_dropped},
        "train_tokens": sum(len(e.input_ids) for e in train),
        "train_label_tokens": sum(e.n_label_tokens for e in train),
    }
    return Datasets(train=train, eval=held_out, stats=stats)


def _encode_all(records, tokenizer, spec: DataSpec) -> tuple[list[Example], int]:
    kept = []
    for prompt, response in records:
        example = encode(tokenizer, prompt, response, spec.system_prompt)
        # Dropped, not truncated: a truncated answer would lose its end-of-turn token and teach the
        # model never to stop.
        if len(example.input_ids) <= spec.max_length:
            kept.append(example)
    return kept, len(records) - len(kept)
