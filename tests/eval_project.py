"""A tiny project for the evaluation-side tests (evaluate, benchmark, compare, MLflow).

Builds on `tests/train_project.py` (params, a real SentencePiece tokenizer, tokenized Markov-chain documents)
and adds what the evaluation stages read from the training stages, without training: randomly initialised
models saved with `models.save_pretrained` as the pretrain and finetune outputs, and training metrics and loss
histories in the format `pipeline/training/train.py` documents (values derived from a seeded generator).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.paths import RunPaths
from tests.train_project import ROOT, make_project

SEED = 0  # the one seed of the test project (`seeds: [0]`)

EVAL_OVERRIDES = {
    "evaluate.max_loss_batches": 2,
    "evaluate.max_examples_per_task": 6,
    "evaluate.num_beams": [1, 2],
    "evaluate.max_new_tokens": 6,
    "evaluate.batch_size": 4,
    "evaluate.num_samples": 2,
    "benchmark.seq_lengths": [32, 64],
    "benchmark.depths": [1, 2],
    "benchmark.depth_seq_length": 32,
    "benchmark.repeats": 1,
    "benchmark.time_budget_s": 300.0,
    "mlflow.log_models": False,
}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for stage subprocesses: the repository importable, quiet logs, no GPU."""
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out.setdefault("CUDA_VISIBLE_DEVICES", "")
    out.update(extra or {})
    return out


def run_module(module: str, cwd: Path, *args: str, extra_env: dict[str, str] | None = None, timeout: int = 600):
    """`python -m <module> args` in `cwd`; returns the CompletedProcess (stdout+stderr in `.stdout`)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env(extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def save_random_models(tmp: Path) -> None:
    """Random-init models of every variant as `artifacts/{pretrain,finetune}/<variant>/0/final`."""
    import torch

    import models
    from pipeline.config import load_config

    cfg = load_config(tmp / "params.yaml")
    vocab = -(-cfg.tokenizer.vocab_size // 128) * 128
    for i, variant in enumerate(cfg.models):
        torch.manual_seed(i)
        family = cfg.family(variant)
        model = models.build_model(family, cfg.model_config(variant, vocab))
        for stage in ("pretrain", "finetune"):
            models.save_pretrained(model, family, RunPaths(tmp, stage, variant, SEED).final)


def write_training_metrics(tmp: Path, seed: int = 0) -> dict[str, Any]:
    """`metrics/<stage>/<variant>-0.json`, `-train.csv`, `-val.csv` and the run's timing file as train.py writes them;
    returns them keyed `<stage>-<variant>`."""
    rng = np.random.default_rng(seed)
    written: dict[str, Any] = {}
    for family in ("t5", "reformer"):  # the variants of tests/train_project.py
        for stage in ("pretrain", "finetune"):
            paths = RunPaths(tmp, stage, family, SEED)
            steps = list(range(2, 10, 2))
            losses = sorted(rng.uniform(2.0, 6.0, size=len(steps)).tolist(), reverse=True)
            metrics = {
                "steps": steps[-1],
                "tokens": int(rng.integers(1000, 5000)),
                "train_loss": losses[-1],
                "val_loss": losses[-1] + 0.1,
                "val_ppl": float(np.exp(losses[-1] + 0.1)),
                "parameters": int(rng.integers(10_000, 20_000)),
                "non_embedding_parameters": int(rng.integers(5_000, 9_000)),
                "epochs": 0.5,
            }
            paths.metrics.parent.mkdir(parents=True, exist_ok=True)
            paths.metrics.write_text(json.dumps(metrics))
            with paths.history("train").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "tokens", "loss", "ppl", "z_loss", "lr", "grad_norm"])
                for s, loss in zip(steps, losses, strict=True):
                    w.writerow([s, s * 100, loss, float(np.exp(loss)), "", 1e-3, 1.0])
            with paths.history("val").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "tokens", "loss", "ppl"])
                w.writerow([steps[-1], steps[-1] * 100, losses[-1] + 0.1, float(np.exp(losses[-1] + 0.1))])
            timing = {"wall_time_s": float(rng.uniform(10, 100)), "tokens_per_s": float(rng.uniform(100, 900))}
            paths.timing.parent.mkdir(parents=True, exist_ok=True)
            paths.timing.write_text(json.dumps(timing))
            written[f"{stage}-{family}"] = {**metrics, **timing}
    return written


def make_eval_project(tmp: Path, overrides: dict[str, Any] | None = None, trained: bool = False) -> Path:
    """The tiny project with the evaluation overrides; random models and training metrics unless `trained`
    (then the caller runs the real pretrain/finetune stages)."""
    tmp.mkdir(parents=True, exist_ok=True)
    make_project(tmp, {**EVAL_OVERRIDES, **(overrides or {})}, n_train_docs=120, with_tokenizer=True)
    if not trained:
        save_random_models(tmp)
        write_training_metrics(tmp)
    return tmp
