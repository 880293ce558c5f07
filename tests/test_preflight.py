"""validate runs what train runs before its first step (preflight.check): the same data lines, the same
problems, no weights."""

from typer.testing import CliRunner

from conftest import qa_rows, write_jsonl
from llamatune.cli import app


def data_lines(output: str) -> list[str]:
    return [l for l in output.splitlines() if l.startswith(("train ", "eval ", "    ", "note:", "warning:"))]


def test_validate_prints_the_drops_train_prints(tmp_path, tiny_model_dir):
    rows = qa_rows(48) + [{"question": "no answer"}, {"question": "also none", "answer": ""}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\nlora:\n  r: 4\ndata:\n  train:\n    path: train.jsonl\n"
                      "    prompt: '{question}'\n    response: '{answer}'\n  eval_fraction: 0.2\n"
                      "train:\n  max_steps: 1\n  precision: fp32\n")
    checked = CliRunner().invoke(app, ["validate", str(recipe)])
    assert checked.exit_code == 0, checked.output
    trained = CliRunner().invoke(app, ["train", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert data_lines(checked.output) == data_lines(trained.output)
    assert data_lines(checked.output)[:3] == [
        f"train {tmp_path / 'train.jsonl'} (instruction): 50 records → 48 examples; dropped 2: missing_field 1, empty 1",
        f"    missing_field: e.g. {tmp_path / 'train.jsonl'}:49: no field 'answer' (fields here: question)",
        f"    empty: e.g. {tmp_path / 'train.jsonl'}:50: template '{{answer}}' renders empty",
    ]
    # 2 of 50 is within the default bound; the same recipe with a tighter one stops in validate and in train alike.
    for command in ("validate", "train"):
        result = CliRunner().invoke(app, [command, str(recipe), "--set", "data.max_drop_fraction=0.01",
                                          "--run-dir" if command == "train" else "--set",
                                          str(tmp_path / "run2") if command == "train" else "train.seed=42"])
        assert result.exit_code == 2 and "2 of 50 records dropped (4.0%), more than data.max_drop_fraction=0.01" in result.output
    assert not (tmp_path / "run2").exists()


def test_target_modules_are_checked_from_the_config_without_weights(tmp_path, tiny_model_dir):
    folder = tmp_path / "weightless"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        if not path.name.endswith(".safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    write_jsonl(tmp_path / "train.jsonl", qa_rows(20))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {folder}\nlora:\n  target_modules: [q_proj, vproj]\ndata:\n  train:\n"
                      "    path: train.jsonl\n    prompt: '{question}'\n    response: '{answer}'\n")
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "lora.target_modules.1 (line 4): 'vproj' not in model; linear layers: down_proj, gate_proj, k_proj, o_proj, " \
           "q_proj, up_proj, v_proj. Did you mean 'v_proj'?" in result.output


def test_bad_data_fails_before_an_uncached_builtin_model_is_fetched(tmp_path, monkeypatch):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("LLAMATUNE_CACHE_DIR", str(empty))  # the builtin model is not there: resolve() would fetch it
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train:\n    path: train.jsonl\n    prompt: '{questoin}'\n    response: '{answer}'\n")
    for command in ("validate", "train"):
        result = CliRunner().invoke(app, [command, str(recipe), "--run-dir", str(tmp_path / "run")] if command == "train"
                                    else [command, str(recipe)])
        assert result.exit_code == 2, result.output
        assert "data.train.0.prompt (line 4): field 'questoin' is in none of the 10 records" in result.output
        assert "Fetching" not in result.output and not (empty / "models").exists()
