"""Checkpoints and resume: a run SIGKILLed anywhere and resumed ends bit-identical to an uninterrupted run.

The killed half runs as a real subprocess (`llamatune train`) that SIGKILLs itself at a named point
($LLAMATUNE_FAULT), or that the test SIGKILLs at random instants; the resumed half runs `--resume auto`
on the same run directory. Every run directory, whatever its path, must hold strict JSON only.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from conftest import assert_strict_json
from llamatune.train.checkpoint import FAULT_ENV
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.recipe import load_recipe
from llamatune.train.resume import EXIT_PREEMPTED
from llamatune.train.loop import train

# fp32, dropout > 0, shuffling, warmup + cosine, accumulation 2: 24 examples / 2 per micro-batch / 2 = 6 steps per
# epoch; held-out evaluations at steps 4 and 8, so checkpoints carry a best held-out loss both before any (infinite,
# null in state.json) and after one.
SETTINGS = ["lora.dropout=0.1", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=null",
            "train.epochs=2", "train.warmup_ratio=0.2", "train.save_every=1", "train.keep_last=2", "data.packing=false",
            "train.precision=fp32", "train.eval_every=4"]
TOTAL_STEPS = 12


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
    # What a kill in the middle of deleting an old checkpoint (retention) leaves: some files, no manifest.
    half_deleted = tmp_path / "run" / "checkpoints" / "step-00000001"
    half_deleted.mkdir(exist_ok=True)
    (half_deleted / "optimizer.pt").write_bytes(b"left over")
    resumed = cli(recipe, tmp_path / "run", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "run", ref)
    final = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert final == ["step-00000011", "step-00000012"]  # retention: keep_last 2, no staging or half-deleted leftovers
    assert_strict_json(tmp_path / "run")


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
    assert_strict_json(tmp_path / "run")
    resumed = cli(recipe, tmp_path / "run", "--resume", "auto", "--set", "train.save_every=100")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "run", ref)
    assert_strict_json(tmp_path / "run")


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
    logged = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    skipped = next(r for r in logged if r["step"] == 2 and "lr" in r)
    assert skipped["loss"] is None and skipped["null_reasons"] == {"loss": "not a finite number: nan"}
    assert_strict_json(tmp_path / "one")
    monkeypatch.setenv(FAULT_ENV, "nan-loss:3")
    with pytest.raises(LlamatuneError, match=r"1 consecutive steps had a NaN/Inf loss.*checkpoint .*step-00000003"):
        train(load_recipe(recipe, SETTINGS + ["train.max_bad_steps=1"]), "r", run_dir=tmp_path / "two")
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["loss"] is None and "loss" in state["null_reasons"]  # the NaN step it stopped on
    assert_strict_json(tmp_path / "two")


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


def test_kill_inside_the_first_checkpoint_save_then_auto_starts_fresh(reference, tmp_path):
    """Killed before any checkpoint is complete, `--resume auto` (a requeue loop) starts over instead of failing."""
    recipe, ref = reference
    run = tmp_path / "run"
    killed = cli(recipe, run, fault="before-manifest:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == [".staging-step-00000001"]
    resumed = cli(recipe, run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    said = [line for line in resumed.stdout.splitlines() if line.startswith("--resume auto:")]
    assert said == [f"--resume auto: {run} has no complete checkpoint (found checkpoints/.staging-step-00000001 "
                    "(unfinished save), data_manifest.json, metrics.jsonl, recipe.yaml); starting from step 0 in the "
                    "same directory"], resumed.stdout
    assert_same_run(run, ref)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000011", "step-00000012"]
    assert_strict_json(run)


def test_resume_auto_on_a_finished_run_trains_nothing_and_exits_0(reference, tmp_path):
    recipe, ref = reference
    run = shutil.copytree(ref, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = cli(recipe, run, "--resume", "auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip() == (f"--resume auto: {run} holds a finished run (summary.json and adapter/, step "
                                    f"{TOTAL_STEPS} of {TOTAL_STEPS}); nothing to train")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resumed_at_its_last_step_writes_the_last_loss_and_no_speed(reference, tmp_path):
    """Killed after its final checkpoint but before summary.json, a run resumed at step N of N trains no step:
    its summary keeps the last step's loss (not NaN) and writes no tokens/s (not all tokens over no time)."""
    recipe, ref = reference
    quiet = Console(quiet=True)
    first = train(load_recipe(recipe, SETTINGS), "r", run_dir=tmp_path / "run", console=quiet)
    (tmp_path / "run" / "summary.json").unlink()  # as if killed while writing the artifacts
    again = train(load_recipe(recipe, SETTINGS), "r", run_dir=tmp_path / "run", console=quiet, resume="auto")
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["resumed_from_step"] == TOTAL_STEPS and written["steps"] == TOTAL_STEPS
    assert written["final_train_loss"] == first.summary["final_train_loss"] == losses(ref)[TOTAL_STEPS]
    assert written["tokens_per_s"] is None and written["tokens"] == first.summary["tokens"]
    reason = f"no step ran in this session: resumed at step {TOTAL_STEPS} of {TOTAL_STEPS}"
    assert written["null_reasons"] == {"tokens_per_s": reason, "tokens_per_s_recent": reason}
    assert again.summary["eval_loss_after"] == first.summary["eval_loss_after"]
    assert_strict_json(tmp_path / "run")


def test_a_run_that_stopped_early_does_not_train_on_when_resumed(reference, tmp_path):
    """Early stopping at step 4 (checkpoint 4 written), killed before summary.json: the resumed run ends at 4 too."""
    recipe, _ = reference
    settings = SETTINGS + ["train.eval_every=2", "train.early_stopping_patience=1", "train.lr=1.0e-9"]
    quiet = Console(quiet=True)
    first = train(load_recipe(recipe, settings), "r", run_dir=tmp_path / "run", console=quiet)
    assert first.summary["steps"] == 4  # evaluations at 2 (first, an improvement) and 4 (none): patience 1
    (tmp_path / "run" / "summary.json").unlink()
    again = train(load_recipe(recipe, settings), "r", run_dir=tmp_path / "run", console=quiet, resume="auto")
    assert again.summary["steps"] == 4 and again.summary["resumed_from_step"] == 4


class _Lines:
    """Collects a subprocess's output lines with the time each arrived (a thread reads the pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, predicate, timeout: float = 120) -> float | None:
        """Time of the first line matching `predicate`, or None if the process ended without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if predicate(line):
                    return at
            if self.proc.poll() is not None:
                self._thread.join(5)
                hits = [at for at, line in self.lines if predicate(line)]
                return hits[0] if hits else None
            time.sleep(0.002)
        raise AssertionError(f"no matching line in {timeout}s: {self.lines[-5:]}")


def _reached(step: int):
    """Matches the progress line of any step >= `step` (`step 3/12 ...`), or, for 0, the data line printed just
    before the run directory is set up (fresh start) or the checkpoint restored (resume)."""
    def match(line: str) -> bool:
        if step == 0:
            return line.startswith("data ")
        return (step_of(line) or 0) >= step
    return match


def step_of(line: str) -> int | None:
    """The step of a finished-step progress line (`03:12:45 step 3/12  loss ...`), None for any other line (the
    heartbeat `step 4/12 running` included)."""
    words = line.split()
    return int(words[2].split("/")[0]) if len(words) > 3 and words[1] == "step" and words[3] == "loss" else None


def _where(run: Path) -> str:
    """What a kill left behind, in a few words."""
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    complete = [n for n in names if n.startswith("step-") and (folder / n / "manifest.json").is_file()]
    staging = [n for n in names if n.startswith(".staging-")]
    return (f"newest checkpoint {complete[-1] if complete else 'none'}"
            + (f", killed inside the save of {staging[0].removeprefix('.staging-')}" if staging else ""))


def test_sigkill_at_random_instants_then_resume_auto_until_done_is_exact(reference, tmp_path):
    """Ten SIGKILLs, each of a fresh `--resume auto` process (a Slurm requeue loop), at seeded random instants
    spread over the whole run: one while starting up, then nine at steps spread over the 12, each a random
    fraction of a step after that step's progress line, so that a kill lands in the step's checkpoint save
    (save_every 1), its retention or the next step's compute. Then one more `--resume auto` runs to the end:
    the adapter is torch.equal to the uninterrupted run's, with the same per-step losses."""
    recipe, ref = reference
    rng = random.Random(1408)
    # Anchors 0..10: the data line (0, just before the run directory is set up or the checkpoint restored) or
    # step N's line; never the last step, so every kill has a step left to interrupt.
    plan = [("launch", rng.uniform(0.3, 5.0))] + [(step, rng.random()) for step in sorted(rng.sample(range(TOTAL_STEPS - 1), 9))]
    elapsed = [r["elapsed_s"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "elapsed_s" in r]
    step_s = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)  # a step with its checkpoint save; remeasured below
    run, record = tmp_path / "run", []
    for number, (anchor, fraction) in enumerate(plan, 1):
        proc = cli(recipe, run, "--resume", "auto", wait=False)
        lines = _Lines(proc)
        if anchor == "launch":
            began, delay = time.monotonic(), fraction
        else:
            began, delay = lines.wait_for(_reached(anchor)), fraction * step_s
        if began is not None:
            time.sleep(max(0.0, began + delay - time.monotonic()))
        proc.kill()
        proc.wait(60)
        lines._thread.join(5)
        steps = [(at, line.split()[2]) for at, line in lines.lines if step_of(line) is not None]
        if len(steps) > 2:  # this machine's step time right now: the delays follow its load
            step_s = (steps[-1][0] - steps[0][0]) / (len(steps) - 1)
        what = ("after launch" if anchor == "launch" else f"after the step {anchor} line" if anchor else
                "after the data line")
        record.append(f"kill {number}: {delay * 1000:.0f} ms {what} (last step printed: "
                      f"{steps[-1][1] if steps else 'none'}) → exit {proc.returncode}, {_where(run)}")
        assert proc.returncode == -signal.SIGKILL, "\n".join(record + [line for _, line in lines.lines[-15:]])
    story = "\n".join(record)
    final = cli(recipe, run, "--resume", "auto")
    assert final.returncode == 0, story + "\n" + final.stdout + final.stderr
    try:
        assert_same_run(run, ref)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000011", "step-00000012"]
        assert_strict_json(run)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nkill instants (seed 1408):\n{story}") from None
    print("kill instants (seed 1408):\n" + story)
