"""Model references: local folder, hub id (through an offline HF cache), builtin names, LoRA targets."""

import shutil

import pytest

from llamatune.errors import RecipeError
from llamatune.model import apply_lora, classify, linear_module_names, load_base, resolve
from llamatune.schema import LoraSpec, ModelSpec, QuantizationSpec


def test_classify_each_kind(tmp_path, tiny_model_dir):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert classify(str(tiny_model_dir)) == "folder"
    assert classify(str(tmp_path / "m.gguf")) == "gguf"
    assert classify("smollm2-135m-instruct") == "builtin"
    assert classify("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    with pytest.raises(RecipeError, match="has no config.json"):
        classify(str(tmp_path))
    with pytest.raises(RecipeError, match="Did you mean 'smollm2-135m-instruct'"):
        classify("smollm2-135m")


def test_hub_id_loads_through_the_hub_code_path_offline(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id resolves through huggingface_hub's cache exactly as after a real download."""
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_CACHE at import; point the default cache at our fake one.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spec = ModelSpec(path="acme/tiny-llama")
    ref = resolve(spec)
    assert ref == "acme/tiny-llama"
    import llamatune.model as models

    streamed = []
    real = models._from_local
    monkeypatch.setattr(models, "_from_local", lambda *a: streamed.append(a[0]) or real(*a))
    model = load_base(ref, spec, QuantizationSpec())
    assert model.config.num_hidden_layers == 2 and model.config.use_cache is False
    # read a tensor at a time from the cached snapshot, like a local folder, and recorded under its hub id
    assert streamed == [snapshot] and model.name_or_path == "acme/tiny-llama"


def test_lora_target_typo_gets_suggestion(tiny_model_dir):
    spec = ModelSpec(path=str(tiny_model_dir))
    model = load_base(str(tiny_model_dir), spec, QuantizationSpec())
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    with pytest.raises(RecipeError) as info:
        apply_lora(model, LoraSpec(target_modules=("qproj", "v_proj")), quantized=False)
    assert info.value.problems == [
        "lora.target_modules.0: 'qproj' not in model; linear layers: down_proj, gate_proj, k_proj, o_proj, "
        "q_proj, up_proj, v_proj. Did you mean 'q_proj'?"
    ]


def test_nf4_gradients_unchanged_by_an_eval_pass(tiny_model_dir):
    """Regression: bitsandbytes repacked 4-bit weights for CPU inference during eval, after which
    backward skipped the base layers (wrong gradients, only a warning)."""
    import torch

    pytest.importorskip("bitsandbytes")
    spec = ModelSpec(path=str(tiny_model_dir))
    quant = QuantizationSpec(mode="nf4")
    torch.manual_seed(0)
    model = apply_lora(load_base(str(tiny_model_dir), spec, quant), LoraSpec(r=4, dropout=0.0), quantized=True)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 8, 11]])

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads()
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


@pytest.mark.parametrize("compute,precision,expected", [
    ("auto", "fp32", "float32"), ("auto", "bf16", "bfloat16"), ("float32", "bf16", "float32"), ("bfloat16", "fp32", "bfloat16"),
])
def test_nf4_compute_dtype_auto_follows_the_training_precision(tiny_model_dir, compute, precision, expected):
    """auto must not pick bf16 where training runs fp32: emulated bf16 matmuls are ~50x slower on AVX2 CPUs."""
    import torch

    pytest.importorskip("bitsandbytes")
    quant = QuantizationSpec(mode="nf4", compute_dtype=compute)
    model = load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)), quant, precision=precision)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.compute_dtype == getattr(torch, expected)
