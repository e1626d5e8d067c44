"""Same inputs, same numbers (issue 23): every stage writes the same bytes whatever else runs on the machine, a run
killed with -9 at any point resumes under `dvc repro` to the bytes of the uninterrupted run, and DVC re-runs
exactly what changed (checkpoints are not outputs), in the workspace, in `dvc exp run --temp` and in a clone sharing
the cache; a failed experiment's MLflow parent run is FAILED.

All with the default `kernels` settings (no environment pin): nothing that changes a number is chosen by a timing.
Slow: real stage processes, real `dvc repro`, a real sqlite MLflow store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.train_project import ROOT, make_project

pytestmark = pytest.mark.slow

PROJECT_FILES = ("pipeline", "models", "tests", "dvc.yaml", ".dvcignore", ".gitignore")
STAGES = ("pretrain", "finetune", "evaluate", "lengths")
EVALUATE = {"evaluate.num_beams": [1, 2], "evaluate.max_examples_per_task": 8, "evaluate.max_loss_batches": 2}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stage(project: Path, name: str, variant: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"pipeline.{name}", "--model", variant, "--seed", "0"], project, check)


@contextlib.contextmanager
def busy(n: int = 2) -> Iterator[None]:
    """`n` processes spinning on the CPU for the duration of the block (the machine has 2 cores)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def snapshot(project: Path, variant: str) -> dict[str, str]:
    """sha256 of every reproducible output of the variant's runs: weights, configs, metrics JSON and CSV, the
    evaluation and lengths folders (predictions of greedy and beam search included). Timings are not in it."""
    files: list[Path] = []
    for folder in (f"artifacts/pretrain/{variant}", f"artifacts/finetune/{variant}", f"artifacts/eval/{variant}",
                   f"artifacts/lengths/{variant}", "metrics"):  # fmt: skip
        files += [p for p in (project / folder).rglob("*") if p.is_file() and variant in p.as_posix()]
    return {p.relative_to(project).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def git_dvc_project(root: Path, overrides: dict, variants: tuple[str, ...] = ("t5",)) -> Path:
    """A git + DVC project: the pipeline's code, tiny params (`variants` only) and tiny tokenized data."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    make_project(root, {"mlflow.log_models": False, **overrides}, with_tokenizer=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"] = {v: params["models"][v] for v in variants}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        run(cmd, root)
    return root


# ---------------------------------------------------------------------------------------- under load


def test_every_stage_writes_the_same_bytes_quiet_and_beside_busy_processes(tmp_path):
    """pretrain, finetune, evaluate (greedy and beam-2) and lengths of both families, run quiet and then again
    beside two processes spinning on both cores: every weight, metric, history and prediction file is identical."""
    project = make_project(tmp_path, {"mlflow.log_models": False, **EVALUATE}, with_tokenizer=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["kernels"] == {"paths": "fast", "matmul": "auto", "decoding": "shaped"}  # shipped defaults, unpinned
    assert not any(k.startswith(("MODELS_", "BENCH_")) for k in os.environ)
    quiet, loaded = {}, {}
    for variant in ("t5", "reformer"):
        for name in STAGES:
            stage(project, name, variant)
        quiet[variant] = snapshot(project, variant)
    assert len(quiet["t5"]) >= 16 and any("examples.json" in k for k in quiet["t5"])
    with busy(2):
        for variant in ("t5", "reformer"):
            for name in STAGES:
                stage(project, name, variant)
            loaded[variant] = snapshot(project, variant)
    for variant in ("t5", "reformer"):
        differ = [k for k in quiet[variant] if quiet[variant][k] != loaded[variant].get(k)]
        assert not differ and quiet[variant].keys() == loaded[variant].keys(), f"{variant}: {differ}"


# ---------------------------------------------------------------------------------------- kill -9 and resume

KILL_POINTS = ("step:2", "checkpoint:4", "validation:8", "step:10", "publish:1")
RESUME = {
    "pretrain.max_steps": 12,
    "pretrain.checkpoint_every_n_steps": 4,
    "pretrain.val_every_n_steps": 4,
    "pretrain.log_every_n_steps": 2,
    "pretrain.val_batches": 2,
}


def test_kill_minus_9_at_five_points_then_dvc_repro_gives_the_uninterrupted_bytes(tmp_path):
    """Killed (SIGKILL, no cleanup) before the first checkpoint, right after a step that checkpoints and validates,
    in the middle of a validation, between checkpoints, and half-way through publishing the outputs: `dvc repro`
    then finishes the run with weights, metrics and loss histories byte-identical to an uninterrupted run (the
    validation row of the checkpoint-and-validation step included), the MLflow run FINISHED (none left RUNNING),
    and DVC up to date."""
    from mlflow.tracking import MlflowClient

    reference = git_dvc_project(tmp_path / "reference", RESUME)
    run(["dvc", "repro", "--single-item", "pretrain@t5-0"], reference)
    want = snapshot(reference, "t5")
    val_steps = [line.split(",")[0] for line in (reference / "metrics/pretrain/t5-0-val.csv").read_text().split()]
    assert val_steps == ["step", "4", "8", "12"]
    for point in KILL_POINTS:
        project = git_dvc_project(tmp_path / point.replace(":", "-"), RESUME)
        killed = run([sys.executable, "-m", "tests.kill_at", point, "-m", "pipeline.pretrain", "--model", "t5",
                      "--seed", "0"], project, check=False)  # fmt: skip
        assert killed.returncode == -9, f"{point}: {killed.returncode}\n{killed.stderr[-2000:]}"
        assert not (project / "artifacts/pretrain/t5/0/final/model.safetensors").exists() or point == "publish:1"
        resumed = run(["dvc", "repro", "--single-item", "pretrain@t5-0"], project)
        if point != "step:2":  # a checkpoint existed: the run continued from it
            assert "resuming from checkpoints/pretrain/t5/0/" in resumed.stdout + resumed.stderr, point
        got = snapshot(project, "t5")
        assert got == want, f"{point}: {[k for k in want if want[k] != got.get(k)]}"
        client = MlflowClient(f"sqlite:///{project}/mlflow.db")
        (experiment,) = [e for e in client.search_experiments() if e.name == "t5-vs-reformer"]
        runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "pretrain"]
        # a resumed run continues its MLflow run; a run killed before its first checkpoint starts over, and the
        # attempt it left RUNNING is closed as KILLED
        want_status = ["FINISHED", "KILLED"] if point == "step:2" else ["FINISHED"]
        assert sorted(r.info.status for r in runs) == want_status, point
        status = run(["dvc", "status", "pretrain@t5-0"], project).stdout
        assert "up to date" in status, f"{point}: {status}"


# ---------------------------------------------------------------------------------------- DVC experiments

PIPELINE = {
    "seeds": [0],
    "data.max_documents": 400,
    "tokenizer.vocab_size": 600,
    "tokenizer.num_sentinels": 20,
    "tokenizer.input_sentence_size": 20000,
    "pretrain.max_steps": 4,
    "finetune.max_steps": 4,
    "evaluate.max_examples_per_task": 8,
    "evaluate.max_loss_batches": 2,
    "benchmark.seq_lengths": [64, 128],
    "benchmark.depths": [1, 2],
    "benchmark.depth_seq_length": 64,
    "benchmark.repeats": 1,
    "benchmark.time_budget_s": 10.0,
}


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_experiments_rerun_what_changed_and_a_clone_sharing_the_cache_is_up_to_date(tmp_path):
    """The whole pipeline on tiny params; its baseline committed. A fresh clone that shares the DVC cache checks
    out with nothing to re-run; `dvc exp run --temp` changing a Reformer param re-runs the Reformer's stages and the
    ones that aggregate over variants, never a T5 stage, and leaves the clone clean; a failed experiment leaves its
    MLflow parent run FAILED, and the baseline restored (git checkout + dvc checkout) leaves `dvc status` clean."""
    from mlflow.tracking import MlflowClient

    project = git_dvc_project(tmp_path / "project", {}, variants=("t5", "reformer"))
    for data in ("data/tokenizer", "data/tokenized"):  # the pipeline makes these itself from the builtin corpus
        shutil.rmtree(project / data)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in PIPELINE.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = run(["dvc", "repro"], project, timeout=1800)
    assert {"pretrain@t5-0", "pretrain@reformer-0", "compare"} <= _ran(first.stdout)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project)
    assert "checkpoints" not in (project / "dvc.lock").read_text()  # never an output: resumable state only

    # a fresh clone sharing the cache: checked out, nothing to re-run
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "cache", "dir", str(project / ".dvc" / "cache")], clone)
    run(["dvc", "checkout"], clone)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone).stdout

    # an experiment on one Reformer param re-runs the Reformer and the aggregates only
    exp = run(["dvc", "exp", "run", "--temp", "-S", "models.reformer.d_ff=48"], clone, timeout=1800)
    ran = _ran(exp.stdout)
    assert {"pretrain@reformer-0", "finetune@reformer-0", "benchmark", "compare"} <= ran
    assert not ran & {"pretrain@t5-0", "finetune@t5-0", "evaluate@t5-0", "lengths@t5-0", "prepare", "tokenize"}
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone).stdout  # --temp left it alone

    # a failed experiment in the workspace (diverges at once) is FAILED where users look: its MLflow parent run
    failed = run(["dvc", "exp", "run", "-n", "diverges", "-S", "pretrain.optimizer.lr=1e30",
                  "-S", "trainer.gradient_clip_val=0.0"], project, check=False, timeout=1800)  # fmt: skip
    assert failed.returncode != 0
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "t5-vs-reformer"]
    parents = client.search_runs([experiment.experiment_id], "tags.dvc_exp = 'diverges' and tags.stage = 'pipeline'")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert "pretrain@" in parents[0].data.tags["failed_stages"]
    others = client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'")
    assert all(p.info.status == "FINISHED" for p in others if p.data.tags.get("dvc_exp") != "diverges")

    # back to the baseline as the README says: git checkout + dvc checkout, and nothing is stale
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "checkout"], project)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout
