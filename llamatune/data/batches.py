"""Group examples into rows (packing), order rows into micro-batches, and pad them into tensors."""

from __future__ import annotations

import random
from typing import Sequence

from llamatune.data.encode import IGNORE_INDEX, Example

Row = tuple[Example, ...]  # one sequence of the batch: a single example, or several packed ones
PAD_MULTIPLE = 32  # batch widths are rounded up: few distinct shapes, so oneDNN reuses (and caches fewer) kernels
GROUP = 32  # micro-batches per length-sorting window: small enough to stay random, large enough to match lengths


def pack(examples: Sequence[Example], max_length: int, seed: int) -> list[Row]:
    """Packs examples into rows of at most max_length tokens (first-fit decreasing, seeded tie order).

    Examples are never split across rows; attention and positions stay per example (see collate),
    so packing changes speed, not the loss.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -examples[i].length)  # stable: the shuffle decides ties
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = examples[i].length
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([i])
            room.append(max_length - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return [tuple(examples[i] for i in row) for row in rows]


def unpacked(examples: Sequence[Example]) -> list[Row]:
    """One example per row."""
    return [(e,) for e in examples]


def epoch_order(n: int, micro_batch_size: int, seed: int, epoch: int, world_size: int = 1,
                lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Shuffles row indices for one epoch and cuts them into micro-batches.

    With `lengths` (unpacked rows), micro-batches are grouped by length: the shuffled order is cut into
    windows of GROUP global batches (micro_batch_size x world_size), each window is sorted by length and
    cut, and the global batches are shuffled again. Every micro-batch then holds rows of similar length (little padding) while an
    epoch still sees every row once in a seeded random order of batches.

    The order depends only on (seed, epoch), so every process computes the same list and a run can
    be replayed. With several processes the permutation wraps around to a multiple of
    micro_batch_size * world_size (as torch's DistributedSampler does), so every process gets the
    same number of micro-batches and none waits forever in a gradient all-reduce.

    Returns:
        A list of micro-batches, each a list of row indices; process `rank` takes every
        world_size-th micro-batch starting at `rank`.
    """
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    if world_size > 1:
        chunk = micro_batch_size * world_size
        order += order[: (-len(order)) % chunk]
    if lengths is None:
        return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    # Grouped by length per *global* batch (micro x processes), so N processes x micro b see the same examples
    # per step as one process x N*b: the sort, the cut and the shuffle do not depend on how the batch is split.
    chunk = micro_batch_size * world_size
    window = GROUP * chunk
    order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lengths.__getitem__)]
    global_batches = [order[i : i + chunk] for i in range(0, len(order), chunk)]
    rng.shuffle(global_batches)  # long and short batches interleave; every process shuffles alike
    return [g[j : j + micro_batch_size] for g in global_batches for j in range(0, len(g), micro_batch_size)]


def eval_order(rows: Sequence[Row], batch_size: int) -> list[list[int]]:
    """Held-out batches grouped by length: the loss is the same in any order, and less padding is faster."""
    by_length = sorted(range(len(rows)), key=lambda i: sum(e.length for e in rows[i]))
    return [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]


def collate(rows: Sequence[Row], pad_id: int) -> dict:
    """Right-pads rows into tensors of shape [B, T]: input_ids, labels, position_ids, attention_mask.

    Without packing the attention mask is the usual [B, T] padding mask. With packing it is a
    block-diagonal causal mask [B, 1, T, T] (bool, True = may attend), position ids restart at 0 for
    every example, and the first token of each packed example gets no label: unpacked, nothing
    precedes it, so nothing may predict it from the previous example either.

    Preference pairs (packed or not) are laid out as a tree: [prompt, chosen, rejected], the rejected tokens seeing
    the prompt and themselves only, with positions that continue the prompt's, so the prompt is encoded once for
    both answers. `labels` then holds the chosen answers only; every answer token of both sides is listed in
    pair_rows / pair_cols (the position whose output predicts it: the first rejected token is predicted from the
    last prompt token, not from the token before it in the row), pair_targets and pair_index (2 * pair + side,
    side 0 chosen, 1 rejected), with `pairs` the number of pairs.
    """
    import torch

    width = max(sum(e.length for e in row) for row in rows)
    width = -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    paired = any(e.is_pair for row in rows for e in row)
    tree = paired or any(len(row) > 1 for row in rows)
    mask = torch.zeros((len(rows), 1, width, width) if tree else (len(rows), width), dtype=torch.bool if tree else torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril() if tree else None
    scored: list[tuple[int, int, int, int]] = []  # (row, predicting column, target token, 2 * pair + side)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, start : start + n] = torch.tensor(e.input_ids)
            labels[r, start : start + n] = torch.tensor(e.labels)
            if start > 0:
                labels[r, start] = IGNORE_INDEX
            positions[r, start : start + n] = torch.arange(n)
            if tree:
                mask[r, 0, start : start + n, start : start + n] = causal[:n, :n]
            else:
                mask[r, :n] = 1
            if e.is_pair:
                pair = len(scored) and scored[-1][3] // 2 + 1
                scored += [(r, start + j - 1, e.input_ids[j], 2 * pair) for j in range(max(e.branch, 1), n)
                           if e.labels[j] != IGNORE_INDEX]
                m, at = len(e.rejected_ids), start + n  # the rejected answer follows the chosen one in the row
                ids[r, at : at + m] = torch.tensor(e.rejected_ids)
                positions[r, at : at + m] = torch.arange(e.branch, e.branch + m)
                mask[r, 0, at : at + m, start : start + e.branch] = True
                mask[r, 0, at : at + m, at : at + m] = causal[:m, :m]
                scored += [(r, start + e.branch - 1 if j == 0 else at + j - 1, e.rejected_ids[j], 2 * pair + 1)
                           for j in range(m) if e.rejected_labels[j] != IGNORE_INDEX]
                n += m
            start += n
        if tree and start < width:
            # Padding rows attend to themselves only, so softmax never sees an all-masked row (NaN).
            mask[r, 0, start:, start:] = torch.eye(width - start, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    if paired:
        found = torch.tensor(scored, dtype=torch.long).reshape(-1, 4)
        batch.update(pair_rows=found[:, 0], pair_cols=found[:, 1], pair_targets=found[:, 2], pair_index=found[:, 3],
                     pairs=torch.tensor(int(found[-1, 3]) // 2 + 1 if len(found) else 0))
    return batch
