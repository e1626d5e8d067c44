"""Test-wide isolation."""

from __future__ import annotations

import os

import pytest


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
