"""`dvc plots show`: one loss chart per stage with every run's train and validation curves, on a page that renders
offline (the Vega libraries inlined), checked with a real `dvc plots show` and headless Chromium."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import plots
from tests.browser import render, visible_text

ROOT = Path(__file__).resolve().parents[1]


def write_history(directory: Path, run: str, split: str, losses: list[float]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{run}-{split}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "loss", "ppl"])
        for i, loss in enumerate(losses, start=1):
            w.writerow([2 * i, 20 * i, loss, 2.7**loss])


def test_template_inlines_the_libraries_and_loads_nothing_from_the_network(tmp_path: Path):
    page = plots.write_template(tmp_path / "reports" / "plots_template.html").read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds CDN links only through `{scripts}`
    assert not re.search(r"<script[^>]+src=", page)
    assert "window.vegaEmbed=" in page and len(page) > 200_000


def test_combined_losses_hold_every_run_and_split(tmp_path: Path):
    write_history(tmp_path / "metrics" / "pretrain", "t5-0", "train", [5.0, 4.0])
    write_history(tmp_path / "metrics" / "pretrain", "reformer_full-1", "val", [4.5])
    (tmp_path / "metrics" / "pretrain" / "t5-0.json").write_text("{}")  # not a history
    out = plots.write_losses(tmp_path, "pretrain")
    assert out == tmp_path / "metrics" / "loss" / "pretrain.csv"
    rows = list(csv.DictReader(out.open()))
    assert [(r["run"], r["split"], r["step"], r["loss"]) for r in rows] == [
        ("reformer_full-1", "val", "2", "4.5"),
        ("t5-0", "train", "2", "5.0"),
        ("t5-0", "train", "4", "4.0"),
    ]
    assert plots.write_losses(tmp_path, "finetune").read_text().strip() == ",".join(plots.LOSS_COLUMNS)


def test_unwritable_output_is_one_clear_error(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").write_text("a file where the metrics folder should be")
    assert plots.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "Traceback" not in err


def test_dvc_plots_show_draws_all_runs_on_one_offline_chart(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run = {"cwd": repo, "check": True, "capture_output": True, "text": True}
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], **run)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # plots.html_template
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")  # the loss template
    for name in ("t5-0", "reformer-0"):
        write_history(repo / "metrics" / "pretrain", name, "train", [6.0, 5.0, 4.5])
        write_history(repo / "metrics" / "pretrain", name, "val", [5.2])
    subprocess.run([sys.executable, "-m", "pipeline.plots"], **run, env={**os.environ, "PYTHONPATH": str(ROOT)})
    (repo / "dvc.yaml").write_text(
        "plots:\n"
        "  - metrics/loss/pretrain.csv:\n"
        "      title: Pretraining loss\n"
        "      template: loss\n"
        "      x: step\n"
        "      y: loss\n"
    )
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], **run)
    index = repo / "dvc_plots" / "index.html"
    assert index.as_uri() in shown.stdout
    assert "cdn.jsdelivr" not in index.read_text(encoding="utf-8")

    dom = render(index.as_uri(), screenshot=tmp_path / "plots.png")
    assert re.search(r'<(svg|canvas)[^>]*class="marks"', dom)
    text = visible_text(dom)
    for label in ("Pretraining loss", "t5-0", "reformer-0", "train", "val"):
        assert label in text  # title and legend, drawn by Vega
    assert (tmp_path / "plots.png").stat().st_size > 5000


def test_dvc_plots_show_draws_one_line_per_variant_for_the_benchmark(tmp_path: Path):
    """The benchmark's plots as `dvc.yaml` defines them: every variant is a line on the speed and memory charts,
    whatever the variants are called (issue 24: the charts drew one series, `reformer_step_mb`)."""
    from pipeline.benchmark import write_tables

    repo = tmp_path / "repo"
    (repo / "artifacts" / "benchmark").mkdir(parents=True)
    run = {"cwd": repo, "check": True, "capture_output": True, "text": True}
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], **run)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    (repo / "reports").mkdir()
    plots.write_template(repo / "reports" / "plots_template.html")
    variants = ("t5", "reformer", "wide_ff")
    rows = [
        {"kind": kind, "variant": v, "seq_length": n if kind == "length" else 64, "num_layers": None if kind ==
         "length" else n, "tokens_per_s": 1000.0 * (i + 1) / n, "step_mb": 10.0 * n * (i + 1)}
        for kind in ("length", "depth") for i, v in enumerate(variants) for n in ((64, 128, 256) if kind ==
                                                                                   "length" else (1, 2, 4))
    ]  # fmt: skip
    write_tables({"rows": rows}, repo / "artifacts" / "benchmark")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    bench = [p for p in spec["plots"] if next(iter(p)) in ("speed_vs_length", "memory_vs_length", "memory_vs_depth")]
    assert len(bench) == 3
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": bench}, sort_keys=False))
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], **run)
    index = repo / "dvc_plots" / "index.html"
    assert index.as_uri() in shown.stdout
    text = visible_text(render(index.as_uri(), screenshot=tmp_path / "bench.png"))
    for plot in bench:
        assert next(iter(plot.values()))["title"] in text
    for variant in variants:
        assert text.count(variant) >= 3, variant  # in the legend of each of the three charts
