"""`llamatune plan` against what autograd really keeps, and `llamatune bench` end to end on the tiny model."""

import json

import pytest
import torch
from conftest import saved_tensor_bytes
from typer.testing import CliRunner

from llamatune.train import plan as planning
from llamatune.cli import app
from llamatune.recipe import load_recipe


def _saved_bytes(model, batch, precision: str) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (parameters excluded)."""
    from llamatune.train.loss import summed_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return saved_tensor_bytes(model, lambda: summed_loss(model, batch))[1]


@pytest.mark.parametrize("precision,dropout,quantization", [("fp32", 0.05, "none"), ("fp32", 0.0, "none"),
                                                              ("bf16", 0.05, "none"), ("fp32", 0.05, "nf4")])
def test_activation_estimate_matches_the_saved_tensors(tiny_model_dir, tiny_recipe, precision, dropout, quantization):
    from transformers import AutoConfig

    from llamatune import model as models
    from llamatune.train.dropout import use_fast_dropout
    from llamatune.train.fused import use_lean_blocks, use_lean_lora
    from llamatune.schema import LoraSpec, ModelSpec, QuantizationSpec

    config = AutoConfig.from_pretrained(tiny_model_dir)
    base = models.load_base(str(tiny_model_dir), ModelSpec(path=str(tiny_model_dir)), QuantizationSpec(mode=quantization),
                            precision=precision)
    model = models.apply_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout), quantization != "none", False)
    use_fast_dropout(model)
    use_lean_blocks(model)
    use_lean_lora(model)
    model.train()
    B, T = 4, 96
    ids = torch.randint(5, 300, (B, T))
    labels = ids.clone()
    labels[:, : T // 2] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(B, T, dtype=torch.long),
             "position_ids": torch.arange(T).expand(B, T)}
    measured = _saved_bytes(model, batch, precision)
    s = planning.shape(config)
    per = planning.activation_bytes_per_token_layer(s, 2 if precision == "bf16" else 4, dropout > 0,
                                                    set(planning.linear_shapes(s)), r=4,
                                                    quantized=quantization != "none")
    estimated = per * B * T * s["layers"]
    assert 0.75 * measured <= estimated <= 1.25 * measured, (estimated, measured)


def test_plan_parts_follow_the_recipe(tiny_model_dir, tiny_recipe):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    device = planning.DEVICES["a100-80gb"]
    plan = lambda *sets: planning.estimate(load_recipe(tiny_recipe, ["train.precision=auto", *sets]), config, device, 128, 0)  # noqa: E731
    base = plan()
    assert base.precision == "bf16" and base.total == sum(base.parts.values()) and base.parts["weights"] > 0
    assert plan("train.micro_batch_size=8").parts["activations"] == 2 * base.parts["activations"]
    # 2 layers: checkpointing keeps layer inputs plus the one layer being recomputed
    assert plan("train.gradient_checkpointing=true").parts["activations"] < base.parts["activations"] / 1.5
    assert plan("quantization.mode=nf4").parts["weights"] < base.parts["weights"]
    assert plan("train.optimizer=adamw_8bit").parts["adapter + grads + optimizer"] < base.parts["adapter + grads + optimizer"]
    micro, accum = base.suggestion
    assert micro * accum >= 8 and micro <= 8  # the recipe's effective batch (4 x 2) is kept


def test_plan_and_bench_commands(tiny_model_dir, tiny_recipe):
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", str(tiny_recipe), "--device", "rtx4090-24gb"])
    assert planned.exit_code == 0, planned.output
    assert "activations" in planned.output and "suggested: train.micro_batch_size=" in planned.output
    wrong = runner.invoke(app, ["plan", str(tiny_recipe), "--device", "tpu"])
    assert wrong.exit_code == 2 and "not one of cpu" in wrong.output
    saved = tiny_recipe.parent / "numbers" / "bench.json"
    benched = runner.invoke(app, ["bench", str(tiny_recipe), "--steps", "3", "--save", str(saved)])
    assert benched.exit_code == 0, benched.output
    assert "tokens/s" in benched.output and "peak memory" in benched.output and "full recipe: 4 steps" in benched.output
    numbers = json.loads(saved.read_text())  # what scale.py reads: the printed numbers, as JSON
    assert numbers["full_steps"] == 4 and numbers["tokens_per_s"] > 0 and numbers["peak_memory_gib"] > 0
    again = runner.invoke(app, ["bench", str(tiny_recipe), "--steps", "3", "--save", str(saved)])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    assert not (tiny_recipe.parent / "runs").exists()  # bench leaves no run directory behind
    profiled = runner.invoke(app, ["bench", str(tiny_recipe), "--steps", "2", "--profile"])
    assert profiled.exit_code == 0, profiled.output
    assert "where the time went" in profiled.output and "aten::" in profiled.output


def test_plan_and_bench_give_the_same_estimate_for_the_same_recipe(tiny_recipe):
    """Each in a fresh process, as a user runs them: bench's 'plan estimated' is plan's total (they once differed by
    what each had imported before measuring the runtime)."""
    import re
    import subprocess
    import sys

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "llamatune", *args, str(tiny_recipe)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    planned = float(re.search(r"total\s*│\s*([\d.]+)", run("plan")).group(1))
    benched = float(re.search(r"plan estimated ([\d.]+) GiB", run("bench", "--steps", "2")).group(1))
    assert abs(planned - benched) <= 0.03, (planned, benched)  # RSS after the same imports: a few MB apart


def test_cpu_plan_adds_measured_temporaries_and_warns_about_the_system_allocator(tiny_model_dir, tiny_recipe, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    cpu = planning.Device("cpu", 16, False, gpu=False)
    plan = lambda: planning.estimate(load_recipe(tiny_recipe), config, cpu, 128, 0)  # noqa: E731
    monkeypatch.setattr(planning, "training_uses_tcmalloc", lambda: True)
    with_tcmalloc = plan()
    assert with_tcmalloc.parts["temporaries"] == int(planning.CPU_TEMPORARIES * with_tcmalloc.parts["activations"])
    assert not with_tcmalloc.notes
    assert "temporaries" not in planning.estimate(load_recipe(tiny_recipe), config, planning.DEVICES["a100-80gb"], 128, 0).parts
    monkeypatch.setattr(planning, "training_uses_tcmalloc", lambda: False)
    monkeypatch.setattr(planning.sys, "platform", "linux")
    assert any("system allocator" in note and "libtcmalloc-minimal4" in note for note in plan().notes)
