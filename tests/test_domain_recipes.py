"""The shipped domain recipes read the real public datasets (PubMedQA JSON mapping, MedQuAD XML,
LegalBench quoted TSV, TAT-QA nested JSON) through configuration alone, and train.

The datasets are not part of the project: the recipes find them through data.root (default: the
workplace's ../shared/datasets). Each test is skipped, with the reason, when they are absent. The
tiny model stands in for the builtin one so the whole set runs in seconds."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train import train

REPO = Path(__file__).resolve().parents[1]
DOMAIN = sorted((REPO / "recipes").glob("*/*.yaml"))


def needs_data(recipe: Path):
    root = load_recipe(recipe).data.root
    if root is None or not root.is_dir():
        pytest.skip(f"domain datasets not found at {root}; run with --set data.root=...")


@pytest.mark.parametrize("recipe", DOMAIN, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_domain_recipe_trains_through_configuration_only(recipe, tiny_model_dir, tmp_path):
    needs_data(recipe)
    parsed = load_recipe(recipe, [f"model.path={tiny_model_dir}", "train.max_steps=1", "train.micro_batch_size=2",
                                  "train.grad_accum=1", "train.epochs=1"])
    result = train(parsed, recipe.stem, run_dir=tmp_path / "run")
    manifest = result.summary["data"]
    assert result.summary["steps"] == 1 and manifest["train_examples"] > 20 and manifest["eval_examples"] > 5
    assert manifest["train_label_tokens"] > 0


def test_data_check_reports_overlap_count_on_real_data(tiny_model_dir):
    legal = REPO / "recipes" / "legal" / "overruling.yaml"
    needs_data(legal)
    # Without dedup, the upstream file's repeated rows straddle the held-out split: check says how many.
    result = CliRunner().invoke(app, ["data", "check", str(legal), "--set", f"model.path={tiny_model_dir}",
                                      "--set", "data.dedup=false", "--set", "data.max_overlap=1.0"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("held-out overlap with train:"))
    assert int(line.split(":")[1].split()[0]) > 100
