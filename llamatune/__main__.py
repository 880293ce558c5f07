"""`python -m llamatune ...` is the same as the `llamatune` command."""

from llamatune.cli import entry

entry()
