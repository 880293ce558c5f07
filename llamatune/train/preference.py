"""Preference losses on LoRA: DPO (sigmoid, IPO, SimPO) and ORPO, as functions of per-answer log-probabilities.

A batch of pairs (data/batches.collate) holds each prompt once with its chosen and rejected answers after it; one
forward scores every answer token of both (train/loss.token_losses). The reference model of DPO is the model
as it starts (for a fresh adapter, whose B matrices are zero, exactly the base model; with model.adapter, that
adapter or, reference: base, the base with it disabled): its log-probs are computed once, before the first
step, and kept in the run directory (reference_logps.pt), so training holds one model and runs one forward and
backward per batch, and a resumed run compares against the same reference.

Losses follow the papers and TRL's DPOTrainer / ORPOTrainer (tests/test_preference_train.py checks values and
gradients against TRL): for a pair with policy log-probs c, r and reference ones rc, rr,
- sigmoid: -(1 - e) log s(b h) - e log s(-b h), h = (c - rc) - (r - rr)  (DPO; e = label_smoothing)
- ipo: (h' - 1 / (2 b))^2 with h' the same margin of per-token log-probs (IPO, averaged as TRL does)
- simpo: -log s(b (c/|c| - r/|r|) - gamma), no reference (SimPO)
- orpo: NLL of the chosen answer - lambda log s(log odds(c/|c|) - log odds(r/|r|)), no reference (ORPO)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamatune.train.loss import token_losses


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each answer, and its token count: two [pairs, 2] tensors (column 0 chosen, 1 rejected).

    Also returns nothing else: the chosen answers' next-token loss is minus column 0.
    """
    pairs = int(batch["pairs"])
    logp = -token_losses(model, batch, batch["pair_rows"], batch["pair_cols"], batch["pair_targets"])
    index = batch["pair_index"]
    sums = torch.zeros(2 * pairs, dtype=torch.float32, device=logp.device).index_add(0, index, logp)
    counts = torch.zeros(2 * pairs, dtype=torch.float32, device=logp.device).index_add(
        0, index, torch.ones_like(logp))
    return sums.view(pairs, 2), counts.view(pairs, 2)


def dpo_losses(logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, loss: str, beta: float,
               label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and implicit rewards.

    Args:
        logps: [P, 2] summed policy log-probs (chosen, rejected).
        counts: [P, 2] answer token counts.
        reference: [P, 2] summed reference log-probs (unused by simpo).
        loss: sigmoid | ipo | simpo.

    Returns:
        losses [P], rewards [P, 2] (beta times the log-ratio to the reference; simpo: beta times the per-token
        log-prob), whose difference is the margin the loss pushes up.
    """
    if loss == "simpo":
        rewards = beta * logps / counts
        losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - simpo_gamma)
        return losses, rewards.detach()
    ratio = logps - reference
    rewards = beta * ratio
    if loss == "sigmoid":
        h = beta * (ratio[:, 0] - ratio[:, 1])
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss == "ipo":
        per_token = ratio / counts
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    return losses, rewards.detach()


def orpo_losses(logps: torch.Tensor, counts: torch.Tensor, orpo_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term per pair (lambda times minus log sigmoid of the log odds ratio) and the log odds ratio.

    The odds of an answer are p / (1 - p) with p its per-token (geometric mean) probability; log(1 - p) is
    computed as log(-expm1(log p)), exact near p = 1 where 1 - exp underflows.
    """
    mean = logps / counts
    log_odds = (mean[:, 0] - mean[:, 1]) - (torch.log(-torch.expm1(mean[:, 0])) - torch.log(-torch.expm1(mean[:, 1])))
    return -orpo_lambda * F.logsigmoid(log_odds), log_odds.detach()
