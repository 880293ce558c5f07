"""Progress on every long phase: in a log (no terminal) a line at least every LLAMATUNE_PROGRESS_S seconds, also
inside one slow step or one opaque call; tokens/s labelled recent vs average; an ETA that counts held-out passes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from llamatune.progress import QUIET_ENV, Phase
from llamatune.train.checkpoint import FAULT_ENV
from llamatune.train.progress import TrainProgress

STAMP = re.compile(r"^\d\d:\d\d:\d\d ")


def _log() -> tuple[io.StringIO, Console]:
    log = io.StringIO()
    return log, Console(file=log, width=300)  # a file: not a terminal


def test_train_lines_first_every_last_and_inside_a_slow_step(monkeypatch):
    """log_every larger than the run still prints the first and last step; a slow step prints a heartbeat while
    it runs and its own line at once when the quiet interval has passed; rates are labelled."""
    monkeypatch.setenv(QUIET_ENV, "0.3")
    log, console = _log()
    with TrainProgress(5, console, every=10) as progress:
        for step in range(1, 6):
            time.sleep(0.8 if step == 3 else 0.01)  # step 3 is slow: past the quiet interval twice
            progress.update(step, 1.0, 1e-3, tokens=50, seconds=0.8 if step == 3 else 0.01)
    lines = log.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines), lines
    finished = [line.split()[2] for line in lines if " loss " in line]
    assert finished == ["1/5", "3/5", "5/5"], lines
    assert any("step 3/5 running" in line for line in lines), lines
    first = next(line for line in lines if " loss " in line)
    assert "tok/s recent (last 1 steps), " in first and " average" in first


def test_rates_recent_average_and_step():
    _, console = _log()
    with TrainProgress(30, console) as progress:
        for step in range(1, 13):
            progress.update(step, 1.0, 1e-3, tokens=100 if step < 3 else 1000, seconds=1.0)
        rates = progress.rates()
    assert rates["tokens_per_s_step"] == 1000.0
    assert rates["tokens_per_s_recent"] == 1000.0  # the last 10 steps, all at 1000/s
    assert rates["tokens_per_s"] < 1000  # the average includes the two slow starts


def test_eta_counts_the_held_out_passes_still_to_come():
    _, console = _log()
    with TrainProgress(10, console, eval_every=4, final_eval=True) as progress:
        progress.held_out_pass(5.0)  # as if the step-0 pass took 5 s (before the loop: not step time)
        progress.update(1, 1.0, 1e-3, tokens=10, seconds=0.0)
        eta = progress.eta()
    # 9 steps at ~0 s each + passes at steps 4 and 8 + the final pass, 5 s each
    assert 14.9 < eta < 16.0


def test_a_phase_prints_while_an_opaque_call_runs(monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "0.5")
    log, console = _log()
    with Phase(console, "model: loading x"):
        time.sleep(2.9)  # one call that reports nothing itself
    lines = log.getvalue().splitlines()
    assert all(STAMP.match(line) for line in lines)
    running = [line for line in lines if "model: loading x: still running" in line]
    assert len(running) >= 2, lines  # the first after 2 s, then every 0.5 s
    assert "model: loading x: done, in 3s" in lines[-1]


def test_a_quick_phase_prints_nothing_and_a_counted_one_shows_its_eta(monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "0.2")
    log, console = _log()
    with Phase(console, "quick", 3, "batches") as phase:
        phase.advance(3)
    assert log.getvalue() == ""
    printed: list[str] = []
    with Phase(printed.append, "held-out pass at step 0", 6, "batches") as phase:
        for _ in range(6):
            time.sleep(0.45)
            phase.advance()
    assert any(re.search(r"held-out pass at step 0: [1-5]/6 batches, \ds elapsed, eta \ds", line) for line in printed)
    assert printed[-1].endswith("held-out pass at step 0: done, 6 batches in 3s")


def test_a_failed_phase_says_so(monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "0.2")
    printed: list[str] = []
    with pytest.raises(ValueError):
        with Phase(printed.append, "merge: writing"):
            time.sleep(2.3)
            raise ValueError("disk full")
    assert printed[-1].endswith("merge: writing: stopped after 2s")


def _timed_lines(args: list[str], fault: str) -> tuple[str, list[float], float]:
    """Runs `llamatune ARGS` with its output going to a pipe, the quiet interval 1 s and FAULT making one point slow.

    Returns:
        (the output, when each line arrived, when the command started)
    """
    env = {**os.environ, QUIET_ENV: "1", FAULT_ENV: fault}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "llamatune", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    arrived: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: arrived.extend((time.monotonic(), line.rstrip()) for line in proc.stdout))
    reader.start()
    assert proc.wait(300) == 0, "\n".join(line for _, line in arrived)
    reader.join(10)
    text = "\n".join(line for _, line in arrived)
    times = [at for at, _ in arrived]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # 1 s interval + scheduling slack on a loaded 2-core machine; without the heartbeat each slow point is silent
    assert max(gaps) < 2.5, (max(gaps), text)
    assert times[0] - started < 60, text  # the first line within a minute of the start, imports included
    return text, times, started


def test_a_training_run_in_a_log_is_never_quiet(tiny_recipe, tmp_path):
    """Acceptance: `llamatune train` with its output going to a pipe prints a line at least every quiet interval
    from its first line to its last, through a step made slow on purpose (4 s, the interval 1 s)."""
    text, _, _ = _timed_lines(["train", str(tiny_recipe), "--run-dir", str(tmp_path / "run"), "--set", "train.log_every=10"],
                              "slow:4:micro:2:0")
    assert "step 2/4 running" in text and "step 1/4  loss" in text and "step 4/4  loss" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["tokens_per_s_recent"] > 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in steps if "loss" in m]
    assert logged and all({"tokens_per_s", "tokens_per_s_recent", "tokens_per_s_step"} <= set(m) for m in logged)
    assert all("eval_s" in m for m in steps if "eval_loss" in m)


def test_eval_merge_and_bench_in_a_log_are_never_quiet(tiny_recipe, tmp_path):
    """Acceptance, the other long commands: eval (per batch), merge (reference logits, parity) and bench (its steps),
    each with one point made slow."""
    from typer.testing import CliRunner

    from llamatune.cli import app

    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", str(tiny_recipe), "--run-dir", str(run)]).exit_code == 0
    text, _, _ = _timed_lines(["eval", str(run), "--batch-size", "1", "--limit", "3", "--no-generate"], "slow:1.5:eval:batch")
    assert re.search(r"^\d\d:\d\d:\d\d eval tuned: [12]/3 examples, \d+s elapsed, eta \d+s$", text, re.M), text
    assert re.search(r"eval tuned: done, 3 examples in \d+s", text), text
    text, _, _ = _timed_lines(["merge", str(run)], "slow:0.7:merge:reference")
    assert "merge: reference logits of base + adapter, layer by layer: done, 2 layers" in text, text
    text, _, _ = _timed_lines(["bench", str(tiny_recipe), "--steps", "3"], "slow:3:micro:2:0")
    assert "step 2/3 running" in text, text


def test_no_eval_before_skips_the_step_0_pass(tiny_recipe, tmp_path):
    from typer.testing import CliRunner

    from llamatune.cli import app

    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "--run-dir", str(tmp_path / "run"), "--no-eval-before"])
    assert result.exit_code == 0, result.output
    assert "held-out pass before training: skipped" in result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_before"] is None and summary["eval_loss_after"] is not None
    assert "eval_before: false" in summary["null_reasons"]["eval_loss_before"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l] == [4]
    assert "eval_before: false" in (run / "recipe.yaml").read_text()
