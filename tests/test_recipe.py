"""Recipe schema: strict keys with did-you-mean, dotted paths and lines, overrides, shipped recipes."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.errors import RecipeError
from llamatune.recipe import load_recipe, recipe_to_yaml

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def problems_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


def test_typo_key_names_dotted_path_line_and_suggestion(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n  alpah: 16\ndata:\n  train: train.jsonl\n")
    assert problems_of(path) == ["lora.alpah (line 3): unknown key (did you mean 'alpha'?)"]


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "lora:\n  r: 0\nquantization:\n  mode: nf5\ntrian: {}\ndata:\n  train: train.jsonl\n  eval_fraction: 2\n")
    found = problems_of(path)
    assert len(found) == 4
    joined = "\n".join(found)
    for expected in ("lora.r (line 2)", "quantization.mode (line 4)", "'nf4'", "trian (line 5): unknown key (did you mean 'train'?)",
                     "data.eval_fraction (line 8)"):
        assert expected in joined


def test_wrong_type_and_missing_required_section(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_size: many\n")
    found = problems_of(path)
    assert any(p.startswith("train.micro_batch_size (line 2): Input should be a valid integer") for p in found)
    assert "data: required key is missing" in found


def test_cross_field_eval_file_and_fraction_conflict(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\n  eval: train.jsonl\n  eval_fraction: 0.2\n")
    assert "set either `eval`" in problems_of(path)[0]


def test_overrides_are_yaml_and_validated(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\n")
    recipe = load_recipe(path, ["lora.r=8", "lora.target_modules=[q_proj, v_proj]", "train.lr=1e-4"])
    assert recipe.lora.r == 8 and recipe.lora.target_modules == ("q_proj", "v_proj") and recipe.train.lr == 1e-4
    assert problems_of(path, ["lora.rank=8"]) == ["lora.rank (--set): unknown key (did you mean 'r'?)"]
    assert "expected key=value" in problems_of(path, ["lora.r"])[0]


def test_paths_resolve_against_recipe_folder_and_env(tmp_path, monkeypatch):
    path = write(tmp_path, "data:\n  train: ${MY_DATA}/train.jsonl\n")
    assert "environment variable $MY_DATA is not set" in problems_of(path)[0]
    monkeypatch.setenv("MY_DATA", ".")
    monkeypatch.chdir("/")
    assert load_recipe(path).data.train[0].path == str(tmp_path / "train.jsonl")


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: train.jsonl\nlora:\n  target_modules: [q_proj]\n"))
    again = tmp_path / "again.yaml"
    again.write_text(recipe_to_yaml(recipe))
    assert load_recipe(again) == recipe


def test_recipes_are_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  train: train.jsonl\n"))
    with pytest.raises(Exception):
        recipe.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("recipe", sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")), ids=str)
def test_every_shipped_recipe_validates(recipe):
    root = load_recipe(REPO / recipe).data.root
    if root is not None and not root.is_dir():
        pytest.skip(f"domain datasets not found at {root} (pass --set data.root=... to use them)")
    result = CliRunner().invoke(app, ["validate", str(REPO / recipe)])
    parsed = load_recipe(REPO / recipe)
    adapter = parsed.model.adapter
    if parsed.train.method == "distill":
        # distillation on a clean checkout: refused for its missing teacher run and pruned student, and only those
        missing = [key for key, path in (("model.path", parsed.model.path), ("distill.teacher", parsed.distill.teacher))
                   if not Path(path).is_dir()]
        if missing:
            assert result.exit_code == 2 and f"{len(missing)} problem" in result.output, result.output
            assert all(f"{key} (line" in result.output for key in missing), result.output
        else:
            assert result.exit_code == 0, result.output
    elif adapter is None or Path(adapter).is_dir():
        assert result.exit_code == 0, result.output
    else:  # a second stage (DPO after SFT) on a clean checkout: refused for its missing first-stage run, and only that
        assert result.exit_code == 2 and "1 problem in" in result.output, result.output
        assert "model.adapter (line" in result.output and "must be a finished run directory" in result.output


def test_validate_cli_exit_2_without_traceback(tmp_path):
    path = write(tmp_path, "lora:\n  alpah: 16\ndata:\n  train: missing.jsonl\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "lora.alpah (line 2): unknown key (did you mean 'alpha'?)" in result.output
    assert "Traceback" not in result.output
    path.write_text("data:\n  train: missing.jsonl\n")
    for command in ("validate", "train"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2 and "data.train.0.path (line 2): " in result.output, result.output
        assert "missing.jsonl: no such file or folder" in result.output


def test_yaml_booleans_in_string_fields_get_a_quoting_hint(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    path: train.jsonl\n    format: classification\n    labels: [yes, no]\n")
    found = problems_of(path)
    assert found[0] == ("data.train.0.labels.0 (line 5): Input should be a valid string (written yes, which YAML reads "
                        'as the boolean True); quote it: "yes"')


def test_a_run_recipe_written_by_0_2_0_with_epochs_and_max_steps_still_loads(tmp_path):
    path = write(tmp_path, "data:\n  train: train.jsonl\ntrain:\n  epochs: 1\n  max_steps: 4\n")
    assert "both are set" in problems_of(path)[0]  # written by a user: an error
    recipe = load_recipe(path, saved=True)  # written by llamatune 0.2.0 into a run directory: max_steps decided
    assert recipe.train.epochs is None and recipe.train.max_steps == 4
