"""Values taken from environment variables never reach the console, errors or any file of a run: they are
shown as the ${NAME} they were written as."""

import shutil

from typer.testing import CliRunner

from conftest import qa_rows, write_jsonl
from llamatune.cli import app
from llamatune.recipe import load_recipe, recipe_to_yaml
from llamatune.secrets import Redactor

TOKEN = "hf_FAKEtoken1234567890abcdef"


def test_redactor_replaces_longest_values_first_and_ignores_short_ones():
    redactor = Redactor.of([("/data/hf_abc", "${A}"), ("hf_abc", "${B}"), (".", "${DOT}")])
    assert redactor.text("/data/hf_abc/x and hf_abc. end") == "${A}/x and ${B}. end"
    assert redactor.data({"p": ["hf_abc"], "hf_abc": 1}) == {"p": ["${B}"], "${B}": 1}
    assert not Redactor.of([(".", "${DOT}")])


def test_a_token_in_a_path_never_appears_in_output_errors_or_run_files(tmp_path, tiny_model_dir, monkeypatch):
    secret = tmp_path / TOKEN
    secret.mkdir()
    shutil.copytree(tiny_model_dir, secret / "model")
    write_jsonl(secret / "train.jsonl", qa_rows(12))
    write_jsonl(secret / "eval.jsonl", qa_rows(4, offset=50))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    source = "    prompt: '{question}'\n    response: '{answer}'\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tmp_path}/${{HF_TOKEN}}/model\nlora:\n  r: 4\ndata:\n  train:\n"
                      f"    path: ${{HF_TOKEN}}/train.jsonl\n{source}  eval:\n    path: ${{HF_TOKEN}}/eval.jsonl\n{source}"
                      "train:\n  max_steps: 2\n  save_every: 1\n  precision: fp32\n")
    assert TOKEN not in recipe_to_yaml(load_recipe(recipe)) and "${HF_TOKEN}/train.jsonl" in recipe_to_yaml(load_recipe(recipe))

    missing = CliRunner().invoke(app, ["validate", str(recipe), "--set", "data.train.0.path=${HF_TOKEN}/nope.jsonl"])
    assert missing.exit_code == 2 and "${HF_TOKEN}/nope.jsonl: no such file" in missing.output
    assert TOKEN not in missing.output

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output and "${HF_TOKEN}" in result.output
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 10 and {"recipe.yaml", "data_manifest.json", "summary.json", "adapter_config.json"} <= {p.name for p in files}
    leaked = [str(p.relative_to(run)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    # The run still explains itself: with the variable set again, its recipe loads back to the same recipe.
    assert load_recipe(run / "recipe.yaml") == load_recipe(recipe)

    # What later commands write from the run: the eval report and the merged folder (with its model card).
    for args in (["eval", str(run), "--no-generate"], ["merge", str(run)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and TOKEN not in result.output, result.output
    written = [p for folder in (run / "eval", run / "merged") for p in folder.rglob("*") if p.is_file()]
    assert {"eval.json", "samples.jsonl", "README.md", "merge_report.json"} <= {p.name for p in written}
    assert [str(p.relative_to(run)) for p in written if TOKEN.encode() in p.read_bytes()] == []
