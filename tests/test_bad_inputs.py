"""Bad inputs: every malformed recipe and data file in tests/bad_inputs/ fails with exit 2 (or 1), no traceback,
a message naming the file and the place, and nothing written, before any weights are loaded.

Each case is a folder `tests/bad_inputs/<NNN-short-name>/` holding recipe.yaml, its data files and expect.yaml
(format in tests/bad_inputs/README.md). The case is copied into a fresh folder, `{MODEL}` in recipe.yaml becomes a
model folder with config.json and tokenizer files but no weights, and it runs through `llamatune validate` and
`llamatune train --run-dir <tmp>/run` in process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llamatune.cli import app

CASES = Path(__file__).parent / "bad_inputs"
_KEYS = {"why", "expect", "forbid", "exit", "args", "env", "symlinks", "commands", "needs_module_names", "run_dir"}
_DEFAULT_RUN = object()  # expect.yaml without run_dir: train gets --run-dir <tmp>/run


def _case_names() -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if p.is_dir())


def _read_spec(case: str) -> dict:
    """Reads and checks a case's expect.yaml, so a typo in the corpus fails loudly instead of testing nothing."""
    spec = yaml.safe_load((CASES / case / "expect.yaml").read_text(encoding="utf-8"))
    assert isinstance(spec, dict), f"{case}/expect.yaml: expected a mapping"
    unknown = set(spec) - _KEYS
    assert not unknown, f"{case}/expect.yaml: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})"
    assert isinstance(spec.get("why"), str) and spec["why"].strip(), f"{case}/expect.yaml: `why` is required"
    expect = spec.get("expect")
    assert isinstance(expect, list) and expect and all(isinstance(f, str) and f for f in expect), \
        f"{case}/expect.yaml: `expect` must be a non-empty list of strings"
    assert all(isinstance(f, str) and f for f in spec.get("forbid", [])), f"{case}/expect.yaml: `forbid` must list strings"
    assert spec.get("exit") in (None, 1, 2), f"{case}/expect.yaml: `exit` is 1 or 2"
    assert set(spec.get("commands", ["validate", "train"])) <= {"validate", "train"}, f"{case}/expect.yaml: bad `commands`"
    assert (CASES / case / "recipe.yaml").is_file(), f"{case}: no recipe.yaml"
    return spec


@pytest.fixture(scope="session")
def weightless_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's config.json and tokenizer files without its weights: reading the model's
    description works, any attempt to load weights fails."""
    folder = tmp_path_factory.mktemp("weightless-llama")
    for path in tiny_model_dir.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy2(path, folder / path.name)
    assert (folder / "config.json").is_file() and not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture
def weight_loads(monkeypatch) -> dict[str, list[str]]:
    """Records every attempt to load weights: transformers' from_pretrained of any model class, and
    llamatune.model.load_base (the originals still run, and fail on the weightless folder)."""
    from transformers import PreTrainedModel

    import llamatune.model as models

    calls: dict[str, list[str]] = {"from_pretrained": [], "load_base": []}
    real_from_pretrained = PreTrainedModel.from_pretrained.__func__
    real_load_base = models.load_base

    def from_pretrained(cls, *args, **kwargs):
        calls["from_pretrained"].append(f"{cls.__name__}.from_pretrained{args!r}")
        return real_from_pretrained(cls, *args, **kwargs)

    def load_base(*args, **kwargs):
        calls["load_base"].append(f"load_base{args[:1]!r}")
        return real_load_base(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(models, "load_base", load_base)
    return calls


def _files_under(folder: Path) -> dict[str, bytes | str]:
    """Every entry below folder (a lock file llamatune takes beside an output excepted): content, or the link target."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file() and not (path.name.startswith(".") and path.name.endswith(".lock")):
            out[rel] = path.read_bytes()
        elif path.is_dir():
            out[rel] = "dir"
    return out


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_fails_early_naming_the_place(case, weightless_model_dir, weight_loads, tmp_path_factory, monkeypatch):
    spec = _read_spec(case)
    # A neutral folder name: the expected fragments must come from llamatune's message, never from a path.
    work = tmp_path_factory.mktemp("bi") / "case"
    shutil.copytree(CASES / case, work, symlinks=True)
    (work / "expect.yaml").unlink()
    recipe = work / "recipe.yaml"
    recipe.write_bytes(recipe.read_bytes().replace(b"{MODEL}", str(weightless_model_dir).encode()))
    for link, target in (spec.get("symlinks") or {}).items():
        (work / link).symlink_to(target)
    monkeypatch.chdir(work)  # relative output paths land in the copy, never in the checkout
    run_spec = spec.get("run_dir", _DEFAULT_RUN)
    run_dir = work.parent / "run" if run_spec is _DEFAULT_RUN else None if run_spec is None else work / run_spec
    env = {str(k): (None if v is None else str(v)) for k, v in (spec.get("env") or {}).items()}
    before = _files_under(work)

    failures: list[str] = []
    for command in spec.get("commands", ["validate", "train"]):
        for calls in weight_loads.values():
            calls.clear()
        args = [command, str(recipe), *[str(a) for a in spec.get("args", [])]]
        if command == "train" and run_dir is not None:
            args += ["--run-dir", str(run_dir)]
        result = CliRunner().invoke(app, args, env=env)
        output = result.output
        problems = []
        if result.exit_code == 0:
            problems.append("exit code 0")
        elif spec.get("exit") is not None and result.exit_code != spec["exit"]:
            problems.append(f"exit code {result.exit_code}, expected {spec['exit']}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"uncaught {type(result.exception).__name__}: {result.exception}")
        if "Traceback" in output:
            problems.append("a traceback in the output")
        missing = [f for f in spec["expect"] if f not in output]
        if missing:
            problems.append(f"missing {missing}")
        shown = [f for f in spec.get("forbid", []) if f in output]
        if shown:
            problems.append(f"forbidden text shown: {shown}")
        if "could not load model" in output:
            problems.append("it tried to load the weights ('could not load model')")
        loads = weight_loads["from_pretrained"] + ([] if spec.get("needs_module_names") else weight_loads["load_base"])
        if loads:
            problems.append(f"weights were loaded before failing: {loads}")
        default_run = work.parent / "run"
        if default_run.exists() and (not default_run.is_dir() or any(default_run.iterdir())):
            problems.append(f"wrote into the run directory: {sorted(p.name for p in default_run.iterdir())}")
        after = _files_under(work)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            problems.append(f"changed files in the case folder: {changed}")
        if problems:
            failures.append(f"{command}: {'; '.join(problems)}\n  output: {output.strip()[:2000]}")
    assert not failures, f"{case}: {spec['why']}\n" + "\n".join(failures)
