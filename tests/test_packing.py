"""Packing: several examples per row with no attention across them: the loss equals the unpacked loss."""

import pytest
import torch

from llamatune.data.batches import collate, pack, unpacked
from llamatune.data.encode import encode
from llamatune.model import load_tokenizer
from llamatune.train.loss import summed_loss


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    examples = [encode(tokenizer, f"Question number {i} about fever?" * (1 + i % 3), f"Answer {i}: rest and fluids." * (1 + i % 2))
                for i in range(9)]
    return model, examples, tokenizer.pad_token_id


def test_pack_fills_rows_without_splitting_examples(model_and_examples):
    _, examples, _ = model_and_examples
    rows = pack(examples, max_length=128, seed=0)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert all(sum(len(e.input_ids) for e in row) <= 128 for row in rows) and len(rows) < len(examples)


def test_packed_loss_equals_unpacked_loss(model_and_examples):
    model, examples, pad = model_and_examples
    with torch.no_grad():
        loss_u, n_u = summed_loss(model, collate(unpacked(examples), pad))
        rows = pack(examples, max_length=128, seed=0)
        batch = collate(rows, pad)
        assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        loss_p, n_p = summed_loss(model, batch)
    assert n_p == n_u
    torch.testing.assert_close(loss_p / n_p, loss_u / n_u, rtol=0, atol=1e-5)


def test_packing_without_the_block_mask_would_leak(model_and_examples):
    """Guards the test above: a plain causal mask over the packed row gives a different loss."""
    model, examples, pad = model_and_examples
    rows = pack(examples, max_length=128, seed=0)
    batch = collate(rows, pad)
    width = batch["input_ids"].shape[1]
    leaky = dict(batch, attention_mask=torch.ones(width, width, dtype=torch.bool).tril().expand(len(rows), 1, width, width).clone())
    with torch.no_grad():
        loss_ok, n = summed_loss(model, batch)
        loss_leak, _ = summed_loss(model, leaky)
    assert (loss_ok / n - loss_leak / n).abs() > 1e-4  # 10x the tolerance of the equivalence test
