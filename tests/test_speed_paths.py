"""The speed paths change cost, not maths: the loss equals plain full-logits cross-entropy (value and
gradient), and FastDropout is inverted dropout with the requested rate."""

import pytest
import torch
import torch.nn.functional as F
from conftest import saved_tensor_bytes

from llamatune.data.batches import collate, pack, unpacked
from llamatune.data.encode import IGNORE_INDEX, Example
from llamatune.train.dropout import FastDropout, use_fast_dropout
from llamatune.train.loss import _frozen_head, linear_cross_entropy, summed_loss
from llamatune.schema import LoraSpec


def _examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, 200, (length,), generator=g).tolist()
        cut = length // 2  # first half prompt (no labels), second half answer
        out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * cut + ids[cut:]))
    return out


def _reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum"), int((targets != IGNORE_INDEX).sum())


@pytest.fixture
def lora_model(tiny_model_dir):
    from llamatune import model as models
    from llamatune.schema import ModelSpec, QuantizationSpec

    base = models.load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)), QuantizationSpec())
    return models.apply_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0), False, False).train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True])
def test_summed_loss_matches_full_logits_cross_entropy(lora_model, packed, monkeypatch):
    examples = _examples(6)
    rows = pack(examples, 64, seed=1) if packed else unpacked(examples)
    batch = collate(rows, pad_id=0)
    assert _frozen_head(lora_model) is not None  # the chunked projection is the path under test
    expected, n_expected = _reference(lora_model, batch)
    expected.backward()
    want = _grads(lora_model)
    lora_model.zero_grad()
    monkeypatch.setattr("llamatune.train.loss.CHUNK_ELEMENTS", 7 * 256)  # several chunks even on the tiny vocabulary
    got, n = summed_loss(lora_model, batch)
    got.backward()
    assert n == n_expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    for name, grad in _grads(lora_model).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-6)


def test_summed_loss_without_a_frozen_head_uses_the_model_logits(lora_model):
    inner = lora_model.get_base_model()
    inner.lm_head.weight.requires_grad_(True)  # an adapted/trained head: the chunked path must step aside
    batch = collate(unpacked(_examples(3)), pad_id=0)
    got, _ = summed_loss(lora_model, batch)
    expected, _ = _reference(lora_model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    got.backward()
    assert inner.lm_head.weight.grad is not None and inner.lm_head.weight.grad.abs().sum() > 0


def test_linear_cross_entropy_refuses_a_trainable_weight():
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))


def test_a_micro_batch_without_labels_gives_zero_loss(lora_model):
    example = Example(input_ids=[5, 6, 7], labels=[IGNORE_INDEX] * 3)
    got, n = summed_loss(lora_model, collate(unpacked([example]), pad_id=0))
    assert n == 0 and got.item() == 0.0


def test_fast_dropout_drops_at_the_requested_rate_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = FastDropout(0.1).train()(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted: survivors scaled by 1/(1-p)
    assert torch.equal(FastDropout(0.1).eval()(x), x)
    torch.manual_seed(3)
    a = FastDropout(0.3).train()(torch.ones(999))
    torch.manual_seed(3)
    assert torch.equal(a, FastDropout(0.3).train()(torch.ones(999)))  # seeded by torch's generator
    with pytest.raises(ValueError):
        FastDropout(1.0)
    x = torch.ones(1000, requires_grad=True)
    FastDropout(0.2).train()(x).sum().backward()  # gradient: 1/(1-p) where kept, 0 where dropped
    assert set(x.grad.unique().tolist()) <= {0.0, 1.25} and abs(float((x.grad == 0).float().mean()) - 0.2) < 0.05


def test_use_fast_dropout_replaces_peft_dropout_only(tiny_model_dir):
    from llamatune import model as models
    from llamatune.schema import ModelSpec, QuantizationSpec

    base = models.load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)), QuantizationSpec())
    model = models.apply_lora(base, LoraSpec(r=4, alpha=8, dropout=0.05), False, False)
    n = use_fast_dropout(model)
    assert n > 0 and n == sum(isinstance(m, FastDropout) for m in model.modules())
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())


def test_lean_blocks_give_the_same_loss_and_gradients(tiny_model_dir):
    """fp32: equal to the originals. bf16: as close to the fp32 result as the original bf16 blocks are."""
    from llamatune import model as models
    from llamatune.train.fused import use_lean_blocks
    from llamatune.schema import ModelSpec, QuantizationSpec

    def run(lean: bool, precision: str):
        torch.manual_seed(0)
        base = models.load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)), QuantizationSpec(), precision=precision)
        model = models.apply_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0), False, False).train()
        for name, p in model.named_parameters():  # B starts at zero: make the adapter's gradients flow everywhere
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        if lean:
            assert use_lean_blocks(model) == 2 * 2 + 1 + 2  # 2 norms per layer, the final norm, 1 MLP per layer
        batch = collate(unpacked(_examples(4)), pad_id=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = summed_loss(model, batch)
        loss.backward()
        return loss.detach(), _grads(model)

    (ref, ref_grads), (lean, lean_grads) = run(False, "fp32"), run(True, "fp32")
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6)
    (_, plain16), (_, lean16) = run(False, "bf16"), run(True, "bf16")
    error = lambda grads, name: float((grads[name] - ref_grads[name]).norm() / ref_grads[name].norm())  # noqa: E731
    for name in ref_grads:
        assert error(lean16, name) <= 1.5 * error(plain16, name) + 1e-3, name


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_bf16_training_with_lean_casts_lowers_the_loss_and_restores_peft_casting(tiny_recipe, tmp_path, quantization):
    """bf16 autocast runs LoRA inputs uncast (no fp32 copies); after training, peft's casting is back on."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.tuners_utils import BaseTunerLayer

    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    recipe = load_recipe(tiny_recipe, ["train.precision=bf16", f"quantization.mode={quantization}", "train.max_steps=6"])
    result = train(recipe, "t", run_dir=tmp_path / "run")
    assert result.summary["precision"] == "bf16"
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    layers = [m for m in result.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_gives_the_same_loss_and_gradients_and_keeps_less(tiny_model_dir, quantization, dropout):
    """One autograd node per LoRA layer (and one for SwiGLU + LoRA down projection): the same values and
    gradients as peft's layers (the same dropout masks: drawn from the same generator in the same order),
    without the dropped-out input copies and the MLP product."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    from llamatune import model as models
    from llamatune.train.fused import use_lean_blocks, use_lean_lora
    from llamatune.schema import ModelSpec, QuantizationSpec

    def run(lean: bool):
        torch.manual_seed(0)
        base = models.load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)),
                                QuantizationSpec(mode=quantization))
        model = models.apply_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout), quantization != "none").train()
        for name, p in model.named_parameters():  # B starts at zero: make the adapter's gradients flow everywhere
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        use_fast_dropout(model)
        use_lean_blocks(model)
        if lean:
            assert use_lean_lora(model) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
        batch = collate(unpacked(_examples(4)), pad_id=0)
        torch.manual_seed(1)
        (loss, _), saved = saved_tensor_bytes(model, lambda: summed_loss(model, batch))
        loss.backward()
        with torch.no_grad(), model.disable_adapter():  # the patched forward steps aside for the plain base
            base_logits = model(input_ids=batch["input_ids"]).logits
        return loss.detach(), _grads(model), saved, base_logits, batch["input_ids"].numel(), model.config

    ref, ref_grads, ref_saved, ref_base, tokens, config = run(False)
    lean, lean_grads, lean_saved, lean_base, _, _ = run(True)
    torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == lean_grads.keys() and len(ref_grads) == 2 * 2 * 7
    for name, grad in ref_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lean_base, ref_base)
    # Kept no more: silu(gate) * up, in every layer; with dropout, also the float copies of x * mask where
    # several adapters share one input: q/k/v (2 fewer), gate/up (1 fewer), and more where an input is kept anyway.
    saved_less = (ref_saved - lean_saved) / (config.num_hidden_layers * tokens * 4)  # floats per token and layer
    if quantization == "none" and dropout:
        assert saved_less >= config.intermediate_size + 3 * config.hidden_size, (ref_saved, lean_saved)
    elif quantization == "none":
        assert saved_less == config.intermediate_size, (ref_saved, lean_saved)
    else:  # on a 4-bit base the down projection is not fused, and bitsandbytes keeps its input itself
        assert lean_saved < ref_saved if dropout else lean_saved == ref_saved, (ref_saved, lean_saved)
