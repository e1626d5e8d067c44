"""Stage `compare`: the verdict with its error bars, `reports/comparison.md` with its plots, and MLflow.

    python -m pipeline.compare

Reads what the other stages wrote for every variant and seed (`pipeline/report/inputs.py`; nothing is recomputed, so
the stage takes seconds), computes the numbers (`pipeline/report/analysis.py`: means, intervals, baselines,
collapse, verdicts, scaling, quality versus length) and writes them to `metrics/compare.json`, renders
`reports/comparison.md` and its charts (`pipeline/report/rendering.py`), and logs one MLflow run `comparison` (tag
stage=compare) whose description is the report and whose artifacts are the report and the charts; all together,
or nothing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.common import publish, repo_root, run_stage, stage_parser
from pipeline.config import Config
from pipeline.config.paths import RunPaths, stage_metrics
from pipeline.report.analysis import analyze, headline
from pipeline.report.inputs import _optional_json, gather
from pipeline.report.rendering import draw_charts, render_report

log = logging.getLogger("pipeline.compare")


REPORT_DIR = Path("reports")


def log_to_mlflow(cfg: Config, root: Path, report_dir: Path, metrics: dict[str, Any], report: str) -> str | None:
    """The comparison run: description = the report, artifacts = report and plots, tags naming the runs compared."""
    from pipeline.tracking.runs import TrackedRun, check_tracking_uri, git_revision, tracked_run, tracking_uri

    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)
    run = TrackedRun(uri, cfg.mlflow.experiment, system_metrics=False)
    tags = {
        "stage": "compare",
        "variant": "all",
        "family": "all",
        "seed": "all",
        "git_revision": git_revision(root),
        "mlflow.note.content": report,
    }
    from pipeline.tracking.logged import context_tags  # the DVC experiment, nested under the execution's parent

    tags.update(context_tags(uri, cfg.mlflow.experiment, tags["git_revision"], preset=cfg.preset))
    for variant in cfg.models:
        for seed in cfg.seeds:
            for stage in ("pretrain", "finetune"):
                paths = RunPaths(root, stage, variant, seed)
                run_id = _optional_json(paths.timing).get("mlflow_run_id")
                if run_id:
                    tags[f"{stage}_{paths.label}_run_id"] = run_id
    flat = {}
    for key, row in metrics["metrics"].items():
        for v, stats in row["variants"].items():
            flat[f"compare/{key}/{v}/mean"] = stats["mean"]
            flat[f"compare/{key}/{v}/collapsed"] = float(stats["collapsed"])
    with tracked_run(run, "comparison", tags):
        run.log_metrics({k.replace("@", "_"): float(v) for k, v in flat.items() if isinstance(v, int | float)})
        run.log_artifacts(report_dir, "report")
    return run.run_id


def compare(cfg: Config, root: Path) -> dict[str, Any]:
    """The whole stage: gather, analyse, render, draw, write, log."""
    from pipeline.tracking.runs import check_tracking_uri, tracking_uri

    start = time.perf_counter()
    check_tracking_uri(tracking_uri(cfg.mlflow.tracking_uri, root), cfg.mlflow.connect_timeout_s)  # fail fast
    data = gather(cfg, root)
    analysis = analyze(cfg, data)
    report = render_report(cfg, data, analysis)
    metrics = headline(analysis, data)
    out = root / REPORT_DIR
    names = draw_charts(data, analysis, out)
    with publish() as pub, tempfile.TemporaryDirectory() as staging:  # report, metrics, MLflow run: together
        pub.write_text(out / "comparison.md", report)
        pub.write_json(stage_metrics(root, "compare"), metrics)
        for name in names:  # the MLflow run carries exactly the report and its plots
            shutil.copy2(out / name, Path(staging) / name)
        (Path(staging) / "comparison.md").write_text(report, encoding="utf-8")
        run_id = log_to_mlflow(cfg, root, Path(staging), metrics, report)
    log.info("compare: reports/comparison.md written, MLflow run %s (%.1f s)", run_id, time.perf_counter() - start)
    return metrics


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    return compare(cfg, repo_root())


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Side-by-side report of every variant (reports/comparison.md, MLflow)."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
