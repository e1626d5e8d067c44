"""Tests of the compare stage: statistics over seeds, baselines and collapse, the verdict, the report and MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import CorruptFileError, read_numeric_csv
from pipeline.config import load_config
from pipeline.report.analysis import analyze, headline
from pipeline.report.inputs import sum_confusions
from pipeline.report.rendering import render_report
from tests.eval_project import make_eval_project, run_module, write_training_metrics
from tests.train_project import ROOT

N_EXAMPLES = 60


def _run(rng: np.random.Generator, accuracy: float, test_loss: float, constant: str | None = None) -> dict:
    """One synthetic (variant, seed) run as `gather_run` returns it: listops answered with `accuracy`."""
    refs = [str(d) for d in rng.integers(0, 10, N_EXAMPLES)]
    if constant is not None:
        preds = [constant] * N_EXAMPLES
    else:
        preds = [r if rng.random() < accuracy else str((int(r) + 1) % 10) for r in refs]
    curve = [{"step": float(s), "loss": 5.0 - s / 10} for s in (10, 20, 30)]
    stage = {"parameters": 1000, "non_embedding_parameters": 500, "tokens": 4096, "val_loss": test_loss}
    return {
        "pretrain": dict(stage),
        "finetune": dict(stage),
        "pretrain_timing": {"wall_time_s": 10.0 + rng.random()},
        "finetune_timing": {"wall_time_s": 5.0 + rng.random()},
        "pretrain_curves": {"train": curve, "val": curve[-1:]},
        "finetune_curves": {"train": curve, "val": []},
        "eval": {"test_loss": test_loss + 0.01 * rng.standard_normal(), "unigram_loss": 6.5},
        "examples": {
            "listops": {
                "metric": "accuracy",
                "references": refs,
                "baselines": {"majority": 0.15, "chance": 0.1},
                "beams": {
                    "1": {"predictions": preds, "scores": [float(p == r) for p, r in zip(preds, refs, strict=True)]}
                },
            }
        },
        "samples": {"listops": [{"input": "listops: [MAX 1 7 ]", "reference": "7", "beam1": preds[0]}]},
        "confusion": {"listops": {"labels": ["0", "1"], "matrix": [[1, 0], [0, 1]]}},
    }


def synthetic(seeds: list[int], quality: dict[str, tuple[float, float, str | None]]) -> dict:
    """`quality[variant]` = (listops accuracy, test loss, constant prediction or None)."""
    data = {"seeds": seeds, "prepare": {}, "tokenize": {"vocab_size": 8000}, "runs": {}}
    for i, (variant, (acc, loss, constant)) in enumerate(quality.items()):
        data["runs"][variant] = {s: _run(np.random.default_rng(100 * i + s), acc, loss, constant) for s in seeds}
    data["benchmark"] = {"crossovers": [{"sentence": "speed: reformer never trains faster than t5 (lengths 64)"}]}
    data["benchmark_rows"] = [
        {"kind": "length", "variant": v, "seq_length": 64, "num_layers": None, "tokens_per_s": 100.0,
         "tokens_per_s_low": 90.0, "tokens_per_s_high": 110.0, "step_mb": 12.0, "peak_mb": 400.0}
        for v in quality
    ]  # fmt: skip
    skipped = {
        "kind": "length",
        "variant": "t5",
        "seq_length": 128,
        "num_layers": None,
        "skipped": "time budget of 5 s used",
    }
    data["benchmark_rows"].append(skipped)
    return data


@pytest.fixture(scope="module")
def cfg():
    config = load_config(ROOT / "params.yaml")
    config.evaluate.num_beams = [1]
    return config


def _row(analysis, key):
    return next(r for r in [*analysis.rows, *analysis.task_rows] if r.key == key)


def test_a_clear_winner_is_named_with_its_interval(cfg):
    cfg.seeds = [0, 1, 2]
    data = synthetic([0, 1, 2], {"t5": (0.9, 3.0, None), "reformer": (0.45, 4.0, None)})
    analysis = analyze(cfg, data)
    task = _row(analysis, "listops/accuracy_beam1")
    assert task.values["t5"].has_interval and task.values["t5"].low < task.values["t5"].mean < task.values["t5"].high
    ((a, b, verdict),) = task.verdicts
    assert (a, b, verdict.winner, verdict.kind) == ("t5", "reformer", "t5", "significant")
    loss = _row(analysis, "test_loss")
    assert loss.verdicts[0][2].winner == "t5" and loss.baseline == pytest.approx(6.5)
    assert not any(loss.collapsed(v) for v in loss.values)
    report = render_report(cfg, data, analysis)
    assert "t5, higher by" in report and "3 seeds per variant" in report
    assert not re.search(r"\(x\d", report)  # no ratio is ever printed as a win
    assert "| 64 | 100 (90–110) | 100 (90–110) |" in report  # benchmark figures with the spread of the repeats
    assert "t5 at 128 (time budget of 5 s used)" in report  # the dropped measurement is stated
    assert "encoder-decoder" in report  # the setup names the actual layout
    assert "36.37%" in report and "37.27%" in report  # the published LRA ListOps numbers
    assert "`reformer`'s LSH and local attention saves nothing" in report  # from the family spec


def test_equal_variants_get_no_winner(cfg):
    cfg.seeds = [0, 1, 2]
    data = synthetic([0, 1, 2], {"t5": (0.6, 3.0, None), "reformer": (0.6, 3.0, None)})
    analysis = analyze(cfg, data)
    verdict = _row(analysis, "listops/accuracy_beam1").verdicts[0][2]
    assert verdict.winner is None and verdict.kind == "not_significant"
    assert "no significant difference at this budget" in render_report(cfg, data, analysis)


def test_a_broken_variant_is_collapsed_and_loses_every_comparison(cfg):
    # reformer "trained with learning rate 0": constant output, test loss no better than the unigram baseline
    cfg.seeds = [0, 1, 2]
    data = synthetic([0, 1, 2], {"t5": (0.5, 3.0, None), "reformer": (0.0, 6.6, "7")})
    analysis = analyze(cfg, data)
    for key in ("listops/accuracy_beam1", "test_loss"):
        row = _row(analysis, key)
        assert row.collapsed("reformer") and not row.collapsed("t5"), key
        assert row.verdicts[0][2].winner == "t5" and row.verdicts[0][2].kind == "collapsed", key
    metrics = headline(analysis, data)
    assert metrics["metrics"]["listops/accuracy_beam1"]["variants"]["reformer"]["collapsed"] is True
    assert (
        "constant prediction '7'"
        in metrics["metrics"]["listops/accuracy_beam1"]["variants"]["reformer"]["collapse_reason"]
    )
    assert "reformer: listops/accuracy_beam1" in metrics["collapsed"]
    report = render_report(cfg, data, analysis)
    assert "**collapsed**" in report and "t5 (reformer collapsed)" in report
    assert "tie" not in report.lower()


def test_a_model_at_the_majority_baseline_is_collapsed_even_without_constant_output(cfg):
    cfg.seeds = [0, 1, 2]
    data = synthetic([0, 1, 2], {"t5": (0.12, 3.0, None), "reformer": (0.8, 3.0, None)})
    row = _row(analyze(cfg, data), "listops/accuracy_beam1")
    assert row.collapsed("t5") and "trivial baseline 0.150" in row.collapse["t5"].reason
    assert row.verdicts[0][2].winner == "reformer"


def test_one_seed_shows_no_interval_and_names_no_winner(cfg):
    cfg.seeds = [0]
    data = synthetic([0], {"t5": (0.9, 3.0, None), "reformer": (0.4, 4.0, None)})
    analysis = analyze(cfg, data)
    task = _row(analysis, "listops/accuracy_beam1")
    assert not task.show_interval and "[" not in task.cell("t5")
    assert task.verdicts[0][2].winner is None and task.verdicts[0][2].kind == "no_interval"
    report = render_report(cfg, data, analysis)
    assert "**One seed**" in report and "no interval is shown" in report


def test_read_csv_drops_empty_cells(tmp_path: Path):
    path = tmp_path / "h.csv"
    path.write_text("step,loss,z_loss\n1,2.5,\n2,2.0,0.1\n")
    assert read_numeric_csv(path, "fix") == [{"step": 1.0, "loss": 2.5}, {"step": 2.0, "loss": 2.0, "z_loss": 0.1}]
    assert read_numeric_csv(tmp_path / "missing.csv", "fix") == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"step,loss\n1,2.5\n2,\xff\xfe\n", "utf-8"),  # not text
        (b"step,loss\n1,2.5\n2,abc\n", "could not convert"),  # not a number
        (b"step,loss,lr\n1,2.5,0.1\n2,2.4", "line 3 has 2 cells for 3 columns"),  # cut off mid-row
        (b"step,loss\n1,2.5,7\n", "line 2 has"),  # more cells than columns
    ],
)
def test_a_corrupt_history_names_the_file_and_the_fix(tmp_path: Path, content: bytes, problem: str):
    path = tmp_path / "t5-0-train.csv"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError) as caught:
        read_numeric_csv(path, "re-run `dvc repro -f pretrain@t5-0`")
    message = str(caught.value)
    assert str(path) in message and problem in message and "dvc repro -f pretrain@t5-0" in message


def test_sum_confusions_adds_counts_over_seeds_with_merged_labels():
    a = {"labels": ["1", "2"], "matrix": [[3, 1], [0, 2]]}
    b = {"labels": ["1", "2", "(other)"], "matrix": [[1, 0, 1], [0, 1, 0], [0, 0, 0]]}
    assert sum_confusions([a, b]) == {"labels": ["1", "2", "(other)"], "matrix": [[4, 1, 1], [0, 3, 0], [0, 0, 0]]}


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
    for family in ("t5", "reformer"):
        ev = json.loads((project / "metrics" / "evaluate" / f"{family}-0.json").read_text())
        assert f"{ev['test_loss']:.3f}" in report
        assert f"{training[f'pretrain-{family}']['tokens']:,}" in report
        assert "baseline_majority" in ev["listops"] and "unigram_loss" in ev
        examples = json.loads((project / "artifacts" / "eval" / family / "0" / "examples.json").read_text())
        assert len(examples["listops"]["beams"]["1"]["scores"]) == ev["listops"]["examples"]
    for section in ("## The answer in short", "## Setup", "## Side by side", "## Fine-tuning tasks", "## Caveats",
                    "## Efficiency indicators", "## Long Range Arena ListOps", "**One seed**"):  # fmt: skip
        assert section in report
    names = ["loss_curves.png", "speed_vs_length.png", "memory_vs_length.png", "memory_vs_depth.png",
             "confusion_matrices.png"]  # fmt: skip
    for name in names:
        assert (project / "reports" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"({name})" in report  # the report shows every plot
    metrics = json.loads((project / "metrics" / "compare.json").read_text())
    # random-init models: every task collapses (constant or not above the baseline), which the report says
    assert metrics["collapsed"] and "collapsed" in report

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


# ------------------------------------------------------------------------------------------- scaling curves


def _scaling_project(root: Path, losses: dict[str, list[float]], saved_flops: dict[str, float] | None = None) -> None:
    """Fake stage outputs under `root`: `losses[variant]` = final pretraining validation loss per seed (0, 1, ...);
    every run saw the same target tokens; `saved_flops[variant]`, where given, is written as the run's own figure."""
    from pipeline.config.paths import RunPaths, stage_metrics

    for variant, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            pretrain = {"steps": 200, "tokens": 200 * 16 * 26, "val_loss": loss, "parameters": 1}
            if saved_flops and variant in saved_flops:
                pretrain["flops"] = saved_flops[variant]
            payloads = {
                "pretrain": pretrain,
                "finetune": {"tokens": 1000, "val_loss": 2.0},
                "evaluate": {"test_loss": loss + 0.1, "unigram_loss": 6.5},
            }
            for stage, payload in payloads.items():
                path = RunPaths(root, stage, variant, seed).metrics
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(payload))
    stage_metrics(root, "tokenize").write_text(json.dumps({"vocab_size": 8000}))
    stage_metrics(root, "benchmark").write_text(json.dumps({"crossovers": []}))
    (root / "artifacts" / "benchmark").mkdir(parents=True, exist_ok=True)
    (root / "artifacts" / "benchmark" / "results.json").write_text(json.dumps({"rows": []}))


def _sized_config(sizes: dict[str, tuple[str, str]], seeds: list[int]):
    """The default params with `models:` replaced by `sizes[variant]` = (family, preset)."""
    from pipeline.config import ModelSection

    config = load_config(ROOT / "params.yaml")
    config.evaluate.num_beams = [1]
    config.seeds = seeds
    config.models = {v: ModelSection(family=f, preset=p) for v, (f, p) in sizes.items()}
    return config


FOUR = {"t5": ("t5", "tiny"), "t5_small": ("t5", "small"), "reformer": ("reformer", "tiny"),
        "reformer_small": ("reformer", "small")}  # fmt: skip


def test_scaling_curves_name_the_family_ahead_only_where_the_intervals_separate(tmp_path: Path):
    from pipeline.report.inputs import gather
    from pipeline.report.rendering import draw_charts
    from pipeline.report.scaling import flops_per_target_token

    cfg = _sized_config(FOUR, [0, 1])
    # tiny: the two families overlap; small: t5 is clearly lower (2 seeds: t half-width 12.7 * 0.01 = 0.127)
    losses = {"t5": [4.00, 4.02], "t5_small": [3.00, 3.02], "reformer": [4.01, 4.03], "reformer_small": [3.50, 3.51]}
    _scaling_project(tmp_path, losses)
    data = gather(cfg, tmp_path)
    analysis = analyze(cfg, data)
    scaling = headline(analysis, data)["scaling"]

    assert scaling["curves"] == ["reformer", "t5"]
    t5 = {p["variant"]: p for p in scaling["families"]["t5"]}
    tokens = 200 * 16 * 26
    assert t5["t5_small"]["flops"] == pytest.approx(tokens * flops_per_target_token(cfg, "t5_small", 8064))
    assert t5["t5"]["flops"] < t5["t5_small"]["flops"]  # the larger size costs more compute
    assert t5["t5_small"]["val_loss"]["mean"] == pytest.approx(3.01)
    tiny, small = scaling["levels"]  # ordered by compute: each size is matched with the other family's same size
    assert tiny["variants"] == {"reformer": "reformer", "t5": "t5"} and tiny["ahead"] is None
    assert "no significant difference" in tiny["text"]
    assert small["variants"] == {"reformer": "reformer_small", "t5": "t5_small"} and small["ahead"] == "t5"

    report = render_report(cfg, data, analysis)
    section = report.split("## Scaling: loss versus training compute")[1].split("## Caveats")[0]
    assert small["text"] in section and "t5 ahead, loss 3.010 [2.883, 3.137] (t5_small) against 3.505" in section
    assert tiny["text"] in section and "![scaling curves](scaling_curves.png)" in section
    assert "| t5 | t5_small |" in section and "need two or more sizes" not in section

    names = draw_charts(data, analysis, tmp_path / "reports")
    assert "scaling_curves.png" in names
    chart = tmp_path / "reports" / "scaling_curves.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 1000


def test_scaling_uses_a_flops_figure_the_run_saved_and_names_no_winner_with_one_seed(tmp_path: Path):
    from pipeline.report.inputs import gather

    cfg = _sized_config(FOUR, [0])
    saved = {"t5": 1e12, "t5_small": 1e13, "reformer": 1.5e12, "reformer_small": 4e13}
    _scaling_project(tmp_path, {"t5": [4.0], "t5_small": [3.0], "reformer": [4.5], "reformer_small": [3.5]}, saved)
    data = gather(cfg, tmp_path)
    scaling = headline(analyze(cfg, data), data)["scaling"]
    flops = {p["variant"]: p["flops"] for pts in scaling["families"].values() for p in pts}
    assert flops == saved and all(
        p["flops_source"] == "saved by the run" for pts in scaling["families"].values() for p in pts
    )
    # t5_small (1e13) and reformer_small (4e13) are more than a factor 2 apart: no level; the tiny sizes are one
    (level,) = scaling["levels"]
    assert level["variants"] == {"reformer": "reformer", "t5": "t5"}
    assert level["ahead"] is None and "one seed gives no interval" in level["text"]


def test_one_size_per_family_says_how_to_add_sizes(cfg):
    cfg.seeds = [0, 1]
    data = synthetic([0, 1], {"t5": (0.6, 3.0, None), "reformer": (0.6, 3.2, None)})
    analysis = analyze(cfg, data)
    assert analysis.scaling["curves"] == {} and headline(analysis, data)["scaling"]["levels"] == []
    report = render_report(cfg, data, analysis)
    section = report.split("## Scaling: loss versus training compute")[1].split("## Caveats")[0]
    assert "need two or more sizes per family" in section
    assert "t5_small:" in section and "preset: small" in section and "```yaml" in section
    assert "scaling_curves.png" not in section


def test_attention_caveat_and_published_numbers_follow_the_variants_families():
    from pipeline.config import config_from_dict
    from pipeline.report.rendering import attention_caveat, published_results

    cfg = config_from_dict(
        {
            "models": {
                "t5": {"family": "t5"},
                "lsh": {"family": "reformer", "attn_layers": ["lsh", "lsh"]},
                "full": {"family": "reformer", "attn_layers": ["lsh", "lsh"], "use_full_attention": True},
            }
        }
    )
    assert attention_caveat(cfg, ["t5", "full"]) == ""  # full attention everywhere: nothing to save
    assert attention_caveat(cfg, ["t5", "lsh"]) == ", where `lsh`'s LSH attention saves nothing"
    assert published_results(cfg, ["t5"], "lra_listops") == {"Transformer": 0.3637}
    assert published_results(cfg, ["lsh", "full"], "lra_listops") == {"Reformer": 0.3727}
    assert published_results(cfg, ["t5", "lsh"], "summarize") == {}


def test_the_train_by_evaluation_table_has_intervals_over_seeds_and_its_chart(cfg, tmp_path):
    """Table 2's form: each variant as trained (rows) scored under each evaluation-time setting (columns), mean with
    its interval over seeds and test examples, in the report, compare.json and `evaluation_attention.png`."""
    from pipeline.report.rendering import draw_charts

    cfg.seeds = [0, 1, 2]
    cfg.evaluate.attention = {"full": {"use_full_attention": True}, "lsh1": {"n_hashes": 1}}
    try:
        data = synthetic([0, 1, 2], {"t5": (0.9, 3.0, None), "reformer": (0.6, 3.5, None)})
        for i, variant in enumerate(("t5", "reformer")):
            for seed, run in data["runs"][variant].items():
                entry = run["examples"]["listops"]
                rng = np.random.default_rng(10 * i + seed)
                entry["attention"] = {
                    name: {"scores": [float(rng.random() < acc) for _ in entry["references"]]}
                    for name, acc in (("full", 0.95), ("lsh1", 0.2))
                }
        analysis = analyze(cfg, data)
        table = analysis.attention["tasks"]["listops"]
        assert analysis.attention["columns"] == ["as trained", "full", "lsh1"]
        full, lsh1 = table["rows"]["reformer"]["full"], table["rows"]["reformer"]["lsh1"]
        assert full.has_interval and 0.0 <= full.low < full.mean < full.high <= 1.0 and full.mean > lsh1.high
        report = render_report(cfg, data, analysis)
        section = report[report.index("## Evaluation-time attention") : report.index("## Speed and memory")]
        assert f"| {full.format()} |" in section and "![evaluation-time attention](evaluation_attention.png)" in section
        saved = json.loads(json.dumps(headline(analysis, data)))["attention"]
        assert saved["columns"] == ["as trained", "full", "lsh1"]
        names = draw_charts(data, analysis, tmp_path)
        assert "evaluation_attention.png" in names
        assert (tmp_path / "evaluation_attention.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        cfg.evaluate.attention = {}
