"""The terminal: the two consoles every command prints to, how a command's failure is shown, and the typer classes
whose help shows flags without a `<bool>` value.

User-fixable errors (LlamatuneError, RecipeError, an OSError naming a file) become one message and an exit code;
anything else is a bug in llamatune and is shown with its traceback and how to report it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup
from rich.markup import escape

from llamatune import __version__
from llamatune.errors import LlamatuneError
from llamatune.secrets import Redactor


class _Console(Console):
    """A console that shows the values a recipe took from environment variables as their ${NAME}
    (secrets.py); the recipe loader hands it the redactor (`_use_recipe`)."""

    redactor = Redactor()

    def print(self, *objects, **kwargs) -> None:
        super().print(*(self.redactor.text(o) if isinstance(o, str) else o for o in objects), **kwargs)


out = _Console(soft_wrap=True)  # never hard-wrap: paths and keys must stay copy-pasteable
err = _Console(stderr=True, soft_wrap=True)
BUG_REPORT = ("This is a bug in llamatune {version}, not a problem with your input: please report it on llamatune's "
              "issue tracker with the command you ran, your recipe (secrets removed) and the traceback above.")

def run(fn: Callable[[], None]) -> None:
    """Runs a command body, turning user-fixable errors into a message and an exit code (no traceback).

    An OSError that names a file (permission denied, a folder where a file was expected, a full disk) is the
    user's to fix, whichever library raised it. Anything else is a bug: its traceback is shown, then how to report it.
    """
    out.redactor = err.redactor = Redactor()  # each command starts clean; loading its recipe sets them
    try:
        fn()
    except LlamatuneError as exc:
        kind = {2: "invalid recipe or arguments", 75: "stopped"}.get(exc.exit_code, "error")
        err.print(f"[bold red]{kind}:[/] {escape(str(exc))}", highlight=False, markup=True)
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        if exc.filename is None:
            raise _bug() from None
        target = f"{exc.filename}" + (f" → {exc.filename2}" if exc.filename2 else "")
        err.print(f"[bold red]error:[/] {escape(target)}: {escape(exc.strerror or str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
        raise
    except Exception:
        raise _bug() from None


def _bug() -> typer.Exit:
    import traceback

    err.print(escape(traceback.format_exc()), highlight=False, markup=True)
    err.print(BUG_REPORT.format(version=__version__), highlight=False)
    return typer.Exit(1)


def quiet_libraries() -> None:
    """Silences library chatter that tells a llamatune user nothing they can act on."""
    import logging
    import warnings

    # bitsandbytes offers to download an optional CPU kernel from a model hub; we never do that.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft calls a transformers method that transformers itself has deprecated.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Our own messages say what is being loaded or converted. Said in the environment, which transformers
    # reads when imported, rather than by importing it here (0.7 s): `train` then reaches its run-directory
    # lock, and refuses a second run on the same directory, in about a second.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _flag_help(option):
    """--help takes no value: no `<bool>` type beside it (typer labels a flag like an option with a value)."""
    if option is not None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


class Group(TyperGroup):
    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


class App(typer.Typer):
    """typer.Typer whose commands are Command: the CLI's apps, so every --help reads the same."""

    def command(self, *args, **kwargs):
        return super().command(*args, cls=kwargs.pop("cls", Command), **kwargs)
