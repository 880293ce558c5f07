"""Checkpoints and resume: a run SIGKILLed anywhere and resumed ends bit-identical to an uninterrupted run.

The killed half runs as a real subprocess (`llamatune train`) that SIGKILLs itself at a named point
($LLAMATUNE_FAULT); the resumed half runs `--resume auto` on the same run directory.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamatune.checkpoint import FAULT_ENV
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.recipe import load_recipe
from llamatune.resume import EXIT_PREEMPTED
from llamatune.train import train

# dropout > 0, shuffling, warmup + cosine, accumulation 2: 24 examples / 2 per micro-batch / 2 = 6 steps per epoch
SETTINGS = ["lora.dropout=0.1", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=null",
            "train.epochs=2", "train.warmup_ratio=0.2", "train.save_every=1", "train.keep_last=2", "data.packing=false"]


def cli(recipe: Path, run_dir: Path, *extra: str, fault: str | None = None, wait: bool = True):
    env = dict(os.environ)
    if fault:
        env[FAULT_ENV] = fault
    args = [sys.executable, "-m", "llamatune", "train", str(recipe), "--run-dir", str(run_dir)]
    args += [a for s in SETTINGS for a in ("--set", s)] + list(extra)
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run (a subprocess too, so both halves of each comparison run the same way)."""
    from conftest import write_qa_recipe

    folder = tmp_path_factory.mktemp("resume")
    recipe = write_qa_recipe(folder, tiny_model_dir, 24, lora="  r: 4\n", train="  lr: 5.0e-3\n  seed: 3\n")
    result = cli(recipe, folder / "ref")
    assert result.returncode == 0, result.stdout + result.stderr
    return recipe, folder / "ref"


def assert_same_run(run: Path, ref: Path):
    got, want = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(ref / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert losses(run) == losses(ref)


@pytest.mark.parametrize("point", ["step:3", "step:9", "micro:7:0", "micro:4:0"],
                         ids=["mid-epoch-0", "mid-epoch-1", "epoch-boundary", "between-micro-batches"])
def test_sigkill_then_resume_is_exact(reference, tmp_path, point):
    recipe, ref = reference
    killed = cli(recipe, tmp_path / "run", fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = cli(recipe, tmp_path / "run", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    assert_same_run(tmp_path / "run", ref)


@pytest.mark.parametrize("point", ["after-adapter:4", "after-optimizer:4", "before-manifest:4", "before-rename:4",
                                   "during-retention:4"])
def test_kill_while_checkpointing_resumes_from_newest_complete(reference, tmp_path, point):
    recipe, ref = reference
    killed = cli(recipe, tmp_path / "run", fault=point)
    assert killed.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert all((tmp_path / "run" / "checkpoints" / name / "manifest.json").is_file() for name in visible)
    resumed = cli(recipe, tmp_path / "run", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "run", ref)
    final = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert final == ["step-00000011", "step-00000012"]  # retention: keep_last 2, no staging leftovers


@pytest.mark.parametrize("sig,extra", [(signal.SIGTERM, []), (signal.SIGINT, []), (signal.SIGUSR1, ["--save-on-signal", "USR1"])],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1-slurm"])
def test_signal_saves_a_checkpoint_exits_75_and_resumes_exactly(reference, tmp_path, sig, extra):
    recipe, ref = reference
    proc = cli(recipe, tmp_path / "run", "--set", "train.save_every=100", *extra, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out
    assert f"stopped by {sig.name} at step" in out and "--resume auto" in out, out[-500:]
    saved = [p for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file()
    resumed = cli(recipe, tmp_path / "run", "--resume", "auto", "--set", "train.save_every=100")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "run", ref)


def test_corrupt_checkpoint_is_skipped_by_auto_and_named_when_explicit(reference, tmp_path):
    recipe, ref = reference
    assert cli(recipe, tmp_path / "run", fault="step:5").returncode == -signal.SIGKILL
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    (newest / "optimizer.pt").write_bytes(b"garbage")
    explicit = cli(recipe, tmp_path / "run", "--resume", str(newest))
    assert explicit.returncode == 1 and "optimizer.pt does not match its checksum" in explicit.stderr + explicit.stdout
    auto = cli(recipe, tmp_path / "run", "--resume", "auto")
    assert auto.returncode == 0 and f"skipping {newest.name}" in auto.stdout
    assert_same_run(tmp_path / "run", ref)


def test_changed_recipe_or_data_refuses_to_resume(reference, tmp_path):
    recipe, _ = reference
    assert cli(recipe, tmp_path / "run", fault="step:2").returncode == -signal.SIGKILL
    changed = cli(recipe, tmp_path / "run", "--resume", "auto", "--set", "train.lr=0.1")
    assert changed.returncode == 2 and "train.lr: 0.005 → 0.1" in changed.stdout + changed.stderr
    forced = cli(recipe, tmp_path / "run", "--resume", "auto", "--set", "train.lr=0.1", "--force-resume")
    assert forced.returncode == 0, forced.stdout + forced.stderr


def test_nan_steps_are_skipped_then_abort_with_a_checkpoint(reference, tmp_path, monkeypatch):
    recipe, _ = reference
    monkeypatch.setenv(FAULT_ENV, "nan-loss:2")
    one = train(load_recipe(recipe, SETTINGS), "r", run_dir=tmp_path / "one")
    assert one.summary["skipped_steps"] == 1  # skipped, counted, run completes
    monkeypatch.setenv(FAULT_ENV, "nan-loss:3")
    with pytest.raises(LlamatuneError, match=r"1 consecutive steps had a NaN/Inf loss.*checkpoint .*step-00000003"):
        train(load_recipe(recipe, SETTINGS + ["train.max_bad_steps=1"]), "r", run_dir=tmp_path / "two")


def test_resume_auto_without_a_run_name_is_exit_2(reference, tmp_path):
    recipe, _ = reference
    with pytest.raises(RecipeError, match="--resume auto needs to know the run"):
        train(load_recipe(recipe, SETTINGS), "r", resume="auto")


def test_second_signal_exits_at_once_without_a_visible_partial_checkpoint(reference, tmp_path):
    recipe, _ = reference
    proc = cli(recipe, tmp_path / "run", "--set", "train.save_every=100", wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (128 + signal.SIGTERM, EXIT_PREEMPTED), out  # at once, or the save had already finished
    folder = tmp_path / "run" / "checkpoints"
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.exists() else []
    assert all((p / "manifest.json").is_file() for p in visible)
