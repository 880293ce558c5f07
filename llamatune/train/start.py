"""model.adapter: a run that starts from another run's adapter (continue training, or DPO after SFT)."""

from __future__ import annotations

from pathlib import Path

from llamatune.errors import RecipeError


def start_problems(recipe) -> list[str]:
    """Why model.adapter cannot start this run: not a finished run, another base model, other LoRA settings."""
    from llamatune.artifacts.files import run_dir_problem
    from llamatune.recipe import load_recipe

    if recipe.model.adapter is None:
        return []
    run = Path(recipe.model.adapter)
    problem = run_dir_problem(run) if run.is_dir() else f"{run} is not a folder"
    if problem:
        return [f"model.adapter: {problem}; it must be a finished run directory (llamatune runs lists them)"]
    try:
        theirs = load_recipe(run / "recipe.yaml", saved=True)
    except RecipeError as exc:
        return [f"model.adapter: {run / 'recipe.yaml'} does not read as a recipe: {exc.problems[0]}"]
    problems = []
    if theirs.model.path != recipe.model.path:
        problems.append(f"model.adapter: {run} was trained on {theirs.model.path}, this recipe's model.path is "
                        f"{recipe.model.path}; an adapter only fits the base it was trained on")
    mine, other = recipe.lora.model_dump(), theirs.lora.model_dump()
    for key in sorted(k for k in mine if mine[k] != other[k] and k != "dropout"):
        problems.append(f"lora.{key}: {mine[key]!r} here, {other[key]!r} in {run} (model.adapter); the adapter is "
                        f"continued as it is, so its shape settings must match: set lora.{key}: {other[key]!r}")
    return problems


def load_start(model, recipe) -> None:
    """Loads model.adapter's weights into the freshly wrapped peft model (its LoRA matrices, nothing else)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if recipe.model.adapter is None:
        return
    weights = load_file(str(Path(recipe.model.adapter) / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RecipeError([f"model.adapter: {recipe.model.adapter} has no weights for {len(missing)} LoRA tensors of this "
                           f"model (e.g. {missing[0]}); it was trained on other modules"])
    if result.unexpected_keys:
        raise RecipeError([f"model.adapter: {len(result.unexpected_keys)} tensors of {recipe.model.adapter} have no place "
                           f"in this model (e.g. {result.unexpected_keys[0]}); it was trained on another shape"])
