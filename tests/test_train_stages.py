"""The pretrain and finetune stages end to end on a tiny project (tests/train_project.py), both variants.

Slow tests: they run the real stages (`python -m pipeline.pretrain`, in a subprocess where a kill is needed),
with tiny models and a handful of steps.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from tests.train_project import ROOT, make_project

pytestmark = pytest.mark.slow


def stage(project: Path, name: str, variant: str, env: dict | None = None, seed: int = 0):
    """`python -m pipeline.<name> --model <variant> --seed <seed>` in `project`."""
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{name}", "--model", variant, "--seed", str(seed)],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def mlflow_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if r.data.tags.get("stage") != "pipeline"]  # stage runs, not the execution's parent


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_kill_and_rerun_resumes_to_the_same_weights_metrics_and_mlflow_run(tmp_path):
    # a validation (step 3) before the first checkpoint (step 4): the resumed process validates with weights it
    # loaded, the uninterrupted one with weights it trained in place (what kept inference copies must follow)
    overrides = {"pretrain.max_steps": 10, "pretrain.checkpoint_every_n_steps": 4, "pretrain.val_every_n_steps": 3}
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    reference = make_project(tmp_path / "reference", overrides)
    killed = make_project(tmp_path / "killed", overrides)

    # a run killed (SIGKILL: no cleanup at all) once its first checkpoint exists
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline.pretrain", "--model", "reformer", "--seed", "0"]
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints/pretrain/reformer/0/last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run ended before writing a checkpoint"
    state = json.loads((killed / "checkpoints/pretrain/reformer/0/run.json").read_text())
    assert not state["completed"], "the run finished before it could be killed; make it longer"
    killed_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_step < 10

    resumed = stage(killed, "pretrain", "reformer")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr + resumed.stdout
    done = stage(reference, "pretrain", "reformer")
    assert done.returncode == 0, done.stderr

    # identical final weights, metrics and loss history
    a = models.load_pretrained(killed / "artifacts/pretrain/reformer/0/final")[1].state_dict()
    b = models.load_pretrained(reference / "artifacts/pretrain/reformer/0/final")[1].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    for name in ("reformer-0.json", "reformer-0-train.csv", "reformer-0-val.csv"):
        assert (killed / "metrics/pretrain" / name).read_text() == (reference / "metrics/pretrain" / name).read_text()

    # one MLflow run, continued by the resumed attempt, finished, with the whole metric history
    runs = mlflow_runs(killed)
    assert len(runs) == 1 and runs[0].info.run_id == state["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags.get("mlflow.parentRunId"), "the stage run is not nested under the execution's parent"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{killed}/mlflow.db").get_metric_history(state["mlflow_run_id"], "train/loss")
    assert sorted({m.step for m in history}) == [2, 4, 6, 8, 10]


def test_pretrain_then_finetune_t5_outputs_metrics_and_mlflow(tmp_path):
    project = make_project(tmp_path, {"pretrain.max_steps": 20, "pretrain.optimizer.lr": 1e-2}, with_tokenizer=True)
    result = stage(project, "pretrain", "t5")
    assert result.returncode == 0, result.stderr
    assert "pretrain@t5-0: 20 steps" in result.stdout and "MLflow run" in result.stdout

    family, model = models.load_pretrained(project / "artifacts/pretrain/t5/0/final")
    assert family == "t5" and model.config.vocab_size == 256
    metrics = json.loads((project / "metrics/pretrain/t5-0.json").read_text())
    assert metrics["steps"] == 20
    assert metrics["val_loss"] < metrics["unigram_entropy"]  # the Markov corpus rewards using context
    train_rows = read_csv(project / "metrics/pretrain/t5-0-train.csv")
    assert [int(r["step"]) for r in train_rows] == list(range(2, 21, 2))
    assert float(train_rows[-1]["loss"]) == pytest.approx(metrics["train_loss"])
    val_rows = read_csv(project / "metrics/pretrain/t5-0-val.csv")
    assert [int(r["step"]) for r in val_rows] == [4, 8, 12, 16, 20]

    result = stage(project, "finetune", "t5")
    assert result.returncode == 0, result.stderr
    tuned = models.load_pretrained(project / "artifacts/finetune/t5/0/final")[1]
    start = model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in tuned.state_dict().items())

    runs = {(r.data.tags["stage"], r.data.tags["variant"]): r for r in mlflow_runs(project)}
    assert set(runs) == {("pretrain", "t5"), ("finetune", "t5")}
    run = runs[("pretrain", "t5")]
    assert run.info.status == "FINISHED"
    assert (run.data.tags["family"], run.data.tags["seed"], run.info.run_name) == ("t5", "0", "pretrain@t5-0")
    assert {"git_revision", "params_hash"} <= set(run.data.tags)
    assert run.data.params["pretrain.max_steps"] == "20"
    assert run.data.params["kernels.matmul_resolved"] in ("blas", "onednn")  # the kernel of the CPU products
    assert {"train/loss", "val/loss", "val/ppl", "train/lr/decay", "train/tokens_per_s"} <= set(run.data.metrics)
    from mlflow.tracking import MlflowClient

    # the trained model is a LoggedModel of the run (safetensors + config + tokenizer), not loose run artifacts
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert logged.model_type == "t5" and logged.params["model.num_layers"] == str(model.config.num_layers)
    assert {m.key for m in logged.metrics} >= {"val_loss", "steps"}


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    project = make_project(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = stage(project, "pretrain", "t5", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert result.returncode == 1
    assert "unreachable" in result.stderr and result.stderr.strip().startswith("error:")
    assert not (project / "artifacts").exists()


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_fails_the_run(tmp_path):
    overrides = {
        "pretrain.optimizer.lr": 1e30,  # AdamW moves every weight by about lr: the next forward overflows
        "pretrain.optimizer.warmup_steps": 0,
        "pretrain.checkpoint_every_n_steps": 1,
        "trainer.gradient_clip_val": 0.0,
    }
    project = make_project(tmp_path, overrides)
    result = stage(project, "pretrain", "t5")
    assert result.returncode == 1
    assert "error: training diverged at step" in result.stderr
    last = project / "checkpoints/pretrain/t5/0/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["global_step"] >= 1
    assert not (project / "artifacts/pretrain/t5/0/final").exists()
    (run,) = mlflow_runs(project)
    assert run.info.status == "FAILED"


def test_two_process_deepspeed_zero3_makes_one_mlflow_run_and_consolidated_weights(tmp_path):
    """The real stage with `trainer.devices: 2` (Lightning starts rank 1) under ZeRO-3, the reversible Reformer
    (its custom backward must see gathered parameters): one MLflow run, a sharded checkpoint with one file per
    rank, and `final/` equal to the consolidated shards, bit for bit."""
    from pipeline.training.strategy import consolidate_checkpoint

    overrides = {
        "trainer.strategy": "deepspeed",
        "trainer.devices": 2,
        "deepspeed.stage": 3,
        "deepspeed.param_persistence_threshold": 1000,  # parameters smaller than this stay whole: really shard some
        "pretrain.max_steps": 2,
        "pretrain.log_every_n_steps": 1,
        "pretrain.val_every_n_steps": 2,
        "pretrain.checkpoint_every_n_steps": 2,
    }
    project = make_project(tmp_path, overrides)
    result = stage(project, "pretrain", "reformer", env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in result.stderr + result.stdout  # really two processes
    (run,) = mlflow_runs(project)
    assert run.info.status == "FINISHED"
    ckpt = project / "checkpoints/pretrain/reformer/0/last.ckpt"
    shards = sorted(p.name for p in ckpt.glob("*/zero_pp_rank_*_model_states.pt"))  # sharded DeepSpeed checkpoint
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    family, model = models.load_pretrained(project / "artifacts/pretrain/reformer/0/final")
    metrics = json.loads((project / "metrics/pretrain/reformer-0.json").read_text())
    assert family == "reformer" and model.num_parameters() == metrics["parameters"]
    assert metrics["steps"] == 2 and metrics["tokens"] > 0
    state = consolidate_checkpoint(ckpt)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)
