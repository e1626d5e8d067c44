"""benchmarks/: the shared timing helpers, and each benchmark script's smallest run in a subprocess.

The script runs check the shape of what they print (every timed row carries a median [min-max] spread and a
per-round ratio, the load average at start and end), never how fast anything was.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import timing  # noqa: E402

SPREAD = re.compile(r"\d+\.\d+ \[\d+\.\d+-\d+\.\d+\]")  # median [min-max]
LOAD = re.compile(r"load average \d+\.\d\d \d+\.\d\d \d+\.\d\d on \d+ cores")


def test_alternate_calls_in_turn_and_drops_warmup():
    calls = []
    results = timing.alternate_results(
        {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b")}, 2, 1
    )
    assert calls == ["a", "b"] * 3
    assert results == {"a": [3, 5], "b": [None, None]}
    times = timing.alternate({"x": lambda: None, "y": lambda: None}, 3, warmup=0)
    assert [len(t) for t in times.values()] == [3, 3] and all(t >= 0 for ts in times.values() for t in ts)


def test_ratio_is_per_round_not_a_ratio_of_medians():
    ours, ref = [1.0, 4.0, 2.0], [2.0, 2.0, 8.0]  # per round 0.5, 2.0, 0.25; ratio of medians would be 1.0
    assert timing.ratios(ours, ref) == [0.5, 2.0, 0.25]
    assert timing.ratio_spread(ours, ref) == "0.500 [0.250-2.000]"
    assert timing.spread([3.0, 1.0, 2.0], digits=1) == "2.0 [1.0-3.0]"
    with pytest.raises(ValueError, match="paired rounds"):
        timing.ratios([1.0], [1.0, 2.0])


def test_table_aligns_columns():
    lines = timing.table(("name", "value"), [("a", "1.0"), ("longer", "22.00")]).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[1].startswith("a ") and lines[2].endswith("22.00")


def run_script(name: str, *args: str, timeout: int = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert len(LOAD.findall(out)) >= 2, out  # at the start and at the end
    assert out.rstrip().splitlines()[-1].startswith("end: load average"), out
    return out


def rows_with(out: str, label: str) -> list[str]:
    rows = [line for line in out.splitlines() if label in line]
    assert rows, f"no row with {label!r} in:\n{out}"
    return rows


def assert_timed(row: str, spreads: int = 3) -> None:
    """ours, reference and the per-round ratio, each as median [min-max]."""
    assert len(SPREAD.findall(row)) >= spreads, row


def test_bench_t5_smallest_run_prints_spreads_ratios_and_load():
    out = run_script(
        "bench_t5.py",
        *("--preset", "tiny", "--vocab-size", "512", "--batch", "2", "--input-len", "16", "--target-len", "4"),
        *("--steps", "1", "--warmup", "0", "--gen-batch", "2", "--gen-input-len", "8", "--gen-tokens", "3"),
        *("--gen-repeats", "1", "--uncached-tokens", "3", "--threads", "1", "--skip", "memory"),
    )
    assert "ours/ref per round" in out
    for label in ("train step b2 16/4", "greedy generate 3 tokens b2", "cached vs uncached"):
        assert_timed(rows_with(out, label)[0])
    assert "OUTPUT DIFFERS" not in out


def test_bench_generate_smallest_run_prints_spreads_ratios_and_load():
    out = run_script(
        "bench_generate.py",
        *("--t5-preset", "tiny", "--t5-prompt", "8", "--t5-tokens", "3", "--batches", "2", "--beams", "1", "2"),
        *("--threads", "1", "--repeats", "1", "--uncached-tokens", "3", "--reformer-prompt", "8"),
        *("--reformer-tokens", "3", "--reformer-hf-prompt", "16", "--reformer-hf-tokens", "3"),
    )
    assert "ours/ref per round" in out
    for label in ("T5 greedy b2 1t", "T5 beam-2 b2 1t", "T5 cached / uncached", "Reformer cached / uncached"):
        row = rows_with(out, label)[0]
        assert_timed(row)
        assert row.rstrip().endswith("True"), row  # same tokens both sides
    assert_timed(rows_with(out, "Reformer greedy / transformers")[0])


def test_bench_train_loop_smallest_run_prints_spreads_ratios_and_load():
    out = run_script(
        "bench_train_loop.py",
        "--family",
        "t5",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--batch-size",
        "2",
        "--input-length",
        "32",
    )
    assert "lightning/bare per round" in out
    for label in ("t5 wall s", "t5 cpu s"):
        assert_timed(rows_with(out, label)[0])


def test_bench_reformer_smallest_run_prints_spreads_ratios_and_load():
    out = run_script(
        "bench_reformer.py",
        *("--lengths", "--models", "reformer", "hf", "--depths", "--paired-lengths", "256", "--paired-repeats", "1"),
    )  # only the alternated table: one child process (the per-length tables run one child per model and length)
    assert "ours/transformers per round" in out
    paired = [line for line in out.splitlines() if line.startswith("| 256 ")]
    assert len(paired) == 1 and len(SPREAD.findall(paired[0])) == 3, out  # ours, transformers, per-round ratio


def test_bench_tokenize_smallest_run_prints_spreads_ratios_and_load():
    out = run_script("bench_tokenize.py", "--repeat", "1", "--runs", "1", "--warmup", "0", "--num-proc", "1")
    assert "direct/variant per round" in out
    for label in ("Tokenizer.encode (direct", "datasets.map (1 proc", "stage shard encoder (1 proc)"):
        assert_timed(rows_with(out, label)[0], spreads=2)
    assert re.search(r"stage / direct = \d+\.\d\d \[", out), out


def test_bench_data_smallest_run_prints_spreads_ratios_and_load(tmp_path):
    out = run_script(
        "bench_data.py",
        *("--tokens", "20K", "--steps", "0", "--vocab-size", "500", "--rounds", "1", "--workdir", str(tmp_path)),
        timeout=600,
    )  # prepare, tokenize with 1 and 2 processes, the alternated slice comparison; no pretrain
    table = out.split("size | run | wall s")[1]
    for label in ("20K | prepare", "20K | tokenize num_proc=1", "20K | tokenize num_proc=2"):
        assert_timed(rows_with(table, label)[0], spreads=4)  # wall, CPU, peak RSS, tree RSS
    assert_timed(rows_with(table, "tokenize encode speedup num_proc 2 / 1")[0], spreads=2)
    slice_row = rows_with(table, "20K | same slice")[0]
    assert_timed(slice_row, spreads=5)  # three throughputs, two per-round ratios
    assert re.search(r"map / direct = \d+\.\d\d \[", slice_row) and "stage / direct" in slice_row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["20K"]["tokenize"]) == {"1", "2"} and summary["20K"]["tokens"] > 10_000
    assert not (tmp_path / "20K").exists()  # scratch project removed
