"""benchmarks/gpu.sh, the prepared GPU run, exercised on CPU with --dry-run so that it cannot rot between GPU loans."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "results.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out), "--timeout", "400"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table.startswith("# GPU run: CPU (dry run)")
    assert "| gpu tests | pytest -m gpu --collect-only | exit 0:" in table
    assert "| T5 tiny train step bf16 | ours / transformers |" in table
    assert "| Reformer long sequences | bench_reformer.py | exit 0" in table
    assert "| dvc repro pretrain, ZeRO-2 | dvc repro pretrain | exit 0" in table
    assert "metrics/pretrain/" in table  # the stage published its metrics


def test_gpu_script_refuses_without_a_gpu_unless_dry_run(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path / "r.md")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "pass --dry-run" in proc.stderr
    assert not (tmp_path / "r.md").exists()
