"""pipeline/report/charts.py: each chart is a real PNG drawn from the data it is given (also with gaps in the data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.report.charts import (
    BENCHMARK_CHARTS,
    benchmark_chart,
    confusion_grid,
    confusion_matrix,
    loss_curves,
    quality_vs_length,
    scaling_curves,
)

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_loss_curves_average_seeds_and_tolerate_missing_history(tmp_path):
    curves = {
        "pretrain": {
            "t5": {"train": [[(1, 5.0), (2, 4.0)], [(1, 5.2), (2, 4.4)]], "val": [[(2, 4.5)]]},
            "reformer": {"train": [[(1, 5.5), (2, 4.8)]]},
        },
        "finetune": {"t5": {"train": []}},
    }
    loss_curves(curves, tmp_path / "loss.png")
    assert is_png(tmp_path / "loss.png")


@pytest.mark.parametrize("name", sorted(BENCHMARK_CHARTS))
def test_benchmark_charts_with_spread_and_skipped_rows(tmp_path, name):
    rows = []
    for variant, speed in (("t5", 1000.0), ("reformer", 800.0)):
        for n in (128, 256):
            rows.append(
                {"kind": "length", "variant": variant, "seq_length": n, "num_layers": None, "tokens_per_s": speed,
                 "tokens_per_s_low": speed * 0.9, "tokens_per_s_high": speed * 1.1, "step_mb": n / 2.0}
            )  # fmt: skip
        rows.append({"kind": "length", "variant": variant, "seq_length": 512, "num_layers": None, "skipped": "budget"})
        rows.append({"kind": "depth", "family": variant, "seq_length": 128, "num_layers": 2, "step_mb": 10.0})
    benchmark_chart(rows, name, tmp_path / name)
    assert is_png(tmp_path / name)
    benchmark_chart([], name, tmp_path / f"empty-{name}")  # nothing measured: still a chart that says so
    assert is_png(tmp_path / f"empty-{name}")


def test_confusion_matrix_and_grid(tmp_path):
    cm = {"labels": ["0", "1", "(other)"], "matrix": [[3, 1, 0], [0, 4, 1], [0, 0, 0]]}
    confusion_matrix(cm["labels"], cm["matrix"], "t5: listops", tmp_path / "one.png")
    confusion_grid({"listops": {"t5": cm, "reformer": cm}, "parity": {"t5": cm}}, tmp_path / "grid.png")
    confusion_grid({}, tmp_path / "none.png")
    assert all(is_png(tmp_path / n) for n in ("one.png", "grid.png", "none.png"))


def test_quality_vs_length(tmp_path):
    points = {
        "t5": [{"length": 128, "mean": 0.5, "low": 0.4, "high": 0.6, "baseline": 0.2}, {"length": 512, "mean": 0.3}],
        "reformer": [{"length": 128, "mean": 0.45, "low": None, "high": None}],
    }
    quality_vs_length(points, "accuracy", "listops accuracy vs length", tmp_path / "q.png")
    assert is_png(tmp_path / "q.png")


def test_scaling_curves_with_intervals_a_lone_size_and_no_data(tmp_path):
    points = {
        "t5": [{"variant": "t5_small", "flops": 6e13, "mean": 3.0, "low": 2.9, "high": 3.1},
               {"variant": "t5", "flops": 2e12, "mean": 4.0, "low": 3.9, "high": 4.1}],
        "reformer": [{"variant": "reformer", "flops": 3e12, "mean": 4.1, "low": None, "high": None}],
    }  # fmt: skip
    scaling_curves(points, tmp_path / "s.png")
    scaling_curves({}, tmp_path / "none.png")
    assert is_png(tmp_path / "s.png") and is_png(tmp_path / "none.png")
    assert (tmp_path / "s.png").read_bytes() != (tmp_path / "none.png").read_bytes()
