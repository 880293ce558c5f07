"""Everything `llamatune train` checks before it reads a single weight, as one function that `validate`
runs too: so `validate` says `ok` exactly when `train` would get to its first step.

    recipe ─► data files exist ─► model reference ─► tokenizer ─► the whole data pipeline
          (readers, templates, formats, tokenization, drops, dedup, split, overlap)
          ─► module names from config.json on the meta device (lora.target_modules)

Problems are reported all at once where they can be (every data problem, every bad target module),
naming the recipe file, and the drops are shown by source and reason with their first file:line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from llamatune import model as models
from llamatune.data.pipeline import Datasets, build_datasets, check_records
from llamatune.data.readers import source_files
from llamatune.errors import RecipeError
from llamatune.recipe import place
from llamatune.schema import Recipe


@dataclass(frozen=True)
class Checked:
    """What the checks produced, reused by training: nothing is read or tokenized twice."""

    ref: str  # what from_pretrained loads: a local folder (builtin and GGUF models converted once) or a hub id
    kind: str  # builtin | gguf | folder | hub
    tokenizer: Any  # with the recipe's chat template applied
    data: Datasets


def check_files(recipe: Recipe, source: str | None, need_train: bool = True) -> str:
    """The cheap checks: every data source names existing data files, and the model reference is valid.

    Args:
        recipe: The validated recipe.
        source: The recipe file, named in every problem.
        need_train: False for the commands that also serve an eval-only recipe (data check / preview).

    Returns:
        The model reference's kind.

    Raises:
        RecipeError: Listing every missing source and a bad model reference, naming the recipe file.
    """
    problems = []
    if need_train and not recipe.data.train:
        problems.append("data.train: this recipe has only held-out data (data.eval), which `llamatune eval --data` and "
                        "`data check` read; add data.train (the files to train on) to train with it")
    root = recipe.data.root
    if root is not None and not root.is_dir():
        problems.append(f"data.root: {root} is {'a file, not a folder' if root.exists() else 'not an existing folder'}; "
                        "relative source paths resolve against it")
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(recipe.data, split) or ()):
            try:
                source_files(spec)
            except RecipeError as exc:
                problems += [f"data.{split}.{i}.path: {p}" for p in exc.problems]
    kind = None
    try:
        kind = models.classify(recipe.model.path)
    except RecipeError as exc:
        problems += exc.problems
    problems += _output_problems(recipe)
    if need_train:
        from llamatune.train.start import start_problems

        problems += start_problems(recipe) + _teacher_problems(recipe)
    if problems:
        raise RecipeError(place(recipe, problems), source=source)
    return kind


def _teacher_problems(recipe: Recipe) -> list[str]:
    """distill.teacher names a model llamatune can load: a finished run, a model folder, a .gguf, or a model name."""
    from pathlib import Path

    teacher = recipe.distill.teacher
    if recipe.train.method != "distill" or teacher is None:
        return []
    path = Path(teacher)
    if path.is_dir() and ((path / "recipe.yaml").exists() or (path / "adapter").exists()):
        from llamatune.artifacts.files import run_dir_problem

        problem = run_dir_problem(path)
        return [f"distill.teacher: {problem}; the teacher must be a finished run (llamatune runs lists them)"] if problem else []
    if path.is_dir() and not (path / "config.json").is_file():
        return [f"distill.teacher: {path} is a folder with neither a run (recipe.yaml, adapter/) nor a model (config.json)"]
    try:
        models.classify(teacher)
    except RecipeError as exc:
        return [f"distill.teacher: {p.removeprefix('model.path: ')}" for p in exc.problems]
    return []


def _output_problems(recipe: Recipe) -> list[str]:
    """output.dir must be a folder, or creatable: a regular file there (or above it) would only fail after
    the model has loaded."""
    for parent in [recipe.output.dir, *recipe.output.dir.parents]:
        if parent.exists():
            return [] if parent.is_dir() else [f"output.dir: {parent} is a file, not a folder; choose another output.dir"]
    return []


def check(recipe: Recipe, source: str | None, say: Callable[[str], None] = print, need_train: bool = True) -> Checked:
    """Runs every check `train` runs before loading weights; prints the drops by source.

    Args:
        recipe: The validated recipe.
        source: The recipe file, named in every problem.
        say: Where progress and the data summary go.
        need_train: See check_files.

    Raises:
        RecipeError: For bad data or a bad lora.target_modules (exit 2), naming the recipe file.
        LlamatuneError: For a model or tokenizer that cannot be read.
    """
    kind = check_files(recipe, source, need_train)
    if models.needs_conversion(recipe.model):
        # Getting the tokenizer means fetching or converting the model first (a download, a dequantization):
        # bad data should not wait for that, nor cost it.
        try:
            check_records(recipe.data)
        except RecipeError as exc:
            raise RecipeError(place(recipe, exc.problems), source=source) from None
    ref = models.resolve(recipe.model, say)
    tokenizer = models.load_tokenizer(ref, recipe.model.revision, recipe.model.trust_remote_code)
    try:
        data = build_datasets(recipe.data, tokenizer, recipe.train.seed, say=say)
    except RecipeError as exc:
        raise RecipeError(place(recipe, exc.problems), source=source) from None
    show_data(data.manifest, say)
    modules = models.meta_linear_module_names(ref, recipe.model)
    problems = models.target_module_problems(recipe.lora, modules)
    if need_train and recipe.train.method == "distill":
        from llamatune.train.teacher import teacher_tokenizer, vocabulary_problems

        problems += vocabulary_problems(tokenizer, teacher_tokenizer(recipe.distill.teacher, say))
        if recipe.distill.train_extra == "neighbours":
            try:
                models.extra_trainable("neighbours", ref)
            except RecipeError as exc:
                problems += exc.problems
    if problems:
        raise RecipeError(place(recipe, problems), source=source)
    return Checked(ref=ref, kind=kind, tokenizer=tokenizer, data=data)


def show_data(manifest: dict, say: Callable[[str], None]) -> None:
    """One line per source (records → examples, drops by reason with their first places), then the notes
    on how files were read and the warnings: what train and validate print before anything else happens."""
    from rich.markup import escape

    for s in manifest["sources"]:
        drops = ", ".join(f"{reason} {n}" for reason, n in s["dropped"].items())
        say(f"{s['split']} {escape(s['path'])} ({s['format']}): {s['records']} records → {s['examples']} examples; "
            + (f"[yellow]dropped {sum(s['dropped'].values())}[/]: {drops}" if drops else "dropped: none"))
        for reason, places in s["drop_examples"].items():
            say(f"    {reason}: e.g. {escape('; '.join(places))}")
    if "system_prompt" in manifest:
        from llamatune.data.encode import describe_system

        say(escape(describe_system(manifest["system_prompt"])))
    for note in manifest.get("notes", []):
        say(f"note: {escape(note)}")
    for warning in manifest.get("warnings", []):
        say(f"[yellow]warning:[/] {escape(warning)}")
