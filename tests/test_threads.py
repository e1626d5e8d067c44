"""`trainer.threads`: the intra-op thread count every stage applies before it works."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.common import thread_count
from pipeline.config import config_from_dict, load_config

CORES = len(os.sched_getaffinity(0))


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert thread_count(3, devices=4) == 3


def test_default_divides_the_cores_by_the_local_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert thread_count(None, devices=1) == CORES
    assert thread_count(None, devices=2) == max(1, CORES // 2)
    assert thread_count(None, devices="auto") == CORES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(CORES * 4))  # torchrun/SLURM: more processes than cores
    assert thread_count(None, devices=1) == 1


def test_params_accept_null_and_positive_only():
    raw = load_config().to_dict()
    raw["trainer"]["threads"] = 0
    with pytest.raises(ValueError, match=r"trainer\.threads"):
        config_from_dict(raw)
    raw["trainer"]["threads"] = None
    assert config_from_dict(raw).trainer.threads is None


def test_a_stage_runs_with_the_configured_threads(tmp_path):
    """A real stage entry point applies `trainer.threads` before its body runs (here: the body reports it)."""
    params = tmp_path / "params.yaml"
    text = open("params.yaml", encoding="utf-8").read().replace("  threads: null", "  threads: 1", 1)
    assert "  threads: 1" in text
    params.write_text(text)
    code = (
        "import sys, torch\n"
        "from pipeline.common import run_stage, stage_parser\n"
        "def body(cfg, args):\n"
        "    import os\n"
        "    print('threads', torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])\n"
        f"sys.exit(run_stage(body, stage_parser('t'), ['--params', {str(params)!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "threads 1 1" in out.stdout


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"passive", "spin 10000"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"active"}),
        ({"GOMP_SPINCOUNT": "7"}, {"spin 7"}),
    ],
)
def test_openmp_wait_is_chosen_before_torch_loads_and_a_users_value_wins(given, expected):
    """The package chooses how OpenMP threads wait before torch loads OpenMP (read once, at load)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | given
    code = "import sys, pipeline\nassert 'torch' not in sys.modules\nimport torch\nprint(pipeline.openmp_wait())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in expected


@pytest.mark.parametrize(("busy", "spins"), [(0.1, True), (0.6, False), (1.9, False), (None, False)])
def test_threads_spin_briefly_only_when_the_cpus_are_idle(monkeypatch, busy, spins):
    import pipeline

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(pipeline, "busy_cores", lambda: busy)
    pipeline._choose_openmp_wait()
    assert pipeline.openmp_wait() == ("spin 10000" if spins else "passive")


def test_busy_cores_sees_another_process_computing():
    import pipeline

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = pipeline.busy_cores(0.5)
    finally:
        burner.kill()
        burner.wait()
    assert busy is not None and 0.7 <= busy <= os.cpu_count() + 0.01
