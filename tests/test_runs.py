"""`llamatune runs` and `llamatune runs compare`: what run directories say about themselves, damaged ones included."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train.loop import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two finished runs of the same recipe, one with lr 1e-3 and one with 3e-3, in one runs folder."""
    from conftest import qa_rows, write_jsonl

    folder = tmp_path_factory.mktemp("runs")
    write_jsonl(folder / "train.jsonl", qa_rows(16))
    write_jsonl(folder / "eval.jsonl", qa_rows(4, offset=100))
    recipe = folder / "r.yaml"
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\nlora:\n  r: 4\ndata:\n  train:\n    path: train.jsonl\n"
                      "    prompt: '{question}'\n    response: '{answer}'\n  eval:\n    path: eval.jsonl\n"
                      "    prompt: '{question}'\n    response: '{answer}'\ntrain:\n  precision: fp32\n  max_steps: 3\n"
                      "  save_every: 1\n")
    runs = folder / "runs"
    for name, lr in (("slow-lr", "1.0e-3"), ("fast-lr", "3.0e-3")):
        train(load_recipe(recipe, [f"train.lr={lr}"]), name, run_dir=runs / name)
    return runs


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    """Tables one line per run (a narrow terminal folds cells; the 80-column layout is checked on its own)."""
    from llamatune.terminal import out

    monkeypatch.setattr(out, "_width", 200)


def _invoke(*args):
    result = CliRunner().invoke(app, ["runs", *map(str, args)])
    return result, " ".join(result.output.split())


def test_compare_shows_the_lr_difference_and_both_losses(two_runs):
    """Acceptance: two runs with different lr."""
    result, text = _invoke("compare", two_runs / "slow-lr", two_runs / "fast-lr")
    assert result.exit_code == 0, result.output
    assert "recipe differences" in text and "train.lr" in text and "0.001" in text and "0.003" in text
    summaries = [json.loads((two_runs / n / "summary.json").read_text()) for n in ("slow-lr", "fast-lr")]
    for s in summaries:
        assert f"{s['eval_loss_after']:.6g}" in text and f"{s['eval_loss_before']:.6g}" in text
    assert "model.path" not in text.split("results")[0]  # equal keys are not differences
    as_json = json.loads(CliRunner().invoke(app, ["runs", "compare", str(two_runs / "slow-lr"), str(two_runs / "fast-lr"),
                                                  "--json"]).output)
    assert [r["recipe"]["train.lr"] for r in as_json] == [1e-3, 3e-3]


def test_list_tells_finished_stopped_unstarted_and_damaged_runs_apart(two_runs, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(two_runs, folder)
    stopped = folder / "stopped"
    shutil.copytree(folder / "fast-lr", stopped)
    for part in ("summary.json",):
        (stopped / part).unlink()
    shutil.rmtree(stopped / "adapter")
    shutil.rmtree(stopped / "checkpoints" / "step-00000003")
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # torn by a kill mid-write: skipped, not an error
    (folder / "unstarted").mkdir()
    shutil.copy(folder / "fast-lr" / "recipe.yaml", folder / "unstarted" / "recipe.yaml")
    damaged = folder / "damaged"
    shutil.copytree(folder / "fast-lr", damaged)
    (damaged / "summary.json").write_text("{not json")
    (folder / "notes").mkdir()  # not a run: not listed
    result, text = _invoke(folder)
    assert result.exit_code == 0, result.output
    assert "finished" in text and "stopped at step 3, resumable from step 2" in text and "no step ran" in text
    assert "damaged: summary.json" in text and "notes" not in text and "sft lora r=4" in text and "3/3" in text
    listed = json.loads(CliRunner().invoke(app, ["runs", str(folder), "--json"]).output)
    assert {r["name"]: r["status"] for r in listed} == {
        "slow-lr": "finished", "fast-lr": "finished", "stopped": "stopped at step 3, resumable from step 2",
        "unstarted": "no step ran (failed or stopped at start-up)", "damaged": "damaged: summary.json"}
    summary = json.loads((folder / "slow-lr" / "summary.json").read_text())
    assert f"{summary['eval_loss_before']:.3f} → {summary['eval_loss_after']:.3f}" in text


def test_eval_headline_and_bad_arguments(two_runs, tmp_path):
    run = tmp_path / "evaluated"
    shutil.copytree(two_runs / "slow-lr", run)
    assert CliRunner().invoke(app, ["eval", str(run), "--compare", "base", "--no-generate"]).exit_code == 0
    result, text = _invoke(run)
    assert result.exit_code == 0 and "perplexity" in text and "(base " in text, result.output
    compared, text = _invoke("compare", run, two_runs / "fast-lr")
    assert compared.exit_code == 0 and "eval perplexity" in text
    for args, message in ((("compare", run), "give at least two run directories"),
                          (("compare", run, tmp_path), "is not a run directory (no recipe.yaml in it)"),
                          ((tmp_path / "nowhere",), "is not there; give a folder of run directories")):
        bad, text = _invoke(*args)
        assert bad.exit_code == 2 and message in text and "Traceback" not in bad.output, bad.output
    empty, text = _invoke(tmp_path / "evaluated" / "adapter")
    assert empty.exit_code == 0 and "no run directories in" in text


def test_the_list_fits_80_columns(two_runs, monkeypatch):
    from llamatune.terminal import out

    monkeypatch.setattr(out, "_width", 80)
    result = CliRunner().invoke(app, ["runs", str(two_runs)])
    assert result.exit_code == 0 and max(map(len, result.output.splitlines())) <= 80, result.output
    assert "slow-lr" in result.output and "finished" in result.output
