"""Test-wide isolation."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`-n N`), give each worker its own share of the cores this run may use.

    The stages size their thread pools from the process's CPU affinity (`pipeline.common.thread_count`), and the
    subprocesses a test starts inherit it: without a share each of N workers would start a full-width pool, and
    OpenMP pools oversubscribed on the same cores run several times slower than one thread each.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw"))
    share = cores[index * len(cores) // count : (index + 1) * len(cores) // count] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, share)
    try:
        import torch

        torch.set_num_threads(len(share))
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _isolated_mlflow_tracking_uri():
    """Keep one test's MLflow store from leaking into the next.

    `mlflow.set_tracking_uri` also exports `MLFLOW_TRACKING_URI` into the process environment, so after an
    in-process stage call every stage subprocess a later test starts would log into that test's store.
    """
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    try:
        import mlflow

        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    except ImportError:
        pass
