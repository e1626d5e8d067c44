"""What the stages log to MLflow, so that runs tell apart in the UI (the run lifecycle lives in `tracking.py`).

- The store: `store_root` is the user's repository even when `dvc exp run --temp/--queue` runs the stage in a
  throw-away copy (DVC exports the parent repository as `DVC_ROOT`). `ensure_experiment` creates the experiment
  with its artifacts next to the sqlite file (`<store>/mlartifacts/<id>`, never under whatever directory a stage
  happens to run in) and tagged for MLflow's training view (not the GenAI one); when the repository was moved or
  copied (the sqlite file now lives elsewhere than the artifact paths it records), the paths are moved along.
- Grouping: `run_tags` tags every run with the DVC experiment (`dvc_exp`: its name, or `workspace` for a plain
  `dvc repro`) and nests it under one parent run per pipeline execution (`mlflow.parentRunId`): one parent per
  DVC experiment, one per git revision for workspace runs.
- Params: `stage_params` keeps only the params a stage declares in `dvc.yaml` (the same list DVC tracks);
  `model_params` logs the resolved model config (`model.d_model`, `model.n_hashes`, ...) and parameter counts
  under the same keys for every family, so MLflow's compare view shows what differs.
- `log_token_splits` logs the data splits as dataset inputs (source, digest, rows and tokens per split).
- `log_trained_model` logs a trained model as an MLflow 3 LoggedModel from its safetensors + config, as a
  model from code (`pipeline/tracking/pyfunc.py`, nothing pickled), links metrics to it, and registers it on request.

Every function expects the caller to be the process that logs (global rank zero).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource

log = logging.getLogger("pipeline")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_VIEW = "custom_model_development"  # MLflow 3's "Machine learning" experiment type, not GenAI
ARTIFACTS_DIR = "mlartifacts"
WORKSPACE = "workspace"
PARENT_KEY_TAG = "pipeline_execution"
MAX_PARAM_LENGTH = 6000
EXPERIMENT_DESCRIPTION = (
    "The model variants of params.yaml (`models:`), trained and evaluated by the DVC pipeline of this repository. "
    "Runs are nested under one "
    "parent per pipeline execution (tag `dvc_exp`: the DVC experiment, or `workspace`); filter with "
    "`tags.stage = 'pretrain'` and compare a stage's runs: the `model.*` params show how the variants differ."
)
PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
MODELS_PACKAGE = Path(__file__).resolve().parents[2] / "models"
PIPELINE_DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"


# ------------------------------------------------------------------------------------------------ store


def store_root(root: str | Path) -> Path:
    """The repository whose store a stage logs into: DVC's parent repository under `dvc exp run`, else `root`.

    `dvc exp run --temp` and `--queue` run the stages in a copy under `.dvc/tmp/exps/`, which is deleted
    afterwards; DVC exports the user's repository as `DVC_ROOT`, so the default `mlflow.db` stays the user's.
    """
    dvc_root = os.environ.get("DVC_ROOT")
    return Path(dvc_root).resolve() if dvc_root and Path(dvc_root).is_dir() else Path(root).resolve()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _local_path(location: str) -> Path | None:
    """A local artifact location (`/abs/path` or `file:///abs/path`) as a path; None for remote ones."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(url2pathname(parsed.path))
    return None


def ensure_experiment(uri: str, name: str, description: str | None = None) -> str:
    """The id of experiment `name`, created if needed: training view, artifacts beside the sqlite store.

    For a sqlite store whose artifact paths point outside the directory holding the database (the repository was
    moved or copied since), the recorded paths are rewritten to the same place under the new directory.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    db = sqlite_path(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {EXPERIMENT_KIND_TAG: TRAINING_VIEW}
        if description:
            tags["mlflow.note.content"] = description
        location = None
        if db is not None:  # not the cwd-relative `./mlruns` MLflow would pick
            location = (db.parent / ARTIFACTS_DIR / _safe_name(name)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_VIEW:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_VIEW)
    if db is not None:
        relocate_artifacts(db, experiment.experiment_id, experiment.artifact_location)
    return experiment.experiment_id


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"


def relocate_artifacts(db: Path, experiment_id: str, location: str) -> bool:
    """Point the experiment's artifact paths under `db`'s directory again if they lie outside it.

    The artifacts are assumed to have travelled with the database (the layout `<store>/<dir>/<name>` is kept):
    the path prefix `<old store>` becomes `<db directory>` in the experiment, its runs, logged models and
    model versions. MLflow has no API to change an experiment's artifact location, hence the direct update.
    Returns whether anything was rewritten.
    """
    old = _local_path(location)
    if old is None or not old.is_absolute():
        return False
    new_store = db.parent.resolve()
    if old == new_store or new_store in old.parents:
        return False
    old_store = old.parent.parent  # <old store>/<dir>/<experiment>
    new = new_store / old.relative_to(old_store)
    log.info("MLflow store moved: artifact paths %s -> %s", old_store, new_store)
    prefixes = [(old_store.as_uri(), new_store.as_uri()), (str(old_store), str(new_store))]
    updates = [
        ("experiments", "artifact_location", "experiment_id = ?", (int(experiment_id),)),
        ("runs", "artifact_uri", "experiment_id = ?", (int(experiment_id),)),
        ("logged_models", "artifact_location", "experiment_id = ?", (int(experiment_id),)),
        ("model_versions", "storage_location", "1 = 1", ()),
    ]
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column, where, args in updates:
            if table not in tables:
                continue
            for before, after in prefixes:
                con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 (fixed names)
                    f"WHERE {where} AND substr({column}, 1, ?) = ?",
                    (after, len(before) + 1, *args, len(before), before),
                )
    return new != old


# ------------------------------------------------------------------------------------------------ tags


def dvc_experiment() -> tuple[str, str | None]:
    """(DVC experiment name or `workspace`, baseline git revision or None), from what `dvc exp run` exports."""
    return os.environ.get("DVC_EXP_NAME") or WORKSPACE, os.environ.get("DVC_EXP_BASELINE_REV") or None


def parent_run(uri: str, experiment_id: str, git_revision: str, preset: str = "none") -> str:
    """The id of the parent run grouping this pipeline execution, created (and closed) on first use.

    One per DVC experiment; workspace runs (`dvc repro`) group by git revision. The parent run is created
    FINISHED (it has no process of its own); each stage run that ends sets it from its stages (`settle_parent`):
    FAILED while the latest attempt of some stage failed.
    """
    from mlflow.tracking import MlflowClient

    exp_name, baseline = dvc_experiment()
    revision = baseline or git_revision
    key = f"{exp_name}@{revision}"
    client = MlflowClient(uri)
    found = client.search_runs([experiment_id], f"tags.{PARENT_KEY_TAG} = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    label = exp_name if exp_name != WORKSPACE else f"{WORKSPACE}@{revision[:12]}"
    tags = {PARENT_KEY_TAG: key, "dvc_exp": exp_name, "git_revision": revision, "stage": "pipeline", "preset": preset}
    run = client.create_run(experiment_id, tags=tags, run_name=label)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def settle_parent(uri: str, parent_id: str) -> str:
    """Set a parent run's status from its stage runs and return it: FAILED when the latest attempt of any stage
    under it failed or was killed (a failed `dvc exp run` shows FAILED where users look), else FINISHED. Called
    whenever a stage run ends, so a stage that fails and then succeeds on a re-run leaves the parent FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000
    )
    latest: dict[str, Any] = {}
    for child in children:
        name = child.info.run_name or child.info.run_id
        if name not in latest or child.info.start_time > latest[name].info.start_time:
            latest[name] = child
    failed = [n for n, r in latest.items() if r.info.status in ("FAILED", "KILLED")]
    status = "FAILED" if failed else "FINISHED"
    if parent.info.status != status:
        client.set_terminated(parent_id, status=status)
    if failed:
        client.set_tag(parent_id, "failed_stages", ", ".join(sorted(failed))[:MAX_PARAM_LENGTH])
    elif "failed_stages" in parent.data.tags:
        client.delete_tag(parent_id, "failed_stages")
    return status


def run_tags(
    uri: str, experiment_id: str, git_revision: str, seed: int | None = None, preset: str = "none"
) -> dict[str, str]:
    """Tags for a stage's run: the DVC experiment, its baseline, the seed, and the parent run of the execution."""
    exp_name, baseline = dvc_experiment()
    tags = {"dvc_exp": exp_name, "mlflow.parentRunId": parent_run(uri, experiment_id, git_revision, preset)}
    if baseline:
        tags["dvc_baseline_rev"] = baseline
    if seed is not None:
        tags["seed"] = str(seed)
    return tags


def context_tags(
    uri: str, experiment: str, git_revision: str, seed: int | None = None, preset: str = "none"
) -> dict[str, str]:
    """`run_tags` for a stage about to start its run in `experiment` (created by `ensure_experiment` if new), with
    the params preset that ran (`preset` param, set by `python -m pipeline.preset`)."""
    experiment_id = ensure_experiment(uri, experiment, description=EXPERIMENT_DESCRIPTION)
    return {**run_tags(uri, experiment_id, git_revision, seed, preset), "preset": preset}


# ------------------------------------------------------------------------------------------------ params


def dvc_stage_params(dvc_yaml: str | Path, stage: str, item: Mapping[str, Any] | None = None) -> list[str]:
    """The params keys `dvc.yaml` lists for `stage`, with `${item.<key>}` filled in from `item`."""
    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}
    keys: list[str] = []
    for entry in (spec.get("stages", {}).get(stage) or {}).get("params", []) or []:
        names = entry if isinstance(entry, str) else [k for v in entry.values() for k in (v or [])]
        for name in [names] if isinstance(names, str) else names:
            keys.append(re.sub(r"\$\{item\.(\w+)\}", lambda m: str((item or {}).get(m.group(1), m.group(0))), name))
    return keys


def select_params(params: Mapping[str, Any], keys: Sequence[str], drop: Sequence[str] = ()) -> dict[str, Any]:
    """The nested subset of `params` named by the dotted `keys`, minus the dotted `drop` keys."""
    out: dict[str, Any] = {}
    for key in keys:
        if any(key == d or key.startswith(d + ".") for d in drop):
            continue
        node: Any = params
        parts = key.split(".")
        for part in parts:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            target = out
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = node
    return out


def stage_params(
    params: Mapping[str, Any], stage: str, variant: str, seed: int | None, root: str | Path
) -> dict[str, Any]:
    """The params sections `stage` reads (its `dvc.yaml` list), without the raw `models` section.

    The model is logged resolved instead (`model_params`), under keys every family shares. The list comes from
    the project's `dvc.yaml`, else from the one beside this code (a project run without DVC); all params but
    `models` when neither lists the stage.
    """
    item = {"model": variant, "variant": variant, "family": variant, "seed": seed}
    keys: list[str] = []
    for dvc_yaml in (Path(root) / "dvc.yaml", PIPELINE_DVC_YAML):
        if dvc_yaml.is_file():
            keys = dvc_stage_params(dvc_yaml, stage, item)
            if keys:
                break
    if not keys:
        return {k: v for k, v in params.items() if k != "models"}
    return select_params(params, keys, drop=["models"])


def model_params(model: Any, variant: str, family: str) -> dict[str, str]:
    """The resolved model config and parameter counts as MLflow params: `model.<field>`, the same for all families."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    out = {"model.variant": variant, "model.family": family}
    for key, value in sorted(config.items()):
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        out[f"model.{key}"] = text[:MAX_PARAM_LENGTH]
    out["model.parameters"] = str(model.num_parameters())
    out["model.non_embedding_parameters"] = str(model.num_parameters(non_embedding=True))
    return out


def model_params_from_dir(directory: str | Path, variant: str) -> dict[str, str]:
    """`model_params` of a saved model from its `config.json` alone (no weights loaded; no parameter counts)."""
    try:
        saved = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"model.variant": variant}
    out = {"model.variant": variant, "model.family": str(saved.get("family", ""))}
    for key, value in sorted((saved.get("config") or {}).items()):
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        out[f"model.{key}"] = text[:MAX_PARAM_LENGTH]
    return out


# ------------------------------------------------------------------------------------------------ datasets


class DvcOutputSource(DatasetSource):
    """A dataset that is a DVC output of this project: its path in the repository (never absolute) and origin."""

    def __init__(self, path: str, origin: str, stage: str | None = None):
        self.path, self.origin, self.stage = path, origin, stage

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        """The path, relative to the repository root (run `dvc pull`/`dvc repro` to materialise it)."""
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcOutputSource:
        raise NotImplementedError("DVC sources are built from their fields")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "origin": self.origin, "stage": self.stage}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcOutputSource:
        return cls(source_dict["path"], source_dict.get("origin", ""), source_dict.get("stage"))


class SplitDataset(Dataset):
    """One split of a project dataset as MLflow sees it: name, digest, DVC source, and its size as profile."""

    def __init__(self, source: DvcOutputSource, name: str, digest: str, profile: Mapping[str, int]):
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:
        return hashlib.sha256(json.dumps([self.name, self.source.to_dict()]).encode()).hexdigest()[:8]

    @property
    def profile(self) -> dict[str, int]:
        return self._profile

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._profile)
        return config


@dataclass(frozen=True)
class SplitInfo:
    """What is logged of one data split: its name, path in the repository, content digest and sizes."""

    name: str  # e.g. `tokenized/train`
    path: str  # relative to the repository root, e.g. `data/tokenized/train`
    digest: str
    context: str  # MLflow input context: `training`, `validation`, `test`
    profile: Mapping[str, int]


def content_digest(*parts: Any) -> str:
    """A short digest of JSON-serialisable parts (e.g. a split's fingerprint and its sizes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_store_splits(
    root: str | Path, contexts: Mapping[str, str], directory: str = "data/tokenized"
) -> list[SplitInfo]:
    """The splits of the token store under `root` (`<split>/meta.json`: documents, tokens, sha256) to log.

    `contexts` maps a split to its MLflow input context, e.g. `{"train": "training", "validation": "validation"}`.
    """
    out = []
    for split, context in contexts.items():
        meta_path = Path(root) / directory / split / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("MLflow: %s unreadable, split %s not logged as a dataset", meta_path, split)
            continue
        sizes = {k: int(meta[k]) for k in ("documents", "tokens") if k in meta}
        digest = str(meta.get("sha256") or content_digest(meta))[:16]
        out.append(SplitInfo(f"{Path(directory).name}/{split}", f"{directory}/{split}", digest, context, sizes))
    return out


def training_inputs(
    stage: str, root: str | Path, sizes: Mapping[str, int], section: Mapping[str, Any] | None = None
) -> list[SplitInfo]:
    """The datasets a training stage reads, to log as its inputs.

    Pretraining reads the token store's train and validation splits. Fine-tuning reads the task mixture built
    from `data/prepared` and the task params (`section`): its digest covers both, `sizes` gives the examples of
    the `train` and `validation` sides.
    """
    if stage == "pretrain":
        return token_store_splits(root, {"train": "training", "validation": "validation"})
    prepared = Path(root) / "data" / "prepared"
    signature = sorted(
        (str(p.relative_to(prepared)), p.read_text(encoding="utf-8")) for p in prepared.glob("*/state.json")
    )
    tasks = dict((section or {}).get("tasks", {}))
    digest = content_digest(signature, tasks, (section or {}).get("mixing"))
    return [
        SplitInfo(f"{stage}-mixture/{split}", "data/prepared", digest, context, {"examples": int(sizes[split])})
        for split, context in (("train", "training"), ("validation", "validation"))
        if split in sizes
    ]


def log_token_splits(splits: Sequence[SplitInfo], origin: str, stage: str) -> list[SplitDataset]:
    """Log each split as a dataset input of the active run; returns the MLflow datasets (to link metrics)."""
    import mlflow

    datasets = [SplitDataset(DvcOutputSource(s.path, origin, stage), s.name, s.digest, s.profile) for s in splits]
    for dataset, split in zip(datasets, splits, strict=True):
        mlflow.log_input(dataset, context=split.context)
    return datasets


# ------------------------------------------------------------------------------------------------ models


def log_trained_model(
    final_dir: str | Path,
    tokenizer_dir: str | Path,
    name: str,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    model_type: str,
    register_as: str | None = None,
    dataset: Dataset | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log `final_dir` (safetensors + config.json) as a LoggedModel of the active run; returns its model id.

    The model is a model from code (`pipeline/tracking/pyfunc.py` with the `models` package), so nothing is
    pickled; `metrics` are linked to the model (and to `dataset` when given); `register_as` adds a version of
    that registered model.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars for a few small files
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_FILE),
        artifacts={"model": str(final_dir), "tokenizer": str(tokenizer_dir)},
        code_paths=[str(MODELS_PACKAGE)],
        pip_requirements=["torch", "safetensors", "sentencepiece", "mlflow"],
        params=dict(params),
        tags=dict(tags or {}),
        model_type=model_type,  # the signature (list of strings in, out) comes from the type hints of `predict`
        registered_model_name=register_as,
    )
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, model_id=info.model_id, dataset=dataset)
    return info.model_id


def runtime_params() -> dict[str, object]:
    """What a run records of how its CPU work ran: intra-op threads (resolved from trainer.threads), how OpenMP
    threads wait (`pipeline.openmp_wait`), and the CPU kernels resolved from the params' `kernels` section
    (`models.cpu_kernels`: `auto` logged as the kernel it chose on this machine), with the processor they ran on."""
    import torch

    import models
    from pipeline import openmp_wait

    kernels = models.cpu_kernels()
    return {
        "trainer.threads_used": torch.get_num_threads(),
        "trainer.openmp_wait": openmp_wait(),
        "kernels.matmul_resolved": kernels.matmul,
        "kernels.decoding_resolved": kernels.decoding,
        "kernels.paths_resolved": kernels.paths,
        "kernels.processor": models.processor_vendor() or "unknown",
    }
