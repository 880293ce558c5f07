"""Runs tracked in MLflow (`train.tracking: mlflow`): where teams in regulated domains already compare runs, on
their own server.

    params     the resolved recipe, flattened (train.lr, data.train.0.path, ...), secrets shown as ${NAME}
    metrics    every metrics.jsonl record at its step (loss, lr, epoch, tokens, tokens/s, eval_loss, eval_s), then the
               summary's numbers; `llamatune eval` of the run adds eval.<metric>.<tuned|base|delta>
    artifacts  the run directory's small files (recipe, summary, manifest, metrics, loss.png, adapter config,
               model card), never weights or checkpoints; eval adds eval/eval.json and eval.md

The server is MLFLOW_TRACKING_URI (MLflow's own variable, so its auth variables work as usual); unset, a local
store that works offline: output.dir/mlflow.db (SQLite; MLflow 3 refuses new file stores) with artifacts in
output.dir/mlartifacts (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`). The MLflow run id is kept
in RUN/tracking.json and summary.json; `--resume` continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from llamatune.errors import LlamatuneError, RecipeError

URI_ENV = "MLFLOW_TRACKING_URI"
INFO_FILE = "tracking.json"
# The run directory's small files; weights (adapter_model.safetensors) and checkpoints stay out of the store.
ARTIFACTS = ("recipe.yaml", "summary.json", "data_manifest.json", "metrics.jsonl", "loss.png", INFO_FILE,
             "adapter/adapter_config.json", "adapter/README.md")
_BATCH = 100  # MLflow's limit of params per log_batch request


class Tracker:
    """One MLflow run, written through MlflowClient (no global active run: two trainings in one process cannot mix)."""

    def __init__(self, client, run_id: str, uri: str, experiment_id: str):
        self.client, self.run_id, self.uri, self.experiment_id = client, run_id, uri, experiment_id

    @property
    def info(self) -> dict:
        """What summary.json and tracking.json record: enough to find the run again (no credentials)."""
        return {"backend": "mlflow", "uri": _shown_uri(self.uri), "experiment_id": self.experiment_id, "run_id": self.run_id}

    def bind(self, run_dir: Path) -> None:
        """Writes RUN/tracking.json, so a resumed run and `llamatune eval` find this MLflow run."""
        from llamatune import strictjson

        strictjson.write(run_dir / INFO_FILE, self.info)

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record: its numbers at its step."""
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [Metric(metric_name(k), float(v), now, step) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_files(self, folder: Path, names=ARTIFACTS, under: str | None = None) -> None:
        for name in names:
            if (folder / name).is_file():
                parent = str(Path(name).parent)
                path = "/".join(p for p in (under, None if parent == "." else parent) if p) or None
                self.client.log_artifact(self.run_id, str(folder / name), path)


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and spaces): `macro_f1 (Yes, No)` -> `macro_f1_Yes_No`."""
    return re.sub(r"_+", "_", re.sub(r"[^\w\-./ ]", "_", name)).strip("_ ")


@contextmanager
def session(recipe, run_dir: Path, resume: str | None, enabled: bool) -> Iterator[Tracker | None]:
    """The MLflow run of one `llamatune train`, or None when tracking is off (or on non-main processes).

    Connects and starts (or, with --resume, re-opens) the run before any weight loads, so a wrong server fails in
    seconds; ends it FINISHED, KILLED (stopped by a signal, resumable) or FAILED.

    Raises:
        RecipeError: If mlflow is not installed.
        LlamatuneError: If the tracking server cannot be reached.
    """
    if not enabled:
        yield None
        return
    from llamatune.recipe import recipe_to_yaml, redactor_of
    from llamatune.runs import flatten

    local = Path(recipe.output.dir).resolve()
    client, uri = _client(os.environ.get(URI_ENV) or f"sqlite:///{local / 'mlflow.db'}")
    local.mkdir(parents=True, exist_ok=True)  # where a local store goes (output.dir exists for every run anyway)
    artifacts = None if os.environ.get(URI_ENV) else (local / "mlartifacts").as_uri()
    experiment_id = _experiment(client, uri, recipe.train.tracking_experiment, artifacts)
    previous = _previous_run(run_dir) if resume else None
    if previous:
        run_id = previous
        client.update_run(run_id, status="RUNNING")
    else:
        import yaml

        params = redactor_of(recipe).data(flatten(yaml.safe_load(recipe_to_yaml(recipe))))
        run_id = client.create_run(experiment_id, run_name=run_dir.name, tags={"llamatune.run_dir": str(run_dir.resolve()),
                                                                                "mlflow.runName": run_dir.name}).info.run_id
        _log_params(client, run_id, params)
    tracker = Tracker(client, run_id, uri, experiment_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        from llamatune.train.resume import Preempted

        status = "KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status=status)
        except Exception:  # the server went away during training: the run directory has everything
            pass


def log_eval(run: Path, summary: dict, out_dir: Path, step: int | None, say) -> None:
    """Adds an evaluation of `run` (or of one of its checkpoints, at `step`) to the run's MLflow run, when it has one."""
    info_file = run / INFO_FILE
    if not info_file.is_file():
        return
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        run_id = info["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        say(f"warning: {info_file} is damaged; this evaluation is not added to MLflow")
        return
    prefix = "eval" if step is None else "eval_checkpoint"
    record = {"step": step or 0}
    for name, entry in summary.items():
        for part, value in entry.items():  # tuned, base, delta, ratio (several comparisons: start, delta_start, ...)
            if isinstance(value, list) and value:
                record[f"{prefix}.{metric_name(name)}.{part}"] = value[0]
    try:
        client, _ = _client(os.environ.get(URI_ENV) or info.get("uri"))
        tracker = Tracker(client, run_id, "", info.get("experiment_id", ""))
        tracker.log_record(record)
        tracker.log_files(out_dir, ("eval.json", "eval.md"), under=prefix if step is None else f"{prefix}/step-{step}")
    except Exception as exc:  # the reports are written: a tracking problem must not fail the eval
        first = re.sub(r"//[^/@\s]+@", "//", (str(getattr(exc, "problems", [exc])[0]).strip().splitlines()
                                               or [type(exc).__name__])[0])[:300]
        say(f"warning: this evaluation was not added to MLflow run {run_id} ({first}); the reports above have it all")
        return
    say(f"eval logged to MLflow run {run_id}")


def _client(uri: str):
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise RecipeError(["train.tracking: mlflow is not installed; pip install 'llamatune[mlflow]' or set "
                           "train.tracking: none"]) from None
    # Fail in seconds, not after MLflow's default retries (minutes), when the server is down or the URI wrong;
    # a user who set these keeps their values.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return MlflowClient(tracking_uri=uri), uri


def _experiment(client, uri: str, name: str, artifacts: str | None) -> str:
    try:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:  # connection refused, DNS, auth, a store that is not MLflow's: all say the same to a user
        first = re.sub(r"//[^/@\s]+@", "//", (str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]  # no password
        raise LlamatuneError(f"train.tracking: mlflow: cannot use the tracking server {_shown_uri(uri)} ({first}); "
                             f"check {URI_ENV} (unset it for a local store in output.dir/mlflow.db) or set "
                             "train.tracking: none") from None


def _previous_run(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / INFO_FILE).read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])


def _shown_uri(uri: str) -> str:
    """The URI without a user:password part (MLflow accepts one in the URL)."""
    parts = urlsplit(uri)
    if parts.password or parts.username:
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return uri
