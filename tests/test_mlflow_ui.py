"""What the MLflow UI shows after a pipeline run, checked against a real `mlflow server` on 127.0.0.1.

The tiny project runs every stage (pretrain, finetune, evaluate for both families with one seed, benchmark,
compare) with `MLFLOW_TRACKING_URI` pointing at the server, once for the module; the checks then go through the
REST API the web UI reads (params that differ between the two families, LoggedModels with their metrics,
registered fine-tuned models, dataset inputs, experiment and run tags, the parent run, the same metric names
for both families, the report stored by the server), and finally headless Chromium opens the UI's compare page
and the experiment's models page.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

from tests.eval_project import make_eval_project, run_module
from tests.mlflow_server import rest, serve

pytestmark = pytest.mark.slow

EXPERIMENT = "t5-vs-reformer"
VARIANTS = ("t5", "reformer")
FAST = {  # two optimizer steps per training stage: enough for every logged thing to exist
    "mlflow.log_models": True,
    "benchmark.seq_lengths": [32],
    "benchmark.depths": [1],
    "pretrain.max_steps": 2,
    "pretrain.val_every_n_steps": 2,
    "pretrain.log_every_n_steps": 1,
    "pretrain.checkpoint_every_n_steps": 2,
    "finetune.max_steps": 2,
    "finetune.val_every_n_steps": 2,
    "finetune.log_every_n_steps": 1,
    "finetune.checkpoint_every_n_steps": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(server URI, experiment id, tmp dir): the whole tiny pipeline run against the server."""
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    with serve(tmp / "server") as uri:
        project = make_eval_project(tmp / "project", FAST, trained=True)
        steps = [(f"pipeline.{stage}", ["--model", v, "--seed", "0"]) for stage in ("pretrain", "finetune", "evaluate")
                 for v in VARIANTS] + [("pipeline.benchmark", []), ("pipeline.compare", [])]  # fmt: skip
        for module, args in steps:
            result = run_module(module, project, *args, extra_env={"MLFLOW_TRACKING_URI": uri})
            assert result.returncode == 0, (module, args, result.stdout[-3000:])
        assert not (project / "mlflow.db").exists()  # everything went to the server
        experiment = rest(uri, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
        yield uri, experiment["experiment_id"], tmp


def _runs(uri: str, experiment_id: str, filter_string: str) -> list[dict]:
    body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100}
    return rest(uri, "runs/search", body).get("runs", [])


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("data", entity).get("tags", [])}


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _pretrain_runs(uri: str, experiment_id: str) -> dict[str, dict]:
    runs = _runs(uri, experiment_id, "tags.stage = 'pretrain'")
    return {_tags(r)["variant"]: r for r in runs}


def differing_params(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The params MLflow's compare view lists under "show diff only": values that differ or exist on one side."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def test_experiment_opens_in_the_training_view_and_stores_artifacts_on_the_server(trained):
    uri, experiment_id, _ = trained
    experiment = rest(uri, "experiments/get", experiment_id=experiment_id)["experiment"]
    tags = _tags(experiment)
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the training view, not GenAI
    assert "parent per pipeline execution" in tags["mlflow.note.content"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # the server's store, no client path


def test_the_two_pretrain_runs_differ_in_model_params_and_share_the_rest(trained):
    uri, experiment_id, tmp = trained
    runs = _pretrain_runs(uri, experiment_id)
    assert set(runs) == set(VARIANTS)
    t5, reformer = _params(runs["t5"]), _params(runs["reformer"])
    diff = differing_params(t5, reformer)
    (tmp / "differing_params.json").write_text(json.dumps(diff, indent=1))
    print(f"differing params in the compare view of the two pretrain runs: {len(diff)}: {diff}")
    assert {"model.family", "model.parameters", "model.non_embedding_parameters", "model.n_hashes"} <= set(diff)
    assert t5["model.d_model"] == reformer["model.d_model"] == "32"  # same width: not listed as a difference
    for params in (t5, reformer):  # only the sections the pretrain stage reads (dvc.yaml), no raw models section
        assert "pretrain.max_steps" in params and "seed" in params
        assert not [k for k in params if k.split(".")[0] in ("finetune", "evaluate", "benchmark", "models")]


def test_runs_carry_dvc_tags_and_nest_under_one_parent(trained):
    uri, experiment_id, _ = trained
    runs = [
        r
        for stage in ("pretrain", "finetune", "evaluate")
        for r in _runs(uri, experiment_id, f"tags.stage = '{stage}'")
    ]
    assert len(runs) == 6
    parents = {_tags(r)["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    for run in runs:
        tags = _tags(run)
        assert tags["dvc_exp"] == "workspace" and tags["seed"] == "0" and tags["variant"] in VARIANTS
    parent = rest(uri, "runs/get", run_id=parents.pop())["run"]
    assert parent["info"]["run_name"].startswith("workspace@") and parent["info"]["status"] == "FINISHED"


def test_dataset_inputs_show_source_digest_and_split_sizes(trained):
    uri, experiment_id, _ = trained
    for run in _pretrain_runs(uri, experiment_id).values():
        inputs = run["inputs"]["dataset_inputs"]
        by_name = {i["dataset"]["name"]: i for i in inputs}
        assert {"tokenized/train", "tokenized/validation"} <= set(by_name)
        train = by_name["tokenized/train"]["dataset"]
        assert train["source_type"] == "dvc" and json.loads(train["source"])["path"] == "data/tokenized/train"
        assert len(train["digest"]) >= 8 and json.loads(train["profile"])["documents"] > 0


def test_logged_models_have_metrics_and_the_finetuned_ones_are_registered(trained):
    uri, experiment_id, _ = trained
    found = rest(uri, "logged-models/search", {"experiment_ids": [experiment_id], "max_results": 50})
    models = found.get("models", [])
    by_name = {m["info"]["name"]: m for m in models}
    assert {f"{s}-{v}-0" for s in ("pretrain", "finetune") for v in VARIANTS} <= set(by_name)
    for model in models:
        metrics = {m["key"]: m["value"] for m in model["data"].get("metrics", [])}
        assert metrics["val_loss"] > 0 and metrics["steps"] > 0
        params = {p["key"]: p["value"] for p in model["data"].get("params", [])}
        assert params["model.family"] in VARIANTS
    registered = rest(uri, "registered-models/search", max_results=50).get("registered_models", [])
    assert {f"{EXPERIMENT}-{v}" for v in VARIANTS} <= {r["name"] for r in registered}


def test_compare_page_renders_both_runs_and_their_differences_in_chromium(trained):
    from tests.browser import render, visible_text

    uri, experiment_id, tmp = trained
    runs = _pretrain_runs(uri, experiment_id)
    ids = [runs[v]["info"]["run_id"] for v in VARIANTS]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    text = visible_text(render(f"{uri}/#/compare-runs?{query}", screenshot=tmp / "compare.png", window=(1600, 3000)))
    assert "Comparing 2 Runs" in text
    for variant in VARIANTS:
        assert f"pretrain@{variant}-0" in text
    for param in ("model.n_hashes", "model.parameters", "model.family"):
        assert param in text
    assert (tmp / "compare.png").stat().st_size > 20_000

    training_view = f"{uri}/#/experiments/{experiment_id}/models?workflowType=machine_learning"  # as the docs link
    models_page = visible_text(render(training_view, screenshot=tmp / "models.png"))
    assert "finetune-reformer-0" in models_page and "pretrain-t5-0" in models_page
    assert "Model registry" in models_page and "Traces" in models_page


def test_both_families_log_the_same_metric_names_and_the_report_is_stored_by_the_server(trained):
    uri, experiment_id, tmp = trained
    for stage in ("pretrain", "finetune", "evaluate"):
        runs = {_tags(r)["variant"]: r for r in _runs(uri, experiment_id, f"tags.stage = '{stage}'")}
        assert set(runs) == set(VARIANTS), stage
        names = [{m["key"] for m in runs[v]["data"].get("metrics", []) if not m["key"].startswith("system/")}
                 for v in VARIANTS]  # fmt: skip
        assert names[0] == names[1] and names[0], stage
        assert all(r["info"]["status"] == "FINISHED" for r in runs.values())
    for run in _runs(uri, experiment_id, "tags.stage = 'evaluate'"):
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["eval/test_loss"] > 0
    (comparison,) = _runs(uri, experiment_id, "tags.stage = 'compare'")
    listed = rest(uri, "artifacts/list", run_id=comparison["info"]["run_id"], path="report")
    assert {"report/comparison.md", "report/loss_curves.png"} <= {f["path"] for f in listed.get("files", [])}
    assert any((tmp / "server" / "artifacts").rglob("comparison.md"))  # stored by the server, not the client
