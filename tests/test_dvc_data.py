"""`dvc repro tokenize` in a fresh git + DVC project: outputs, no-op second run, params scoped per stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.tokenizer import Tokenizer
from pipeline.data.tokenstore import TokenStore

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pipeline", "models", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)  # the stages must import the copied project, not this checkout
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _set_params(root: Path, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    _set_params(root, "data", max_documents=200)
    _set_params(root, "tokenizer", vocab_size=1000)
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    return root


def test_dvc_repro_tokenize(project):
    dvc = [sys.executable, "-m", "dvc"]
    out = _run([*dvc, "repro", "tokenize"], project)
    assert "Running stage 'prepare'" in out and "Running stage 'tokenize'" in out

    tok = Tokenizer.load(project / "data" / "tokenizer")
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == 1000 and tok.sentinel_id(0) == 999 and tok.sentinel_id(99) == 900
    assert (project / "data" / "prepared" / "dataset_dict.json").is_file()
    store = TokenStore(project / "data" / "tokenized")
    assert store["train"].tokens.dtype == np.uint16 and store["train"][0][-1] == tok.eos_id
    prepare_metrics = json.loads((project / "metrics" / "prepare.json").read_text())
    assert prepare_metrics["documents_kept"] == 200
    assert json.loads((project / "metrics" / "tokenize.json").read_text())["vocab_size"] == 1000
    prepared_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]

    out = _run([*dvc, "repro", "tokenize"], project)
    assert "Data and pipelines are up to date" in out
    assert "Running stage" not in out

    _set_params(project, "tokenizer", vocab_size=1100)
    out = _run([*dvc, "repro", "tokenize"], project)
    assert "Running stage 'tokenize'" in out
    assert "Running stage 'prepare'" not in out
    assert Tokenizer.load(project / "data" / "tokenizer").vocab_size == 1100
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"] == prepared_lock

    _set_params(project, "tokenizer", num_proc=1, shard_mb=0.05)  # speed only: not a dependency of the outputs
    assert "Data and pipelines are up to date" in _run([*dvc, "repro", "tokenize"], project)
