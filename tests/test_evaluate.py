"""Tests of the evaluate stage: confusion matrices, metric names, generation, and the stage on a tiny project."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.evaluate import OTHER, confusion_matrix, confusion_rows, generate_texts, mlflow_metrics
from tests.eval_project import make_eval_project, run_module


def test_confusion_rows_map_unknown_predictions_to_other():
    classes = ["0", "1", "2"]
    rows = confusion_rows(classes, ["1", " 2 ", "seven", "0"], ["1", "2", "0", "1"])
    assert [r["actual"] for r in rows] == ["1", "2", "0", "1"]
    assert [r["predicted"] for r in rows] == ["1", "2", OTHER, "0"]


def test_confusion_matrix_counts_agree_with_rows():
    classes = ["a", "b", "c"]
    preds = ["a", "b", "b", "x", "c", "a", "a"]
    refs = ["a", "b", "c", "c", "c", "b", "a"]
    rows = confusion_rows(classes, preds, refs)
    labels, matrix = confusion_matrix(classes, rows)
    assert labels == ["a", "b", "c", OTHER]
    for i, actual in enumerate(labels):
        for j, predicted in enumerate(labels):
            expected = sum(1 for r in rows if r["actual"] == actual and r["predicted"] == predicted)
            assert matrix[i][j] == expected, (actual, predicted)
    assert sum(map(sum, matrix)) == len(preds)
    # the diagonal is the accuracy's numerator
    assert sum(matrix[i][i] for i in range(len(labels))) == sum(p == r for p, r in zip(preds, refs, strict=True))


def test_confusion_matrix_equals_torchmetrics():
    import random

    import torch
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    rng = random.Random(0)
    classes = [str(i) for i in range(10)]
    preds = [rng.choice(classes + ["x", " 3 ", "12"]) for _ in range(300)]
    refs = [rng.choice(classes) for _ in range(300)]
    labels, matrix = confusion_matrix(classes, confusion_rows(classes, preds, refs))
    index = {c: i for i, c in enumerate(labels)}
    rows = confusion_rows(classes, preds, refs)
    reference = multiclass_confusion_matrix(
        torch.tensor([index[r["predicted"]] for r in rows]),
        torch.tensor([index[r["actual"]] for r in rows]),
        num_classes=len(labels),
    )
    assert matrix == reference.tolist()


def test_confusion_matrix_without_other_has_only_classes():
    labels, matrix = confusion_matrix(["x", "y"], confusion_rows(["x", "y"], ["x", "y"], ["y", "y"]))
    assert labels == ["x", "y"]
    assert matrix == [[0, 0], [1, 1]]  # rows: actual x, actual y; columns: predicted x, predicted y


def test_mlflow_metric_names_are_family_independent():
    metrics = {"test_loss": 2.0, "test_ppl": math.exp(2.0), "listops": {"accuracy_beam1": 0.5, "examples": 6}}
    names = mlflow_metrics(metrics)
    assert names == {
        "eval/test_loss": 2.0,
        "eval/test_ppl": math.exp(2.0),
        "eval/listops/accuracy_beam1": 0.5,
        "eval/listops/examples": 6.0,
    }


class _ByteTokenizer:
    """Encodes characters as ids 3.. (pad 0, eos 1); enough to drive generate_texts with a real model."""

    def encode(self, texts, add_eos=True):
        return [[3 + (ord(c) % 50) for c in t] + ([1] if add_eos else []) for t in texts]

    def decode(self, ids, skip_special=True):
        return " ".join(str(i) for i in ids if not (skip_special and i in (0, 1)))


@pytest.mark.parametrize("family", ["t5", "reformer"])
def test_generate_texts_returns_one_continuation_per_input(family):
    from models import build_model
    from pipeline.config import load_config
    from tests.train_project import MODELS, ROOT

    cfg = load_config(ROOT / "params.yaml")
    cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens = 2, 5
    overrides = {k: v for k, v in MODELS[family].items() if k not in ("family", "preset")}
    if family == "reformer":
        overrides.pop("axial_pos_shape"), overrides.pop("axial_pos_dims")
        overrides.update(axial_pos_shape=None, axial_pos_dims=None, max_position_embeddings=256)
    config = type(cfg.model_config(family)).from_preset("tiny", **overrides, vocab_size=64, dropout_rate=0.0)
    torch.manual_seed(0)
    model = build_model(family, config).eval()
    inputs = ["abc", "hello world", "x"]
    for beams in (1, 2):
        out = generate_texts(model, _ByteTokenizer(), inputs, beams, cfg)
        assert len(out) == len(inputs)
        assert all(len(text.split()) <= 5 for text in out)


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_plots_and_mlflow_run(tmp_path: Path):
    project = make_eval_project(tmp_path)
    for family in ("t5", "reformer"):
        result = run_module("pipeline.evaluate", project, "--model", family, "--seed", "0")
        assert result.returncode == 0, result.stdout[-3000:]
        metrics = json.loads((project / "metrics" / "evaluate" / f"{family}-0.json").read_text())
        assert metrics["test_loss"] > 0 and metrics["test_ppl"] == pytest.approx(math.exp(metrics["test_loss"]))
        for task in ("listops", "duplication"):
            for beams in (1, 2):
                key = ("accuracy" if task == "listops" else "exact_match") + f"_beam{beams}"
                assert 0.0 <= metrics[task][key] <= 1.0
        out = project / "artifacts" / "eval" / family / "0"
        rows = (out / "confusion_listops.csv").read_text().splitlines()
        assert rows[0] == "actual,predicted" and len(rows) == 1 + metrics["listops"]["examples"]
        assert (out / "confusion_listops.png").read_bytes()[:4] == b"\x89PNG"
        samples = json.loads((out / "samples.json").read_text())
        assert set(samples) == {"listops", "duplication"}
        assert all({"input", "reference", "beam1", "beam2"} <= set(s) for s in samples["listops"])
        assert "## listops" in (out / "samples.md").read_text()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'evaluate'")
    assert {(r.data.tags["variant"], r.data.tags["family"], r.data.tags["seed"]) for r in runs} == {
        ("t5", "t5", "0"),
        ("reformer", "reformer", "0"),
    }
    assert {r.info.run_name for r in runs} == {"evaluate@t5-0", "evaluate@reformer-0"}
    names = [set(r.data.metrics) for r in runs]
    assert names[0] == names[1] and "eval/listops/accuracy_beam2" in names[0]


def test_evaluate_stage_reports_missing_model(tmp_path: Path):
    project = make_eval_project(tmp_path)
    import shutil

    shutil.rmtree(project / "artifacts" / "finetune" / "t5" / "0" / "final")
    result = run_module("pipeline.evaluate", project, "--model", "t5", "--seed", "0")
    assert result.returncode == 1
    assert "error:" in result.stdout and "dvc repro finetune@t5-0" in result.stdout
    assert not (project / "metrics" / "evaluate" / "t5-0.json").exists()


def test_evaluate_stage_names_an_unknown_variant(tmp_path: Path):
    project = make_eval_project(tmp_path)
    result = run_module("pipeline.evaluate", project, "--model", "gpt", "--seed", "0")
    assert result.returncode == 1
    assert "error: --model gpt: not a variant" in result.stdout and "t5, reformer" in result.stdout
    assert "Traceback" not in result.stdout
