"""The vLLM adapter-serving check reads the peft adapter config."""

import json

from llamatune.artifacts.serving import vllm_lora_check


def check(tmp_path, **config):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"], **config}))
    return vllm_lora_check(tmp_path)


def test_plain_lora_is_servable_and_high_rank_needs_the_flag(tmp_path):
    assert check(tmp_path)["servable"] is True
    high = check(tmp_path, r=64)
    assert high["servable"] is True and "--max-lora-rank 64" in high["notes"][0]


def test_dora_modules_to_save_and_odd_targets_must_be_merged(tmp_path):
    assert check(tmp_path, use_dora=True)["servable"] is False
    assert check(tmp_path, modules_to_save=["score"])["servable"] is False
    odd = check(tmp_path, target_modules=["q_proj", "rotary_emb"])
    assert odd["servable"] is False and "rotary_emb" in odd["notes"][0]


def test_full_module_paths_are_judged_by_their_layer_kind(tmp_path):
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert check(tmp_path, target_modules=paths)["servable"] is True
