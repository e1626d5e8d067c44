"""MLflow tracking: store resolution, fail-fast on an unreachable server, runs, resume, flattened params."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pipeline.common import StageError
from pipeline.tracking.runs import TrackedRun, check_tracking_uri, flatten, params_hash, tracking_uri


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_default_store_is_an_absolute_sqlite_file_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert tracking_uri("http://server:5000", tmp_path) == "http://server:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_uri("http://server:5000", tmp_path) == "http://elsewhere:5000"


def test_unreachable_server_is_a_clear_error_within_the_timeout():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(StageError, match="unreachable"):
        check_tracking_uri(uri, timeout_s=2.0)
    assert time.monotonic() - start < 30  # fails fast instead of MLflow's minutes of retries


def test_sqlite_store_in_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db", 1.0)
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db", 1.0)


def test_flatten_and_hash():
    flat = flatten({"pretrain": {"optimizer": {"lr": 0.001, "betas": [0.9, 0.99]}}, "seed": 1, "empty": {}})
    expected = {"pretrain.optimizer.lr": "0.001", "pretrain.optimizer.betas": "[0.9, 0.99]", "seed": "1", "empty": "{}"}
    assert flat == expected
    assert params_hash({"a": 1, "b": 2}) == params_hash({"b": 2, "a": 1}) != params_hash({"a": 1, "b": 3})


def test_run_tags_params_metrics_failure_and_resume(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tags = {"family": "t5", "stage": "pretrain", "git_revision": "abc", "params_hash": "123"}
    run = TrackedRun(uri, "exp", system_metrics=False)
    run_id = run.start("pretrain-t5", tags)
    run.log_params({"pretrain": {"max_steps": 10, "optimizer": {"lr": 0.01}}})
    run.log_metrics({"train/loss": 3.0}, step=5)
    run.finish("FAILED")
    client = MlflowClient(uri)
    stored = client.get_run(run_id)
    assert stored.info.status == "FAILED"
    assert {k: stored.data.tags[k] for k in tags} == tags
    assert stored.data.params == {"pretrain.max_steps": "10", "pretrain.optimizer.lr": "0.01"}

    again = TrackedRun(uri, "exp", system_metrics=False)
    assert again.start("pretrain-t5", tags, resume_run_id=run_id) == run_id and again.resumed
    again.log_params({"pretrain": {"max_steps": 10, "optimizer": {"lr": 0.01}}, "seed": 1})  # logged ones kept
    again.log_metrics({"train/loss": 2.0}, step=10)
    again.finish()
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(5, 3.0), (10, 2.0)]
    assert stored.data.params["seed"] == "1"
    experiment = client.get_experiment_by_name("exp")
    assert len(client.search_runs([experiment.experiment_id])) == 1

    unknown = TrackedRun(uri, "exp", system_metrics=False)
    left_running = unknown.start("pretrain-t5", tags, resume_run_id="0" * 32)  # gone: a new run
    assert left_running != run_id
    import mlflow

    mlflow.end_run()  # the process "dies": nothing marks the run, it stays RUNNING
    client.set_terminated(left_running, status="RUNNING")
    fresh = TrackedRun(uri, "exp", system_metrics=False)
    fresh.close_stale(left_running)  # a fresh attempt (no checkpoint to resume) closes it
    fresh.close_stale(run_id)  # finished runs are left alone
    assert client.get_run(left_running).info.status == "KILLED"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_inactive_run_does_nothing(tmp_path):
    run = TrackedRun(f"sqlite:///{tmp_path}/mlflow.db", "exp", active=False)
    assert run.start("x", {}) is None
    run.log_metrics({"a": 1.0}, step=1)
    run.finish("FAILED")
    assert not (tmp_path / "mlflow.db").exists()
