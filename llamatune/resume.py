"""Where a run continues from (`--resume auto|PATH`), what may not change before it does, and
stopping on a signal at the next safe point."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from llamatune import checkpoint
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.recipe import load_recipe
from llamatune.rundir import choose_run_dir
from llamatune.schema import Recipe

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; run again with --resume auto


class Preempted(LlamatuneError):
    """The run stopped on a signal after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED


def locate(recipe: Recipe, recipe_name: str, run_dir: Path | None, resume: str | None, say) -> tuple[Path, Path | None]:
    """Returns (run directory, checkpoint to resume from or None for a fresh start).

    Raises:
        RecipeError: If `auto` cannot tell which run is meant, or the run has files but no checkpoint.
        LlamatuneError: If an explicit checkpoint fails its checksums (naming the file).
    """
    if resume is None:
        return choose_run_dir(recipe, recipe_name, run_dir), None
    if resume != "auto":
        path = Path(resume)
        checkpoint.verify(path)
        return path.parent.parent, path
    if run_dir is None and not recipe.output.name:
        raise RecipeError(["--resume auto needs to know the run: pass --run-dir DIR or set output.name"])
    run_dir = run_dir or recipe.output.dir / recipe.output.name
    found = checkpoint.latest(run_dir / "checkpoints", warn=lambda m: say(f"[yellow]warning:[/] {m}"))
    if found is None and run_dir.exists() and any(run_dir.iterdir()):
        raise RecipeError([f"--resume auto: {run_dir} holds a run but no complete checkpoint (set train.save_every); "
                           "start a new run with another --run-dir"])
    return run_dir, found


def check_unchanged(run_dir: Path, recipe: Recipe, force: bool, say) -> None:
    """Refuses to resume when the recipe differs from the one the run was started with."""
    saved = load_recipe(run_dir / "recipe.yaml")
    changes = _diff(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
    if not changes:
        return
    listing = "; ".join(f"{key}: {old!r} → {new!r}" for key, old, new in changes)
    if not force:
        raise RecipeError([f"the recipe changed since {run_dir} started ({listing}); resuming would not reproduce the "
                           "run. Undo the change, or pass --force-resume to continue anyway"])
    say(f"[yellow]warning:[/] resuming with a changed recipe (--force-resume): {listing}")


def check_same_data(saved: str, current: str, force: bool, say) -> None:
    """Refuses to resume when the training data changed (its fingerprint differs)."""
    if saved == current:
        return
    if not force:
        raise RecipeError(["the training data changed since the checkpoint was written (data fingerprint "
                           f"{saved[:12]} → {current[:12]}); restore the files, or pass --force-resume"])
    say("[yellow]warning:[/] resuming on changed data (--force-resume)")


def _diff(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


class StopSignals:
    """Turns SIGTERM/SIGINT (and any extra signals) into a request to stop at the next safe point.

    A second signal exits at once (128 + signal number); a checkpoint being written then stays in
    its hidden staging folder and is never mistaken for a complete one.
    """

    def __init__(self, extra: tuple[int, ...] = ()):
        self.signals = (signal.SIGTERM, signal.SIGINT, *extra)
        self.requested: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signum
