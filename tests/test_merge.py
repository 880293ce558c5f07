"""`llamatune merge`: parity with base+adapter, a plain transformers folder, atomic output, QLoRA gap."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from conftest import train_tiny_run

    folder = tmp_path_factory.mktemp("merge")
    return train_tiny_run(folder, tiny_model_dir), folder / "r.yaml"


def test_merge_matches_base_plus_adapter_and_loads_with_plain_transformers(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    result = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["merged_vs_unmerged"]["max_abs_logit"] <= 1e-4 and report["merged_vs_unmerged"]["greedy_agreement"] == 1.0
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "README.md"} <= {p.name for p in (tmp_path / "m").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert merged.generation_config.eos_token_id[0] == tok.eos_token_id and tok.chat_template
    base_ref = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_ref), run_dir / "adapter").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is item 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(merged.generate(ids, **kwargs), unmerged.generate(input_ids=ids, **kwargs))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "merged in fp32" in card and "License" in card
    again = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "m")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_bf16_merge_reports_its_drift(run, tmp_path):
    run_dir, _ = run
    result = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "b"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert 0 < report["merged_vs_unmerged"]["mean_kl"] <= 2e-2


def test_a_merge_killed_mid_write_leaves_nothing_and_reruns(run, tmp_path):
    run_dir, _ = run
    env = dict(os.environ, LLAMATUNE_FAULT="merge:after-weights")
    cmd = [sys.executable, "-m", "llamatune", "merge", str(run_dir), "--out", str(tmp_path / "m")]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "m").exists()
    env.pop("LLAMATUNE_FAULT")
    assert subprocess.run(cmd, env=env, capture_output=True, text=True).returncode == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the killed merge's staging folder is gone


def test_a_second_merge_into_the_same_folder_stops_and_leaves_the_first_ones_staging(run, tmp_path):
    from llamatune import lock

    run_dir, _ = run
    out = tmp_path / "m"
    with lock.hold(out, "merging"):  # the first writer (this process; a flock conflicts across open files)
        staging = tmp_path / ".m.partial"
        staging.mkdir()
        (staging / "model.safetensors").write_text("being written")
        second = CliRunner().invoke(app, ["merge", str(run_dir), "--out", str(out)])
        assert second.exit_code == 1 and f"pid {os.getpid()}" in second.output and "Traceback" not in second.output
        assert (staging / "model.safetensors").read_text() == "being written" and not out.exists()


def test_qlora_run_merges_into_full_precision_and_reports_the_gap(run, tmp_path):
    pytest.importorskip("bitsandbytes")
    _, recipe = run
    train(load_recipe(recipe, ["quantization.mode=nf4"]), "q", run_dir=tmp_path / "qrun")
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "qrun"), "--out", str(tmp_path / "qm")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "qm" / "merge_report.json").read_text())
    assert report["merged_vs_unmerged"]["max_abs_logit"] <= 1e-4  # merged == full-precision base + adapter
    assert report["trained_4bit_vs_merged"]["max_abs_logit"] > 1e-4  # and differs from the 4-bit training model
    assert "Trained on a 4-bit base" in (tmp_path / "qm" / "README.md").read_text()
