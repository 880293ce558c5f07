"""What the command modules share: the recipe argument and --set option, and loading a recipe (or a run's) with its
redactor handed to the consoles."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llamatune.errors import LlamatuneError
from llamatune.terminal import err, out

RecipeArg = typer.Argument(..., help="YAML recipe file (see recipes/).", show_default=False)
SetOpt = typer.Option(
    None, "--set", metavar="KEY=VALUE", help="Override a recipe key, value parsed as YAML: --set train.lr=1e-4 --set lora.r=8",
    show_default=False,
)


def use_recipe(recipe: Path, overrides: Optional[List[str]], saved: bool = False):
    """Loads the recipe and hands its redactor to the consoles, so nothing printed from here on shows a
    value taken from the environment."""
    from llamatune.recipe import load_recipe, redactor_of

    parsed = load_recipe(recipe, overrides or [], saved=saved)
    out.redactor = err.redactor = redactor_of(parsed)
    return parsed


def use_run(path: Path) -> None:
    """For a command on a run directory: its recipe's redactor for the consoles, when the recipe loads (a run that
    does not is the command's to report)."""
    if (path / "recipe.yaml").is_file():
        try:
            use_recipe(path / "recipe.yaml", [], saved=True)
        except LlamatuneError:
            pass


def load_checked(recipe: Path, overrides: Optional[List[str]], need_train: bool = True):
    """Loads the recipe and checks what needs neither tokenizer nor weights: schema, data files, model reference
    (and, unless need_train is False, that it has training data).

    Returns:
        (recipe, model source kind).
    """
    from llamatune.preflight import check_files

    parsed = use_recipe(recipe, overrides)
    return parsed, check_files(parsed, str(recipe), need_train)
