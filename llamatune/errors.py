"""The two kinds of failure a user can act on, and the exit codes the CLI maps them to.

Anything else that escapes is a bug in llamatune and is shown with a traceback.
"""

from __future__ import annotations


class LlamatuneError(Exception):
    """A runtime failure the user can fix (missing file, unreachable registry, ...). Exit code 1."""

    exit_code = 1


class RecipeError(LlamatuneError):
    """The recipe or the command-line arguments are invalid. Exit code 2.

    Args:
        problems: One line per problem, each naming the dotted key (and file/line when known),
            what was given, and how to fix it. All problems are reported at once.
        source: The recipe file the problems were found in, if any.
    """

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = [f"{len(self.problems)} {noun}{where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
