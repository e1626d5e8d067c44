"""End to end against a real MLflow tracking server over HTTP: both families' runs, same metric names.

Starts `mlflow server` on a free local port with its own sqlite store and artifact directory, runs the tiny
pipeline (pretrain, finetune, evaluate for both families, benchmark, compare) with `MLFLOW_TRACKING_URI`
pointing at it, then reads the runs back through `MlflowClient`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.eval_project import make_eval_project, run_module

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'db'}", "--artifacts-destination", str(tmp_path / "art"),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (tmp_path / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {tail}") from None
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_pipeline_logs_both_families_to_a_tracking_server(tmp_path: Path, mlflow_server: str):
    project = make_eval_project(tmp_path / "project", {"benchmark.seq_lengths": [32], "benchmark.depths": [1]},
                                trained=True)  # fmt: skip
    extra = {"MLFLOW_TRACKING_URI": mlflow_server}
    steps = [("pipeline.pretrain", f) for f in ("t5", "reformer")] + [
        ("pipeline.finetune", f) for f in ("t5", "reformer")
    ]
    steps += [("pipeline.evaluate", f) for f in ("t5", "reformer")] + [
        ("pipeline.benchmark", None),
        ("pipeline.compare", None),
    ]
    for module, family in steps:
        args = ["--family", family] if family else []
        result = run_module(module, project, *args, extra_env=extra)
        assert result.returncode == 0, (module, family, result.stdout[-3000:])
    assert not (project / "mlflow.db").exists()  # everything went to the server

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    assert experiment is not None
    for stage in ("pretrain", "finetune", "evaluate"):
        runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")
        by_family = {r.data.tags["family"]: r for r in runs}
        assert set(by_family) == {"t5", "reformer"}, stage
        t5, reformer = by_family["t5"].data.metrics, by_family["reformer"].data.metrics
        assert set(t5) - _system(t5) == set(reformer) - _system(reformer), stage
        assert all(r.info.status == "FINISHED" for r in runs)
    evaluated = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    for run in evaluated:
        assert run.data.metrics["eval/test_loss"] > 0
        history = client.get_metric_history(run.info.run_id, "eval/listops/accuracy_beam1")
        assert len(history) == 1
    pretrain_t5 = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain' and tags.family = 't5'")[0]
    assert len(client.get_metric_history(pretrain_t5.info.run_id, "train/loss")) >= 2  # a curve, not a point
    (comparison,) = client.search_runs([experiment.experiment_id], "tags.stage = 'compare'")
    artifacts = {a.path for a in client.list_artifacts(comparison.info.run_id, "report")}
    assert "report/comparison.md" in artifacts and "report/loss_curves.png" in artifacts
    assert any((tmp_path / "art").rglob("comparison.md"))  # stored by the server, not by the client


def _system(metrics: dict) -> set[str]:
    return {k for k in metrics if k.startswith("system/")}
