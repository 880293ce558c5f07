"""Order examples into micro-batches and pad them into tensors."""

from __future__ import annotations

import random
from typing import Sequence

from llamatune.data.encode import IGNORE_INDEX, Example


def epoch_order(n: int, micro_batch_size: int, seed: int, epoch: int, world_size: int = 1) -> list[list[int]]:
    """Shuffles example indices for one epoch and cuts them into micro-batches.

    The order depends only on (seed, epoch), so every process computes the same list and a run can
    be replayed. With several processes the permutation wraps around to a multiple of
    micro_batch_size * world_size (as torch's DistributedSampler does), so every process gets the
    same number of micro-batches and none waits forever in a gradient all-reduce.

    Returns:
        A list of micro-batches, each a list of example indices; process `rank` takes every
        world_size-th micro-batch starting at `rank`.
    """
    order = list(range(n))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if world_size > 1:
        chunk = micro_batch_size * world_size
        order += order[: (-len(order)) % chunk]
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def eval_order(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Held-out batches grouped by length: the loss is the same in any order, and less padding is faster."""
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]


def collate(examples: Sequence[Example], pad_id: int) -> dict:
    """Right-pads a micro-batch into `input_ids`, `attention_mask`, `labels` tensors of shape [B, T]."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
