"""`trainer.threads`: the intra-op thread count every stage applies before it works."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_waiting_openmp_threads_sleep_unless_the_user_says_otherwise(given, expected):
    """The package sets `OMP_WAIT_POLICY` before torch loads OpenMP (read once, at load); a user's value wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os, sys, pipeline\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected]
