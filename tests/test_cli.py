"""The CLI front door: instant help (no torch at import), version, exit codes."""

import subprocess
import sys

import pytest

from typer.testing import CliRunner

from llamatune import __version__
from llamatune.cli import app


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, llamatune.cli; bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "train" in result.output and "validate" in result.output
    assert runner.invoke(app, ["--version"]).output.strip() == f"llamatune {__version__}"


def test_unknown_model_is_exit_2_with_suggestion(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: smollm2-135m-instuct\ndata:\n  train: t.jsonl\n")
    for command in ("validate", "train"):
        result = CliRunner().invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        assert "Did you mean 'smollm2-135m-instruct'?" in result.output


def test_models_list_and_unknown_pull():
    runner = CliRunner()
    assert "smollm2-135m-instruct" in runner.invoke(app, ["models", "list"]).output
    result = runner.invoke(app, ["models", "pull", "smollm"])
    assert result.exit_code == 2 and "unknown builtin model" in result.output


def _every_field(model, prefix=""):
    """Every (dotted key) of a pydantic model and the models inside it, found independently of schema_doc."""
    import typing

    from pydantic import BaseModel

    def models_in(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield annotation
        for arg in typing.get_args(annotation):
            yield from models_in(arg)

    for name, field in model.model_fields.items():
        yield prefix + name
        for sub in set(models_in(field.annotation)):
            yield from _every_field(sub, f"{prefix}{name}.")


def test_schema_lists_every_key_at_every_depth_in_plain_words():
    from llamatune.schema import Recipe
    from llamatune.schema_doc import describe_keys

    output = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["schema"]).output
    fields = set(_every_field(Recipe))
    sections = {k for k in fields if any(f.startswith(k + ".") for f in fields) and k not in ("data.train", "data.eval")}
    assert {"data.train.messages", "data.train.answer_with", "data.eval.explode", "data.train.encoding"} <= fields
    for key in fields - sections:
        assert f"\n{key}  " in "\n" + output, f"{key} missing from llamatune schema"
    assert all(row.description for row in describe_keys()), "every key needs a description"
    assert "PosixPath" not in output and "llamatune.schema" not in output and "Literal[" not in output
    assert "output.dir  path; default: runs" in output and "lora.r  integer; default: 16" in output
    assert "[q_proj, k_proj, v_proj, o_proj]" in output


def test_schema_of_one_key_and_a_typo():
    runner = CliRunner()
    one = runner.invoke(app, ["schema", "data.train.messages"])
    assert one.exit_code == 0 and one.output.startswith("data.train.messages  text; default: messages")
    assert runner.invoke(app, ["schema", "data.train.0.messages"]).output == one.output
    section = runner.invoke(app, ["schema", "lora"]).output
    assert "lora.r " in section and "model.path" not in section
    typo = runner.invoke(app, ["schema", "data.train.mesages"])
    assert typo.exit_code == 2 and "did you mean data.train.messages" in typo.output and "Traceback" not in typo.output


def test_a_typo_in_a_source_key_gets_a_did_you_mean(tmp_path):
    (tmp_path / "r.yaml").write_text("data:\n  train:\n    path: x.jsonl\n    promt: '{q}'\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "data.train.0.promt (line 4): unknown key (did you mean 'prompt'?)" in result.output


def test_data_check_fails_with_the_overlap_count(tiny_recipe):
    # held-out = the training file: every held-out example is a duplicate
    result = CliRunner().invoke(app, ["data", "check", str(tiny_recipe), "--set", "data.eval.0.path=" + str(tiny_recipe.parent / "train.jsonl")])
    assert result.exit_code == 2, result.output
    assert "24 held-out examples duplicate training examples exactly" in result.output
    ok = CliRunner().invoke(app, ["data", "check", str(tiny_recipe)])
    assert ok.exit_code == 0 and "held-out overlap with train: 0 exact, 0 near" in ok.output
    assert "24 records → 24 examples; dropped: none" in ok.output
    assert "doctor (train): ok 24 chat examples rendered exactly as at inference; ok 0 dropped with no trained token; " \
           "ok 0 without a trained end-of-turn token" in ok.output


def test_data_preview_shows_examples_and_lengths(tiny_recipe):
    result = CliRunner().invoke(app, ["data", "preview", str(tiny_recipe), "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "example 1 of 24" in result.output and "example 2 of 24" in result.output and "example 3" not in result.output
    assert "tokens per example: min" in result.output and "<|im_start|>assistant" in result.output


def test_a_bug_shows_its_traceback_and_how_to_report_it_and_an_os_error_names_its_file(tmp_path, monkeypatch):
    import llamatune.scaffold as scaffold

    def broken(domain, folder):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(scaffold, "init_project", broken)
    result = CliRunner().invoke(app, ["init", "--domain", "medical", str(tmp_path / "p")])
    assert result.exit_code == 1 and "Traceback" in result.output and "ZeroDivisionError: a bug" in result.output
    assert "This is a bug in llamatune" in result.output.splitlines()[-1]

    def denied(domain, folder):
        raise PermissionError(13, "Permission denied", str(folder / "recipe.yaml"))

    monkeypatch.setattr(scaffold, "init_project", denied)
    result = CliRunner().invoke(app, ["init", "--domain", "medical", str(tmp_path / "p")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {tmp_path / 'p' / 'recipe.yaml'}: Permission denied"


SWEEP = ["train", "train nope.yaml", "train r.yaml --resume /nonexistent/ckpt", "train r.yaml --resume auto",
         "train r.yaml --save-on-signal FOO", "train r.yaml --set =x", "train r.yaml --run-dir afile", "merge /nonexistent",
         "merge afile", "merge . --dtype int4", "export /nonexistent", "export . --quant q4_k", "export . --format zip",
         "eval /nonexistent", "eval . --compare foo", "eval . --limit 0", "eval r.yaml", "chat /nonexistent",
         "data check nope.yaml", "data preview r.yaml -n 0", "plan r.yaml --device nope", "bench r.yaml --steps 0",
         "models pull nope", "init --domain nope", "init --domain medical afile", "validate r.yaml --launch nope.yaml",
         "validate r.yaml --launch afile", "validate afile", "validate .", "schema extra"]


@pytest.mark.parametrize("args", SWEEP)
def test_every_command_refuses_bad_arguments_without_a_traceback(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("data: {train: t.jsonl}\n")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "afile").write_text("not a folder\n")
    result = CliRunner().invoke(app, args.split())
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
