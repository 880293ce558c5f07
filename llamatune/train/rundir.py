"""The run directory: the self-describing output of `llamatune train` and the input of merge/eval.

    runs/<name>/
      recipe.yaml     resolved recipe (absolute paths): the only input later commands need
      adapter/        peft format (adapter_config.json + adapter_model.safetensors)
      tokenizer/      with the chat template used in training
      metrics.jsonl   one JSON object per logged step / evaluation
      data_manifest.json  sources with sha256, record/example counts, drops by reason, split, overlap
      summary.json    steps, tokens, tokens/s, wall time, held-out loss before/after, versions
      loss.png        train and held-out loss curves
      checkpoints/    step-N/ folders (train.save_every), written atomically; see checkpoint.py
      tensorboard/    event files, when train.tensorboard is on

Every .json and .jsonl file is strict JSON (strictjson.py): a figure that is not a finite number is
null, with a reason in the object's `null_reasons`.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import metadata
from pathlib import Path

from llamatune import strictjson
from llamatune.errors import RecipeError
from llamatune.recipe import Recipe, recipe_to_yaml
from llamatune.train import checkpoint

_VERSIONED = ("llamatune", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def run_dir_path(recipe: Recipe, recipe_name: str, override: Path | None = None) -> Path:
    """The run directory a new run writes: `override`, output.dir/output.name, or a timestamped name."""
    if override is not None:
        return override
    if recipe.output.name:
        return recipe.output.dir / recipe.output.name
    return recipe.output.dir / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_unused(path: Path) -> None:
    """Refuses to start a new run in a non-empty directory (earlier results are never lost).

    Raises:
        RecipeError: If the path is a file, or a directory that is not empty.
    """
    if path.exists() and not path.is_dir():
        raise RecipeError([f"{path} is an existing file, not a run directory; choose another --run-dir or output.name"])
    if path.exists() and any(path.iterdir()):
        raise RecipeError([
            f"output: run directory {path} already exists and is not empty; choose another with "
            "--run-dir DIR or --set output.name=NEW_NAME (llamatune never overwrites a run)"
        ])


def start_run_dir(path: Path, recipe: Recipe) -> None:
    """Creates the run directory and writes the resolved recipe first, so even a crashed run explains itself.

    In a directory left by an attempt killed before its first checkpoint (`--resume auto` then starts
    from step 0 there), what that attempt logged is removed, so the files describe this run only:
    metrics.jsonl, TensorBoard events and unfinished checkpoint saves.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "recipe.yaml").write_text(recipe_to_yaml(recipe), encoding="utf-8")
    (path / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(path / "tensorboard", ignore_errors=True)
    checkpoint.discard_unfinished(path / "checkpoints")


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (flushed, so a crash keeps what was logged),
    and mirrors the numbers to TensorBoard when asked.

    Args:
        path: metrics.jsonl, or None on processes that do not write.
        tensorboard: Folder for TensorBoard event files, or None.
        tracker: An MLflow run (train/tracking.py) that gets every record too, or None. It is told the run directory
            here, which exists by now.
    """

    def __init__(self, path: Path | None, tensorboard: Path | None = None, tracker=None):
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self._tracker = tracker if path is not None else None
        if self._tracker is not None:
            self._tracker.bind(path.parent)
        self._tb = None
        if path is not None and tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RecipeError(["train.tensorboard: the tensorboard package is not installed; "
                                   "pip install 'llamatune[tensorboard]' or set train.tensorboard: false"]) from None
            self._tb = SummaryWriter(str(tensorboard))

    def write(self, **record) -> None:
        if self._file is not None:
            self._file.write(strictjson.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
        if self._tracker is not None:
            self._tracker.log_record(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def write_manifest(path: Path, manifest: dict) -> None:
    """Writes data_manifest.json: where every example came from and what was dropped, and why."""
    strictjson.write(path / "data_manifest.json", manifest)


def write_summary(path: Path, summary: dict) -> None:
    """Writes summary.json with the library versions the run used appended: the run's last file."""
    strictjson.write(path / "summary.json", {**summary, "versions": library_versions()})


def finished_summary(path: Path) -> dict | None:
    """The summary of the finished run in `path`, or None if the run has not finished.

    A run is finished when its adapter/ and summary.json are both there: summary.json is written
    last and atomically, so it never exists for a run that was stopped before the end.
    """
    if not (path / "adapter").is_dir():
        return None
    try:
        return json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that determine a run's numbers."""
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
