"""A damaged or misplaced artifact (run directory, model folder, GGUF file, --out) is a message naming the file
and how to fix it, never a traceback, in every command that reads artifacts: eval, chat, merge, export."""

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_qa_recipe
from llamatune.cli import app

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_model_dir):
    """Undamaged artifacts, copied by each test before it damages them: a run, its merged folder, the same model
    in three shards, its GGUF file, and the recipe whose held-out data the model folders are scored on."""
    from transformers import AutoModelForCausalLM

    from llamatune.artifacts.export import export_gguf
    from llamatune.artifacts.merge import merge
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    folder = tmp_path_factory.mktemp("pristine")
    recipe = write_qa_recipe(folder, tiny_model_dir, 8, lora="  r: 4\n", train="  precision: fp32\n  max_steps: 1\n")
    train(load_recipe(recipe), "r", run_dir=folder / "run")
    merged = merge(folder / "run", folder / "merged", say=lambda s: None)
    AutoModelForCausalLM.from_pretrained(merged).save_pretrained(folder / "sharded", max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(merged / name, folder / "sharded" / name)
    assert (folder / "sharded" / SHARD).is_file() and not (folder / "sharded" / "model.safetensors").exists()
    export_gguf(merged, folder / "m.gguf", say=lambda s: None)
    return {"run": folder / "run", "merged": merged, "sharded": folder / "sharded", "gguf": folder / "m.gguf",
            "recipe": recipe}


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_json(path: Path) -> None:
    path.write_text('{"model_type": "llama", ')  # cut off mid-object, as an interrupted copy leaves it


def _replace_with_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a folder")


# id -> (artifact, damage, what the message must say: the damaged file's name and what is wrong with it)
CASES = {
    "run_without_recipe": ("run", lambda d: (d / "recipe.yaml").unlink(), "recipe.yaml is missing"),
    "run_without_adapter": ("run", lambda d: shutil.rmtree(d / "adapter"), "adapter is missing"),
    "run_adapter_is_a_file": ("run", lambda d: _replace_with_file(d / "adapter"), "adapter is a file"),
    "adapter_weights_truncated": ("run", lambda d: _half(d / "adapter" / "adapter_model.safetensors"),
                                  ("adapter_model.safetensors is ", "bytes but its header describes", "truncated")),
    "adapter_weights_empty": ("run", lambda d: (d / "adapter" / "adapter_model.safetensors").write_bytes(b""),
                              "adapter_model.safetensors is empty (0 bytes)"),
    "adapter_weights_missing": ("run", lambda d: (d / "adapter" / "adapter_model.safetensors").unlink(),
                                "adapter_model.safetensors is missing"),
    "adapter_config_not_json": ("run", lambda d: _not_json(d / "adapter" / "adapter_config.json"),
                                "adapter_config.json is not valid JSON"),
    "run_tokenizer_corrupt": ("run", lambda d: _not_json(d / "tokenizer" / "tokenizer.json"), "tokenizer.json is not valid JSON"),
    "run_template_raises": ("run", lambda d: (d / "tokenizer" / "chat_template.jinja").write_text("{{ raise_exception('boom') }}"),
                            "chat_template.jinja fails on a conversation"),
    "weights_truncated": ("merged", lambda d: _half(d / "model.safetensors"), ("model.safetensors is ", "truncated")),
    "weights_empty": ("merged", lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
    "weights_missing": ("merged", lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "config_not_json": ("merged", lambda d: _not_json(d / "config.json"), "config.json is not valid JSON"),
    "folder_tokenizer_corrupt": ("merged", lambda d: _not_json(d / "tokenizer.json"), "tokenizer.json is not valid JSON"),
    "shard_truncated": ("sharded", lambda d: _half(d / SHARD), (f"{SHARD} is ", "truncated")),
    "shard_missing": ("sharded", lambda d: (d / SHARD).unlink(), f"{SHARD} is missing"),
    "index_not_json": ("sharded", lambda d: _not_json(d / "model.safetensors.index.json"),
                       "model.safetensors.index.json is not valid JSON"),
    "gguf_truncated": ("gguf", _half, "m.gguf is truncated or damaged"),
    "gguf_not_gguf": ("gguf", lambda p: p.write_bytes(os.urandom(4096)), "m.gguf is not a GGUF file"),
    "gguf_empty": ("gguf", lambda p: p.write_bytes(b""), "m.gguf is empty"),
    "gguf_is_a_folder": ("gguf", lambda p: (p.unlink(), p.mkdir()), "m.gguf is a folder"),
}
COMMANDS = {"run": ("eval", "chat", "merge"), "merged": ("eval", "chat", "export"), "sharded": ("eval", "chat", "export"),
            "gguf": ("eval", "chat")}


def _argv(command: str, target: Path, tmp_path: Path, recipe: Path) -> list[str]:
    out = tmp_path / "out"
    data = [] if target.name == "run" else ["--data", str(recipe)]
    return {"eval": ["eval", str(target), "--no-generate", "--out", str(out), *data],
            "chat": ["chat", str(target), "--max-new-tokens", "2"],
            "merge": ["merge", str(target), "--out", str(out)],
            "export": ["export", str(target), "--out", str(tmp_path / "out.gguf")]}[command]


def _fails_cleanly(result, expected: str | tuple[str, ...]) -> None:
    """Non-zero exit, the message names the damaged file, and no traceback anywhere."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in result.output, result.output


@pytest.mark.parametrize("case,command", [(c, cmd) for c, (kind, _, _) in CASES.items() for cmd in COMMANDS[kind]])
def test_a_damaged_artifact_is_named_without_a_traceback(case, command, pristine, tmp_path):
    kind, damage, expected = CASES[case]
    source = pristine[kind]
    copy = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    damage(copy)
    result = CliRunner().invoke(app, _argv(command, copy, tmp_path, pristine["recipe"]), input="hello\n\n")
    _fails_cleanly(result, expected)
    # Nothing written, and no lock or staging file left behind (the cache folder is this test's own, see conftest).
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "llamatune-cache") == [copy.name]


def test_a_file_where_a_folder_is_expected_and_back(pristine, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    recipe = str(pristine["recipe"])
    for argv in (["eval", str(notes), "--data", recipe], ["chat", str(notes)], ["merge", str(notes)]):
        _fails_cleanly(CliRunner().invoke(app, argv, input="\n"), f"{notes}")
    _fails_cleanly(CliRunner().invoke(app, ["export", str(pristine["gguf"])]), "m.gguf: neither a model folder")
    (tmp_path / "logs").mkdir()  # a folder that is neither a model nor a run
    _fails_cleanly(CliRunner().invoke(app, ["export", str(tmp_path / "logs")]), "logs: neither a model folder")
    _fails_cleanly(CliRunner().invoke(app, ["merge", str(pristine["merged"])]), "merged: not a run directory")


def test_out_that_cannot_be_written(pristine, tmp_path):
    """--out at an existing file, or below one (which fails for root too, unlike a read-only folder)."""
    existing = tmp_path / "taken"
    existing.write_text("x")
    run, merged = str(pristine["run"]), str(pristine["merged"])
    commands = {
        "eval": ["eval", run, "--no-generate", "--out"], "merge": ["merge", run, "--out"],
        "export": ["export", merged, "--out"], "ollama": ["export", merged, "--format", "ollama", "--out"],
    }
    for name, argv in commands.items():
        at_file = CliRunner().invoke(app, argv + [str(existing)])
        _fails_cleanly(at_file, "taken is a file, where a folder is expected" if name == "eval" else "taken already exists")
        below = CliRunner().invoke(app, argv + [str(existing / "sub" / "x.gguf")])
        _fails_cleanly(below, f"{existing} is a file, so nothing can be created below it")
    assert existing.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["llamatune-cache", "taken"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_unreadable_file_and_read_only_folder(pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine["run"], run)
    (run / "adapter" / "adapter_model.safetensors").chmod(0)
    _fails_cleanly(CliRunner().invoke(app, ["eval", str(run), "--no-generate", "--out", str(tmp_path / "e")]),
                   "adapter_model.safetensors cannot be read")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _fails_cleanly(CliRunner().invoke(app, ["merge", str(pristine["run"]), "--out", str(locked / "m")]), "is not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_an_adapter_whose_base_was_replaced_says_so(command, pristine, tmp_path, tiny_model_dir):
    from transformers import AutoConfig, LlamaForCausalLM

    other = tmp_path / "other-model"  # same tokenizer, other shapes: the adapter's tensors cannot load into it
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    LlamaForCausalLM(config).save_pretrained(other)
    for path in tiny_model_dir.iterdir():
        if path.name.startswith("tokenizer") or path.suffix == ".jinja":
            shutil.copy(path, other / path.name)
    run = tmp_path / "run"
    shutil.copytree(pristine["run"], run)
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(tiny_model_dir), str(other)))
    args = ["eval", str(run), "--no-generate", "--out", str(tmp_path / "e")] if command == "eval" else ["merge", str(run)]
    result = CliRunner().invoke(app, args)
    _fails_cleanly(result, "does not fit the base model")
    assert "was the base model (model.path in" in result.output
