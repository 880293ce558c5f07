"""Training-engine options: schedulers, optimizers, precision, gradient checkpointing, early stopping, secrets."""

import json
import subprocess
import sys

import pytest
import torch

from llamatune.errors import RecipeError
from llamatune.memory import find_tcmalloc
from llamatune.recipe import load_recipe
from llamatune.train.loop import train

FIXED = ["lora.dropout=0.0", "data.packing=false", "train.warmup_ratio=0.25", "train.max_steps=4"]


def lrs(run_dir):
    return [json.loads(l)["lr"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]


def test_schedulers_shape_the_learning_rate(tiny_recipe, tmp_path):
    got = {}
    for name in ("cosine", "linear", "constant"):
        train(load_recipe(tiny_recipe, FIXED + [f"train.scheduler={name}"]), "t", run_dir=tmp_path / name)
        got[name] = lrs(tmp_path / name)
    assert got["constant"] == [0.0, 5e-3, 5e-3, 5e-3]  # one warmup step, then flat
    assert got["linear"] == pytest.approx([0.0, 5e-3, 5e-3 * 2 / 3, 5e-3 / 3])
    assert got["cosine"][1] == pytest.approx(5e-3) and got["linear"][2] < got["cosine"][2]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_adapter(tiny_recipe, tmp_path, dropout):
    """Recomputed layers draw the same LoRA dropout masks (checkpointing restores the generator's state)."""
    def adapter(flag, name):
        sets = FIXED + [f"train.gradient_checkpointing={flag}", f"lora.dropout={dropout}"]
        model = train(load_recipe(tiny_recipe, sets), "t", run_dir=tmp_path / name).model
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter("false", "a"), adapter("true", "b")
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-7)


def test_8bit_optimizer_and_bf16_autocast_train_on_cpu(tiny_recipe, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = train(load_recipe(tiny_recipe, FIXED + ["train.optimizer=adamw_8bit"]), "t", run_dir=tmp_path / "o")
    assert type(result.summary) is dict and result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    # accelerate keeps one precision per process: bf16 runs in its own process
    cmd = [sys.executable, "-m", "llamatune", "train", str(tiny_recipe), "--run-dir", str(tmp_path / "b"),
           *[a for s in FIXED + ["train.precision=bf16"] for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    bf16 = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert abs(bf16["eval_loss_before"] - result.summary["eval_loss_before"]) < 0.05  # autocast, same model
    # the `llamatune` program re-executes a training run under tcmalloc when the system has it
    assert bf16["allocator"] == ("tcmalloc" if find_tcmalloc() else "glibc")


def test_fp16_without_a_gpu_is_a_recipe_error(tiny_recipe, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RecipeError, match="fp16 autocast needs a CUDA GPU"):
        train(load_recipe(tiny_recipe, ["train.precision=fp16"]), "t", run_dir=tmp_path / "x")


def test_early_stopping_after_patience(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe, FIXED + ["train.max_steps=10", "train.lr=1e-9", "train.eval_every=1",
                                               "train.early_stopping_patience=2"])
    summary = train(recipe, "t", run_dir=tmp_path / "e").summary
    assert summary["steps"] == 3 and summary["planned_steps"] == 10  # evals at 1 (best), 2, 3 -> stop
    with pytest.raises(RecipeError, match="early_stopping_patience needs eval_every"):
        load_recipe(tiny_recipe, ["train.early_stopping_patience=2"])


def test_tokens_in_the_environment_never_reach_the_run_directory(tiny_recipe, tmp_path, monkeypatch, capsys):
    secret = "hf_llamatuneFAKEtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    train(load_recipe(tiny_recipe, FIXED + ["train.save_every=2"]), "t", run_dir=tmp_path / "s")
    for path in (tmp_path / "s").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in capsys.readouterr().out


def test_tensorboard_mirrors_metrics(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_recipe(tiny_recipe, FIXED + ["train.tensorboard=true"]), "t", run_dir=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 4]
