"""Where a run continues from (`--resume auto|PATH`), what may not change before it does, and
stopping on a signal at the next safe point."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import LlamatuneError, RecipeError
from llamatune.recipe import load_recipe
from llamatune.schema import Recipe
from llamatune.train import checkpoint
from llamatune.train.rundir import check_unused, finished_summary, run_dir_path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; run again with --resume auto


class Preempted(LlamatuneError):
    """The run stopped on a signal after saving a checkpoint."""

    exit_code = EXIT_PREEMPTED


@dataclass(frozen=True)
class Start:
    """Where a `train` call starts from.

    Attributes:
        run_dir: The run directory.
        checkpoint: The checkpoint to continue from, or None to train from step 0.
        finished: The summary of a run that already finished (`--resume auto` then trains nothing), or None.
    """

    run_dir: Path
    checkpoint: Path | None = None
    finished: dict | None = None


def launched_rank() -> int:
    """This process's global rank as its launcher put it in the environment (0 when not launched).

    These are the variables accelerate reads (torchrun/accelerate, MPICH, Open MPI, MVAPICH), so the
    answer is known before torch and accelerate are imported: the run directory is locked first, and
    a second run on the same directory is refused in about a second, not after seconds of imports.
    """
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        value = int(os.environ.get(name, "-1") or -1)
        if value >= 0:
            return value
    return 0


def run_dir_for(recipe: Recipe, recipe_name: str, run_dir: Path | None, resume: str | None) -> Path:
    """The run directory a `train` call writes, decided before anything in it is read (so it can be locked first).

    Raises:
        RecipeError: If `auto` cannot tell which run is meant.
    """
    if resume is None:
        return run_dir_path(recipe, recipe_name, run_dir)
    if resume != "auto":
        return Path(resume).parent.parent  # runs/NAME/checkpoints/step-N
    if run_dir is None and not recipe.output.name:
        raise RecipeError(["--resume auto needs to know the run: pass --run-dir DIR or set output.name"])
    return run_dir or recipe.output.dir / recipe.output.name


def locate(run_dir: Path, resume: str | None, say) -> Start:
    """Decides how a run in `run_dir` starts (read while holding its lock: nobody else is writing it).

    `--resume auto` never fails for want of a checkpoint, so a requeue loop (Slurm) always makes
    progress: a finished run is reported and left alone, and a run killed before its first complete
    checkpoint starts again from step 0 in the same directory.

    Raises:
        RecipeError: If a new run (no --resume) would reuse a non-empty directory.
        LlamatuneError: If an explicit checkpoint fails its checksums (naming the file).
    """
    if resume is None:
        check_unused(run_dir)
        return Start(run_dir)
    if resume != "auto":
        checkpoint.verify(Path(resume))
        return Start(run_dir, Path(resume))
    finished = finished_summary(run_dir)
    if finished is not None:
        say(f"--resume auto: {run_dir} holds a finished run (summary.json and adapter/, step {finished.get('steps')} "
            f"of {finished.get('planned_steps')}); nothing to train")
        return Start(run_dir, finished=finished)
    found = checkpoint.latest(run_dir / "checkpoints", warn=lambda m: say(f"[yellow]warning:[/] {m}"))
    if found is None and run_dir.is_dir() and any(run_dir.iterdir()):
        say(f"--resume auto: {run_dir} has no complete checkpoint (found {_listing(run_dir)}); "
            "starting from step 0 in the same directory")
    return Start(run_dir, found)


def restored_counters(state: dict) -> dict:
    """state.json as the training loop keeps it in memory.

    Strict JSON wrote the two figures that are not finite numbers as null: the best held-out loss
    before any evaluation (infinite, so the first one is an improvement) and the loss of a skipped
    step (NaN). A checkpoint written before the last loss was recorded has none: NaN too.
    """
    best, loss = state.get("best_eval_loss"), state.get("loss")
    return {**state, "best_eval_loss": float("inf") if best is None else best, "loss": float("nan") if loss is None else loss}


def check_unchanged(run_dir: Path, recipe: Recipe, force: bool, say) -> None:
    """Refuses to resume when the recipe differs from the one the run was started with."""
    saved = load_recipe(run_dir / "recipe.yaml", saved=True)
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


def _listing(run_dir: Path) -> str:
    """What an interrupted attempt left, in a few words: top-level names, checkpoint folders spelled out."""
    names = []
    for path in sorted(run_dir.iterdir()):
        if path.name == "checkpoints" and path.is_dir():
            names += [f"checkpoints/{p.name}" + (" (unfinished save)" if p.name.startswith(".staging-") else " (does not verify)")
                      for p in sorted(path.iterdir())] or ["checkpoints/ (empty)"]
        else:
            names.append(path.name + ("/" if path.is_dir() else ""))
    return ", ".join(names)


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
