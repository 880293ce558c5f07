"""`llamatune init`: the scaffold validates as written, reads through the data pipeline, trains, and never
overwrites a file."""

import pytest
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.scaffold import DOMAINS
from llamatune.train.loop import train


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_init_writes_a_recipe_that_validates_and_trains(domain, tmp_path, tiny_model_dir):
    folder = tmp_path / "project"
    result = CliRunner().invoke(app, ["init", "--domain", domain, str(folder)])
    assert result.exit_code == 0, result.output
    recipe = folder / "recipe.yaml"
    validated = CliRunner().invoke(app, ["validate", str(recipe)])
    assert validated.exit_code == 0 and "ok" in validated.output, validated.output
    parsed = load_recipe(recipe, [f"model.path={tiny_model_dir}", "train.epochs=null", "train.max_steps=1", "train.precision=fp32",
                                  f"output.dir={tmp_path / 'runs'}"])
    summary = train(parsed, "scaffold", run_dir=tmp_path / "run").summary
    kinds = {s.format for s in parsed.data.train}
    assert kinds == {"instruction", "classification"}
    assert summary["data"]["train_examples"] == 6 and summary["data"]["eval_examples"] == 3
    assert "#" in recipe.read_text().splitlines()[0]  # commented


def test_init_never_overwrites_and_rejects_an_unknown_domain(tmp_path):
    folder = tmp_path / "p"
    (folder / "data").mkdir(parents=True)
    mine = folder / "data" / "qa_train.jsonl"
    mine.write_text('{"question": "mine", "answer": "keep"}\n')
    result = CliRunner().invoke(app, ["init", "--domain", "legal", str(folder)])
    assert result.exit_code == 2 and "never overwrites" in result.output
    assert mine.read_text() == '{"question": "mine", "answer": "keep"}\n' and not (folder / "recipe.yaml").exists()
    result = CliRunner().invoke(app, ["init", "--domain", "law", str(tmp_path / "q")])
    assert result.exit_code == 2 and "not one of medical, legal, finance" in result.output
