"""MLflow tracking for the training stages: one experiment, one run per (stage, family), rank zero only.

- Store: `MLFLOW_TRACKING_URI` if set, else `mlflow.tracking_uri` from params, else `sqlite:///<repo>/mlflow.db`
  with an absolute path (MLflow 3 refuses the old file store, and a relative path breaks under `dvc exp`, which
  runs stages in a temporary copy of the repository).
- `check_tracking_uri` fails fast with a `StageError` when a tracking server does not answer within
  `mlflow.connect_timeout_s`, before any training (MLflow's own client would retry for minutes, at the end).
- `check_tracking_uri` also opens an existing sqlite store read-only: a file that is not a database fails the stage
  before anything (checkpoints included) is touched.
- `TrackedRun` starts the run (tags: family, stage, git revision, params hash), or resumes the run whose id an
  interrupted attempt left behind, logs the params flattened, metrics per step (through `pipeline.module.MlflowMetrics`,
  a Lightning logger), system metrics, and artifacts. No Lightning here: evaluation and comparison track runs too.
- `tracked_run(run, ...)` is the run's whole life, used by every stage: it starts the run and ends it with the
  status `pipeline.common.outcome_of` decides (FINISHED, KILLED for SIGINT/SIGTERM, FAILED otherwise).
- A process killed with SIGKILL (or by the out-of-memory killer, or with its machine) cannot record its run's end.
  Every run is tagged with the process that runs it (`pipeline.process`, host:pid) and its repository
  (`pipeline.root`), and the next run of the same stage, variant and seed marks such a run KILLED
  (`close_stale_runs`, early in each stage and again when a run starts): when its process is gone from this host,
  or, for the training stages, which hold the run's lock, whenever it belongs to the same repository.
- Every process but global rank zero gets a `TrackedRun` that does nothing, so a 2-process run makes one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.common import (
    Outcome,
    StageError,
    StageInterrupted,
    _pid_alive,
    outcome_of,
    raise_if_signalled,
    received_signal,
    repo_root,
)

log = logging.getLogger("pipeline")

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PROCESS_TAG = "pipeline.process"  # `<host>:<pid>` of the process that started (or resumed) the run
ROOT_TAG = "pipeline.root"  # the repository whose outputs the run writes
KILLED_TAG = "pipeline.killed"  # why `close_stale_runs` marked the run KILLED
IDENTITY = ("stage", "variant", "seed")  # the tags naming what a run computes: one live run of each at a time


def tracking_uri(configured: str | None, root: str | Path) -> str:
    """The tracking URI to use: the environment wins, then params, then the repo's sqlite file (absolute).

    The repo is the user's one even when `dvc exp run --temp/--queue` runs the stage in a throw-away copy
    (`mlflow_logging.store_root`: DVC exports the parent repository as `DVC_ROOT`).
    """
    from pipeline.tracking.logged import store_root

    root = store_root(root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():  # relative to the repo, not to wherever the stage happens to run
            return f"sqlite:///{(Path(root) / path).resolve()}"
    return uri


def check_tracking_uri(uri: str, timeout_s: float) -> None:
    """Raise `StageError` unless the store can be used: an http(s) server must answer, a sqlite file be creatable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            return  # something answered (a proxy or an older server without /health): reachable
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StageError(
                f"MLflow tracking server {uri} is unreachable ({reason}, waited up to {timeout_s:g} s); start it, "
                "or unset MLFLOW_TRACKING_URI / mlflow.tracking_uri to use the local sqlite store"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        parent = path.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise StageError(f"MLflow store {uri}: directory {parent} does not exist or is not writable")
        if path.exists():
            check_sqlite_store(path)


def check_sqlite_store(path: Path) -> None:
    """Raise `StageError` when the sqlite file `path` is not a readable, writable SQLite database."""
    fix = (
        f"move it aside (mv {path} {path}.bad) to start a fresh store, or point MLFLOW_TRACKING_URI / "
        "mlflow.tracking_uri at a working one"
    )
    if not os.access(path, os.R_OK | os.W_OK):
        raise StageError(f"MLflow store {path} is not readable and writable: fix its permissions, or {fix}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            bad = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StageError(f"MLflow store {path} is not an SQLite database ({exc}): {fix}") from None
    if bad and bad[0] != "ok":
        raise StageError(f"MLflow store {path} is damaged (sqlite quick_check: {bad[0]}): {fix}")


def git_revision(root: str | Path) -> str:
    """The pipeline's git commit (with `-dirty` when tracked files changed), or `unknown` outside git."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`: nested params as MLflow param strings (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            out[name] = text[:MAX_PARAM_LENGTH]
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """A short, stable hash of params (order-independent)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def process_tags() -> dict[str, str]:
    """The tags naming this process and its repository (`close_stale_runs` reads them)."""
    return {PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}", ROOT_TAG: str(repo_root())}


def _why_stale(tags: Mapping[str, str], exclusive: bool) -> str | None:
    """Why a RUNNING run with these tags has no live process, or None when it may still be running."""
    host, _, pid = tags.get(PROCESS_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
        return f"its process (pid {pid} on {host}) is gone"
    if exclusive and tags.get(ROOT_TAG) == str(repo_root()):
        return "this process holds the stage's lock in the same repository, so no other process runs it"
    return None


def close_stale_runs(
    uri: str, experiment: str, tags: Mapping[str, str], exclusive: bool = False, keep: str | None = None
) -> list[str]:
    """Mark KILLED the runs of `experiment` with the same stage, variant and seed as `tags` that are still RUNNING
    though no process runs them any more (killed with SIGKILL, by the out-of-memory killer, or with the machine):
    their process is gone from this host, or (`exclusive`: the caller holds the stage's lock) they belong to this
    repository. `keep`: a run id left alone (the one being resumed). Returns the ids marked; each gets a
    `pipeline.killed` tag saying why, and a warning is logged. Problems of the store are warnings too: closing old
    runs must not stop the stage (starting its own run reports a broken store)."""
    identity = {k: str(tags[k]) for k in IDENTITY if k in tags}
    if "stage" not in identity:
        return []
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # no store yet: no run to close
    from mlflow.tracking import MlflowClient

    closed = []
    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        query = " and ".join(["attributes.status = 'RUNNING'", *(f"tags.{k} = '{v}'" for k, v in identity.items())])
        for stale in client.search_runs([found.experiment_id], query, max_results=100):
            run_id = stale.info.run_id
            why = None if run_id == keep else _why_stale(stale.data.tags, exclusive)
            if why is None:
                continue
            label = f"{identity['stage']}@{identity.get('variant', '?')}-{identity.get('seed', '?')}"
            note = (
                f"left RUNNING by a process that ended without recording the run's end ({why}); marked KILLED by "
                f"the next run of {label} (pid {os.getpid()}) at {time.strftime('%Y-%m-%d %H:%M:%S')}"
            )
            client.set_tag(run_id, KILLED_TAG, note)
            client.set_terminated(run_id, status="KILLED")
            log.warning("MLflow run %s of %s was %s", run_id, label, note)
            closed.append(run_id)
            parent = stale.data.tags.get("mlflow.parentRunId")
            if parent:  # the execution it belonged to shows the kill (`mlflow_logging.settle_parent`)
                from pipeline.tracking.logged import settle_parent

                settle_parent(uri, parent)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("could not check MLflow %s for runs left RUNNING: %s", uri, str(exc).splitlines()[0][:200])
    return closed


class TrackedRun:
    """The MLflow run of one (stage, family) attempt; inert (every method a no-op) when `active` is False.

    `exclusive`: the caller holds the stage's lock (the training stages), so any run of the same stage, variant
    and seed of this repository left RUNNING is stale (`close_stale_runs`)."""

    def __init__(
        self, uri: str, experiment: str, active: bool = True, system_metrics: bool = True, exclusive: bool = False
    ):
        self.uri, self.experiment, self.active, self.system_metrics = uri, experiment, active, system_metrics
        self.exclusive = exclusive
        self.run_id: str | None = None
        self.parent_id: str | None = None  # the pipeline execution's parent run (`mlflow_logging.parent_run`)
        self.resumed = False

    def start(self, run_name: str, tags: Mapping[str, str], resume_run_id: str | None = None) -> str | None:
        """Start a new run, or continue `resume_run_id` when it exists in this store. Returns the run id."""
        if not self.active:
            return None
        import mlflow

        try:
            mlflow.set_tracking_uri(self.uri)
            mlflow.set_experiment(self.experiment)
            if resume_run_id and not self._exists(resume_run_id):
                resume_run_id = None
            self.close_stale_runs(tags, keep=resume_run_id)
            run = mlflow.start_run(
                run_id=resume_run_id,
                run_name=None if resume_run_id else run_name,
                tags={**tags, **process_tags()},
                log_system_metrics=self.system_metrics,
            )
        except Exception as exc:  # MLflow and SQLAlchemy raise many types for a store that does not work
            raise StageError(
                f"MLflow store {self.uri} cannot start a run ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                ": check the store (or move a broken mlflow.db aside) and re-run"
            ) from None
        self.run_id, self.resumed = run.info.run_id, resume_run_id is not None
        self.parent_id = tags.get("mlflow.parentRunId") or run.data.tags.get("mlflow.parentRunId")
        return self.run_id

    def close_stale_runs(self, tags: Mapping[str, str], keep: str | None = None) -> list[str]:
        """`close_stale_runs` for this run's store and experiment (rank zero only)."""
        if not self.active:
            return []
        return close_stale_runs(self.uri, self.experiment, tags, self.exclusive, keep)

    def close_stale(self, run_id: str | None) -> None:
        """Mark a run an earlier, killed attempt left RUNNING (and that is not resumed) as KILLED."""
        if not (self.active and run_id and self._exists(run_id)):
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        stale = client.get_run(run_id)
        if stale.info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            parent = stale.data.tags.get("mlflow.parentRunId")
            if parent:
                from pipeline.tracking.logged import settle_parent

                settle_parent(self.uri, parent)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(self.uri).get_run(run_id)
            return True
        except MlflowException:
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log nested params flattened (`pretrain.optimizer.lr`); values already logged are kept on a resume."""
        if not self.active:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        flat = flatten(params)
        if self.resumed:
            logged = MlflowClient(self.uri).get_run(self.run_id).data.params
            flat = {k: v for k, v in flat.items() if k not in logged}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, directory: str | Path, artifact_path: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(obj, name)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        if self.active and self.run_id is not None:
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status=status)
            else:
                from mlflow.tracking import MlflowClient

                MlflowClient(self.uri).set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def tracked_run(
    run: TrackedRun, run_name: str, tags: Mapping[str, str], resume_run_id: str | None = None
) -> Iterator[TrackedRun]:
    """The MLflow run of one stage attempt, from start to its end status.

    The block's ending decides the status through `pipeline.common.outcome_of`: FINISHED when it completes with
    no signal received, KILLED on SIGINT/SIGTERM (then `StageInterrupted` is raised even if the block completed,
    so the stage does not exit 0), FAILED otherwise. A failure to record the status does not hide the stage's
    own error.
    """
    raise_if_signalled()  # no run is opened after a signal: it would only be marked KILLED
    run.start(run_name, tags, resume_run_id=resume_run_id)
    try:
        yield run
    except BaseException as exc:
        _finish_quietly(run, outcome_of(exc).mlflow_status)
        raise
    result = outcome_of(None)
    if result.outcome is not Outcome.FINISHED:
        _finish_quietly(run, result.mlflow_status)
        raise StageInterrupted(received_signal() or 15)
    run.finish("FINISHED")
    _settle_parent_quietly(run)


def _finish_quietly(run: TrackedRun, status: str) -> None:
    try:
        run.finish(status)
    except Exception as exc:  # the store broke too: the stage's own error is what the user must see
        print(f"warning: could not mark MLflow run {run.run_id} {status}: {exc}", file=sys.stderr)
    _settle_parent_quietly(run)


def _settle_parent_quietly(run: TrackedRun) -> None:
    """The parent run of the pipeline execution (the DVC experiment) takes its status from its stages."""
    if not (run.active and run.parent_id):
        return
    try:
        from pipeline.tracking.logged import settle_parent

        settle_parent(run.uri, run.parent_id)
    except Exception as exc:  # the stage's own outcome stands; say what could not be recorded
        print(f"warning: could not update MLflow parent run {run.parent_id}: {exc}", file=sys.stderr)
