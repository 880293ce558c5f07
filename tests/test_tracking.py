"""train.tracking: mlflow, against a real MLflow tracking server started here on 127.0.0.1, and the local store."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from llamatune.cli import app  # noqa: E402
from llamatune.recipe import load_recipe  # noqa: E402
from llamatune.train.loop import train  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free loopback port, with a SQLite store and served artifacts; its URI."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _recipe(tiny_recipe, *more):
    return load_recipe(tiny_recipe, ["train.tracking=mlflow", "train.tracking_experiment=llamatune-test", *more])


def test_a_run_and_its_eval_are_readable_back_from_a_real_server(server, tiny_recipe, tmp_path, monkeypatch):
    """Acceptance: params, step metrics, held-out metrics, artifacts and the eval results, through MlflowClient."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("LLAMATUNE_TEST_TOKEN", "s3cr3t-value-42")
    run = tmp_path / "run"
    # a value taken from the environment (a secret) in the recipe: it must reach MLflow as ${NAME}, never as itself
    result = train(_recipe(tiny_recipe, "train.log_every=1", "output.name=${LLAMATUNE_TEST_TOKEN}"), "t", run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    tracking = summary["tracking"]
    assert tracking["backend"] == "mlflow" and tracking["uri"] == server and tracking == result.summary["tracking"]
    assert json.loads((run / "tracking.json").read_text())["run_id"] == tracking["run_id"]
    client = MlflowClient(server)
    got = client.get_run(tracking["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert client.get_experiment(got.info.experiment_id).name == "llamatune-test"
    params = got.data.params
    assert float(params["train.lr"]) == pytest.approx(float(load_recipe(tiny_recipe).train.lr))
    assert params["data.train.0.path"].endswith("train.jsonl") and params["train.tracking"] == "mlflow"
    assert params["output.name"] == "${LLAMATUNE_TEST_TOKEN}"
    assert not any("s3cr3t-value-42" in v for v in params.values())
    losses = client.get_metric_history(tracking["run_id"], "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    held = client.get_metric_history(tracking["run_id"], "eval_loss")
    assert [m.step for m in held] == [0, 4] and held[-1].value == pytest.approx(summary["eval_loss_after"])
    assert got.data.metrics["summary.tokens_per_s"] == pytest.approx(summary["tokens_per_s"])
    artifacts = {a.path for a in client.list_artifacts(tracking["run_id"])} | \
        {a.path for a in client.list_artifacts(tracking["run_id"], "adapter")}
    assert {"recipe.yaml", "summary.json", "metrics.jsonl", "data_manifest.json", "loss.png",
            "adapter/adapter_config.json"} <= artifacts
    assert not any(p.endswith(".safetensors") for p in artifacts)  # never the weights
    recipe_copy = client.download_artifacts(tracking["run_id"], "recipe.yaml", str(tmp_path / "dl"))
    assert "s3cr3t-value-42" not in open(recipe_copy).read()

    evaluated = CliRunner().invoke(app, ["eval", str(run), "--compare", "base", "--no-generate"])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"eval logged to MLflow run {tracking['run_id']}" in evaluated.output
    report = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    metrics = client.get_run(tracking["run_id"]).data.metrics
    assert metrics["eval.loss.tuned"] == pytest.approx(report["loss"]["tuned"][0])
    assert metrics["eval.loss.delta"] == pytest.approx(report["loss"]["delta"][0])
    assert {a.path for a in client.list_artifacts(tracking["run_id"], "eval")} == {"eval/eval.json", "eval/eval.md"}


def test_resume_continues_the_same_mlflow_run(server, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    run = tmp_path / "run"
    env = {**os.environ, "LLAMATUNE_FAULT": "after-optimizer:4"}  # killed inside the step-4 save: resumes from 2
    cmd = [sys.executable, "-m", "llamatune", "train", str(tiny_recipe), "--run-dir", str(run), "--set", "train.tracking=mlflow",
           "--set", "train.save_every=2", "--set", "train.log_every=1"]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode != 0
    first = json.loads((run / "tracking.json").read_text())["run_id"]
    done = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tracking"]["run_id"] == first and summary["resumed_from_step"] == 2
    client = MlflowClient(server)
    assert client.get_run(first).info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(first, "loss")}) == [1, 2, 3, 4]


def test_without_a_server_uri_a_local_store_in_output_dir(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = _recipe(tiny_recipe, f"output.dir={tmp_path / 'runs'}")
    result = train(recipe, "t", run_dir=tmp_path / "runs" / "local")
    tracking = result.summary["tracking"]
    assert tracking["uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking["uri"])
    assert client.get_run(tracking["run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(tracking["run_id"], "loss")) >= 1
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # the artifacts stay beside the runs, not in the working folder
    assert {a.path for a in client.list_artifacts(tracking["run_id"])} >= {"recipe.yaml", "summary.json"}


def test_an_unreachable_server_fails_before_training_with_a_clear_error(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{_free_port()}")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "--run-dir", str(tmp_path / "run"),
                                      "--set", "train.tracking=mlflow"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "train.tracking: mlflow: cannot use the tracking server http://127.0.0.1:" in text and "pw" not in text
    assert "MLFLOW_TRACKING_URI" in text and time.monotonic() - started < 60
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
