"""The training loss: summed next-token cross-entropy over label tokens only.

Two savings over `model(...).logits` + `F.cross_entropy` (same value and gradient, see
tests/test_speed_paths.py): positions whose next token is not trained (prompts, padding) never reach the
vocabulary projection (`logits_to_keep`), and when that projection is a frozen plain Linear (the usual
tied lm_head) it runs chunk by chunk with its gradient, so no [tokens, vocabulary] tensor is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from llamatune.data.encode import IGNORE_INDEX

# Logits per chunk (64 MiB in fp32). On a 2-core AVX2 CPU the [rows x 576] @ [576 x 49,152] product ran at
# 65-71 GFLOP/s with 170-row chunks (32 MiB), 82-100 with 341 rows: the head's forward and backward of a
# 1,260-label-token batch took 2.0-2.2 s against 1.4-1.7 s.
CHUNK_ELEMENTS = 1 << 24


class _Passthrough(nn.Module):
    """Stands in for lm_head during one forward, so the model returns final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def label_positions(labels: torch.Tensor):
    """Which positions predict a trained token, for `logits_to_keep`.

    Returns:
        keep [B, T] bool (position t is scored when token t+1 is trained); columns, the positions needed by at
        least one row (a 1-D logits_to_keep works on every supported transformers); chosen [B, len(columns)],
        each row's own positions among them; targets, the trained tokens in the same row-major order.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    columns = keep.any(0).nonzero().squeeze(1)
    return keep, columns, keep[:, columns], labels[:, 1:][keep[:, :-1]]


def summed_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, and their count.

    Shapes: input_ids/labels [B, T]; the prediction at t is scored against the label at t+1.
    """
    rows, cols, targets = trained_positions(batch["labels"])
    return token_losses(model, batch, rows, cols, targets).sum(), targets.numel()


def token_losses(model, batch: dict, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each scored token: the output at (rows[i], cols[i]) against targets[i].

    Only the columns some row scores reach the vocabulary projection, so a preference batch (whose rejected
    answers are predicted from positions that are not simply the previous column) and a plain one take the
    same path.

    Returns:
        [N] float32, differentiable with respect to the trainable parameters.
    """
    import torch.nn.functional as F

    outputs, head = scored_outputs(model, batch, rows, cols)
    if head is None:
        return F.cross_entropy(outputs.float(), targets, reduction="none")
    return linear_cross_entropy(outputs, head, targets, reduction="none")


def scored_outputs(model, batch: dict, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's output at each scored position (rows[i], cols[i]): final hidden states [N, H] and the frozen
    output projection [V, H] to apply to them chunk by chunk, or, when the head is not a frozen plain Linear,
    the logits [N, V] and None."""
    columns, where = torch.unique(cols, return_inverse=True)
    mask = batch["attention_mask"]
    # A [B, T] padding mask only hides right padding, which causal attention already keeps away from
    # real tokens: without it, SDPA takes its fused kernel. Packed rows keep their block-diagonal mask.
    inputs = dict(input_ids=batch["input_ids"], attention_mask=None if mask.dim() == 2 else mask,
                  position_ids=batch["position_ids"], logits_to_keep=columns)
    found = _frozen_head(model)
    if found is None:
        return model(**inputs).logits[rows, where], None  # [scored tokens, V]
    owner, head = found
    owner.lm_head = _Passthrough()
    try:
        hidden = model(**inputs).logits[rows, where]  # [scored tokens, H]
    finally:
        owner.lm_head = head
    return hidden, head.weight


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, targets) of every trained token, row-major: the output at (rows[i], cols[i]) predicts targets[i].
    The order every per-token quantity of a batch follows (losses, a teacher's cached targets)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return rows, cols, labels[:, 1:][keep]


def _frozen_head(model):
    """(the causal LM, its lm_head) when lm_head is a frozen, unsharded plain Linear; else None."""
    inner = getattr(model, "module", model)  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    head = getattr(inner, "lm_head", None)
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    if type(head) is not nn.Linear or head.weight.requires_grad or head.bias is not None:
        return None  # an adapted or quantized head, or one with a bias: the model computes it
    if head.weight.dim() != 2 or head.weight.shape[0] != vocab:
        return None  # sharded (FSDP): the full weight only exists inside the wrapped forward
    return inner, head


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(hidden_i @ weight.T, target_i) for each i, projected chunk by chunk; the gradient of each token's loss
    with respect to its hidden state is computed in the same pass (it depends on that row only), so no
    [N, vocab] tensor outlives its chunk. weight is frozen."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // weight.size(0))
        losses = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.t()).float()  # under autocast the matmul runs in bf16; softmax stays fp32
            lse = torch.logsumexp(logits, dim=-1)
            losses[start : start + chunk] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = torch.exp(logits.sub_(lse[:, None]))  # d CE / d logits = softmax - onehot
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype)[:, None], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` without materializing all logits.

    Args:
        hidden: [N, H] final hidden states of the positions that have a label.
        weight: [V, H] frozen output projection (lm_head).
        targets: [N] token ids.
        reduction: "sum" (a scalar: the summed, not averaged, loss) or "none" ([N], each token's loss).

    Returns:
        float32, differentiable with respect to hidden.
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for weight; it must be frozen")
    losses = _LinearCrossEntropy.apply(hidden, weight, targets)
    return losses.sum() if reduction == "sum" else losses
