"""Every shipped recipe validates and trains 2 steps with its own data and format: the project's corpora
(examples/) and the real public datasets (PubMedQA JSON mapping, MedQuAD XML, LegalBench quoted TSV,
TAT-QA nested JSON), read through configuration alone.

The public datasets are not part of the project: their recipes find them through data.root (default: the
workplace's ../shared/datasets), and those tests are skipped, with the reason, when they are absent. The
tiny model stands in for the builtin one so the whole set runs in about a minute."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes").glob("*/*.yaml"))


def needs_data(recipe: Path):
    root = load_recipe(recipe).data.root
    if root is not None and not root.is_dir():
        pytest.skip(f"domain datasets not found at {root}; run with --set data.root=...")


def test_every_domain_has_a_lora_and_a_qlora_recipe_on_the_builtin_model():
    for domain in ("medical", "legal", "finance"):
        lora, qlora = (load_recipe(REPO / "recipes" / domain / f"{name}.yaml") for name in ("lora", "qlora"))
        assert lora.model.path == qlora.model.path == "smollm2-135m-instruct"
        assert lora.quantization.mode == "none" and qlora.quantization.mode == "nf4"
        assert lora.data == qlora.data  # the same data: the two differ in the frozen base only


TINY = ["train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.epochs=null",
        "train.precision=fp32",
        # the tiny test tokenizer splits text finer than the real one: more examples run long
        "data.max_drop_fraction=1.0"]


def stage_one(recipe: Path, tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    """A second-stage recipe (model.adapter: a run of the folder's lora.yaml, e.g. DPO after SFT; or a distillation
    whose teacher is that run) gets that run, trained here on the tiny model: the overrides that point the recipe
    at it (a distillation's student is then the tiny model itself)."""
    shipped = load_recipe(recipe)
    if shipped.model.adapter is None and shipped.train.method != "distill":
        return [f"model.path={tiny_model_dir}"]
    first = load_recipe(recipe.parent / "lora.yaml", [f"model.path={tiny_model_dir}", *TINY])
    train(first, "stage-1", run_dir=tmp_path / "stage-1")
    stage = "distill.teacher" if shipped.train.method == "distill" else "model.adapter"
    return [f"model.path={tiny_model_dir}", f"{stage}={tmp_path / 'stage-1'}"]


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipe_validates_and_trains_two_steps(recipe, tiny_model_dir, tmp_path):
    needs_data(recipe)
    model = stage_one(recipe, tiny_model_dir, tmp_path)
    if len(model) == 1:  # first-stage recipes validate as shipped, on the builtin model
        result = CliRunner().invoke(app, ["validate", str(recipe)])
    else:
        # on the tiny tokenizer (finer than the real one) long preference pairs run over max_length: allowed here
        overrides = [*model, "data.max_drop_fraction=1.0"]
        result = CliRunner().invoke(app, ["validate", str(recipe), *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 0 and "ok" in result.output, result.output
    parsed = load_recipe(recipe, [*model, *TINY])
    result = train(parsed, recipe.stem, run_dir=tmp_path / "run")
    manifest = result.summary["data"]
    assert result.summary["steps"] == 2 and manifest["train_examples"] > 10 and manifest["eval_examples"] > 2
    assert manifest["train_label_tokens"] > 0
    assert result.summary["method"] == parsed.train.method


@pytest.mark.parametrize("domain", ["medical", "legal", "finance"])
def test_project_corpora_have_two_formats_300_train_and_100_held_out_examples(domain):
    """Counted as the pipeline reads them (the domain's LoRA recipe, tokenizer-free record count)."""
    import json

    recipe = load_recipe(REPO / "recipes" / domain / "lora.yaml")
    count = lambda sources: sum(sum(1 for line in open(s.path) if json.loads(line)) for s in sources)  # noqa: E731
    assert len({s.format for s in recipe.data.train}) >= 2
    assert count(recipe.data.train) >= 300 and count(recipe.data.eval) >= 100


def test_data_check_reports_overlap_count_on_real_data(tiny_model_dir):
    legal = REPO / "recipes" / "legal" / "overruling.yaml"
    needs_data(legal)
    # Without dedup, the upstream file's repeated rows straddle the held-out split: check says how many.
    result = CliRunner().invoke(app, ["data", "check", str(legal), "--set", f"model.path={tiny_model_dir}",
                                      "--set", "data.dedup=false", "--set", "data.max_overlap=1.0",
                                      "--set", "data.max_drop_fraction=1.0"])  # the tiny tokenizer makes rows long
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("held-out overlap with train:"))
    assert int(line.split(":")[1].split()[0]) > 100
