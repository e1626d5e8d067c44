"""Tests of the compare stage: the report reflects its inputs, plots exist, the MLflow comparison run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.compare import _winner, mean_over_seeds, read_csv, sum_confusions
from tests.eval_project import make_eval_project, run_module, write_training_metrics


def test_winner_names_the_better_family_and_the_factor():
    assert _winner({"t5": 2.0, "reformer": 1.0}, higher_is_better=False) == "reformer (x2.00)"
    assert _winner({"t5": 3.0, "reformer": 1.0}, higher_is_better=True) == "t5 (x3.00)"
    assert _winner({"t5": 1.0, "reformer": 1.0}, higher_is_better=True) == "tie"
    assert _winner({"t5": 1.0, "reformer": None}, higher_is_better=True) == "—"


def test_read_csv_drops_empty_cells(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("step,loss,z_loss\n1,2.5,\n2,2.0,0.1\n")
    assert read_csv(path) == [{"step": 1.0, "loss": 2.5}, {"step": 2.0, "loss": 2.0, "z_loss": 0.1}]
    assert read_csv(tmp_path / "missing.csv") == []


def test_mean_over_seeds_averages_numbers_and_curves_step_by_step():
    runs = [
        {"eval": {"test_loss": 2.0, "listops": {"accuracy_beam1": 0.5}}, "curve": [{"step": 1, "loss": 4.0}]},
        {"eval": {"test_loss": 4.0, "listops": {"accuracy_beam1": 0.7}}, "curve": [{"step": 1, "loss": 2.0}]},
    ]
    mean = mean_over_seeds(runs)
    assert mean["eval"]["test_loss"] == pytest.approx(3.0)
    assert mean["eval"]["listops"]["accuracy_beam1"] == pytest.approx(0.6)
    assert mean["curve"] == [{"step": 1.0, "loss": 3.0}]
    # a step logged by only one seed is left out; a value missing from a seed is dropped, not averaged as zero
    runs[0]["curve"].append({"step": 2, "loss": 1.0})
    del runs[1]["eval"]["listops"]
    mean = mean_over_seeds(runs)
    assert [r["step"] for r in mean["curve"]] == [1.0] and "listops" not in mean["eval"]


def test_sum_confusions_adds_counts_over_seeds_with_merged_labels():
    a = {"listops": {"labels": ["1", "2"], "matrix": [[3, 1], [0, 2]]}}
    b = {"listops": {"labels": ["1", "2", "(other)"], "matrix": [[1, 0, 1], [0, 1, 0], [0, 0, 0]]}}
    assert sum_confusions([a, b]) == {
        "listops": {"labels": ["1", "2", "(other)"], "matrix": [[4, 1, 1], [0, 3, 0], [0, 0, 0]]}
    }


@pytest.mark.slow
def test_compare_stage_report_plots_and_mlflow(tmp_path: Path):
    project = make_eval_project(tmp_path)
    training = write_training_metrics(project, seed=3)
    for module, args in (("pipeline.evaluate", ["--model", "t5", "--seed", "0"]),
                         ("pipeline.evaluate", ["--model", "reformer", "--seed", "0"]),
                         ("pipeline.benchmark", []), ("pipeline.compare", [])):  # fmt: skip
        result = run_module(module, project, *args)
        assert result.returncode == 0, (module, result.stdout[-3000:])

    report = (project / "reports" / "comparison.md").read_text()
    bench = json.loads((project / "metrics" / "benchmark.json").read_text())
    for family in ("t5", "reformer"):
        ev = json.loads((project / "metrics" / "evaluate" / f"{family}-0.json").read_text())
        assert f"{ev['test_loss']:.3f}" in report
        assert f"{training[f'pretrain-{family}']['non_embedding_parameters']:,}" in report
        assert f"{training[f'pretrain-{family}']['tokens']:,}" in report
    for n, entry in bench["per_length"].items():
        assert f"| {n} | {entry['t5_tokens_per_s']:,.0f} |" in report
    for section in ("## The answer in short", "## Setup", "## Side by side", "## Caveats", "listops: accuracy"):
        assert section in report
    names = ["loss_curves.png", "speed_vs_length.png", "memory_vs_length.png", "memory_vs_depth.png",
             "confusion_matrices.png"]  # fmt: skip
    for name in names:
        assert (project / "reports" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in report  # the report shows every plot
    headline = json.loads((project / "metrics" / "compare.json").read_text())
    assert headline["speed_crossover_length_reformer"] == bench["speed_crossover_length"]["reformer"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'compare'")
    assert run.data.tags["mlflow.note.content"] == report
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {f"report/{n}" for n in [*names, "comparison.md"]} <= artifacts


def test_compare_names_the_missing_stage(tmp_path: Path):
    project = make_eval_project(tmp_path)
    result = run_module("pipeline.compare", project)
    assert result.returncode == 1
    assert "error:" in result.stdout and "evaluate@t5-0" in result.stdout
    assert not (project / "reports" / "comparison.md").exists()
