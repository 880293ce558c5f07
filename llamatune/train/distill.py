"""Distillation losses on a teacher's cached top-k log-probs (train.method: distill).

The teacher pass (train/teacher.py) keeps, at every trained position, the teacher's k most likely tokens, their
log-probs at temperature T, and the log of the probability of every other token together (the tail). The student's
distribution is grouped the same way: its log-probs of those k tokens and the log of its own probability of all the
others. Both are then distributions over k + 1 outcomes, and the loss compares them:

- forward_kl: sum P (log P - log Q)   (KL(teacher || student))
- reverse_kl: sum Q (log Q - log P)   (KL(student || teacher))
- jsd:        (KL(P || M) + KL(Q || M)) / 2 with M = (P + Q) / 2

Grouping the tail is what makes the estimate honest: the student is still pushed to put on all other tokens
together no more mass than the teacher does, and by the log-sum inequality the grouped divergence is a lower bound
of the full one, equal to it when k is the vocabulary size (tests/test_distill.py checks both, and the gradient).
Renormalizing the top k instead (dropping the tail) would let the student keep any mass outside them.

The distillation term is multiplied by T^2 (Hinton et al.: softened gradients shrink by 1/T^2), and mixed with the
usual next-token loss on the labels: kd_ratio x KD + (1 - kd_ratio) x CE, both summed per trained token.
"""

from __future__ import annotations

import torch

from llamatune.train.loss import CHUNK_ELEMENTS, scored_outputs, trained_positions


def grouped_log_probs(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Log-probs of the `top` tokens and, last, of all other tokens together: [N, k + 1] ([N, k] when the k tokens
    are the whole vocabulary). `logits` [N, V] are already divided by the temperature, in float32."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits.gather(1, top) - lse
    if top.shape[1] >= logits.shape[1]:
        return picked
    rest = torch.logsumexp(logits.scatter(1, top, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([picked, rest], dim=1)


def divergence(teacher: torch.Tensor, student: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-position divergence [N] between grouped distributions given as log-probs [N, k(+1)].

    A teacher log-prob of -inf (a token or tail it gives no probability) contributes nothing to forward_kl: it is
    clamped so that 0 x log 0 = 0 without a NaN in the gradient.
    """
    p_log = teacher.clamp(min=-1e4)
    p = p_log.exp()
    if loss == "forward_kl":
        return (p * (p_log - student)).sum(-1)
    q = student.exp()
    if loss == "reverse_kl":
        return (q * (student - p_log)).sum(-1)
    m_log = torch.logaddexp(p_log, student) - torch.log(torch.tensor(2.0, device=student.device))
    return 0.5 * ((p * (p_log - m_log)).sum(-1) + (q * (student - m_log)).sum(-1))


def token_terms(logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor, teacher: torch.Tensor,
                temperature: float, kd_ratio: float, loss: str) -> tuple[torch.Tensor, ...]:
    """Per-token (mixed loss, cross-entropy, distillation loss, agrees with the teacher's top-1) of student
    logits [N, V] against labels [N] and the teacher's top tokens [N, k] with grouped log-probs [N, k(+1)]."""
    logits = logits.float()
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)
    kd = divergence(teacher, grouped_log_probs(logits / temperature, top), loss) * temperature**2
    agree = (logits.argmax(-1) == top[:, 0]).float()
    return (1 - kd_ratio) * ce + kd_ratio * kd, ce.detach(), kd.detach(), agree


class _LinearDistill(torch.autograd.Function):
    """token_terms of hidden @ weight.T, projected chunk by chunk: each chunk's gradient with respect to its
    hidden states is taken in the same pass (it depends on those rows only), so no [N, vocabulary] tensor outlives
    its chunk. weight is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, top, teacher, temperature, kd_ratio, loss):
        chunk = max(1, CHUNK_ELEMENTS // weight.size(0))
        n = hidden.size(0)
        mixed, ce, kd, agree = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4))
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                h = hidden[part].detach().requires_grad_(grad is not None)
                terms = token_terms(h @ weight.t(), targets[part], top[part], teacher[part], temperature, kd_ratio, loss)
                if grad is not None:
                    (grad[part],) = torch.autograd.grad(terms[0].sum(), h)
            for out, value in zip((mixed, ce, kd, agree), terms):
                out[part] = value.detach()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kd, agree)
        return mixed, ce, kd, agree

    @staticmethod
    def backward(ctx, upstream, *_):
        (grad,) = ctx.saved_tensors
        return (grad * upstream.to(grad.dtype)[:, None],) + (None,) * 7


def distill_terms(model, batch: dict, temperature: float, kd_ratio: float, loss: str) -> tuple[torch.Tensor, ...]:
    """Per trained token of the batch (row-major, the order of the teacher's cache): mixed loss (differentiable),
    cross-entropy, distillation loss and top-1 agreement. batch["teacher_top"] [N, k] and batch["teacher_logp"]
    [N, k(+1)] come from Distill.attach."""
    rows, cols, targets = trained_positions(batch["labels"])
    top, teacher = batch["teacher_top"], batch["teacher_logp"]
    if top.shape[0] != targets.numel():
        raise RuntimeError(f"the teacher's cache has {top.shape[0]} positions for a batch with {targets.numel()} trained "
                           "tokens: it was computed for other data")
    outputs, head = scored_outputs(model, batch, rows, cols)
    if head is None:
        return token_terms(outputs, targets, top, teacher, temperature, kd_ratio, loss)
    return _LinearDistill.apply(outputs, head, targets, top, teacher, temperature, kd_ratio, loss)
