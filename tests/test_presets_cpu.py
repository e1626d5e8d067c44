"""Every shipped preset runs through the real stages, reduced to what two CPU cores do in a minute or two, so that a
preset meant for a GPU (LRA ListOps at 4K tokens) or a long CPU run (Table 2, scaling, long range) cannot rot before
someone runs it whole: the preset's values (`pipeline.preset.resolve`) with its models shrunk and its steps, examples
and lengths cut, then pretrain, finetune, evaluate and lengths of one variant and compare's analysis of it. Slow.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.preset import resolve
from tests.train_project import ROOT, make_project, write_tokenizer

pytestmark = pytest.mark.slow

SHRINK = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_heads": 4}


def reduced(name: str, project: Path) -> dict:
    """The preset's params on the tiny project: its models shrunk, every stage cut to a few steps and examples."""
    merged, _ = resolve(name, ROOT / "params.yaml")
    tiny = yaml.safe_load((project / "params.yaml").read_text())  # the tiny project's data, tokenizer, mlflow
    p = copy.deepcopy(merged)
    p["tokenizer"], p["mlflow"], p["seeds"] = tiny["tokenizer"], tiny["mlflow"], [0]
    p["tokenizer"]["user_defined_symbols"] = merged["tokenizer"]["user_defined_symbols"]  # kept: see the test
    for model in p["models"].values():
        model.update(SHRINK)
        if model["family"] == "reformer":  # positions for LRA's 4K inputs, at the shrunk width
            model.update(axial_pos_shape=[64, 64], axial_pos_dims=[16, 16])
    for stage in ("pretrain", "finetune"):
        p[stage].update(max_steps=2, batch_size=2, log_every_n_steps=1, val_every_n_steps=2, val_batches=1,
                        checkpoint_every_n_steps=2)  # fmt: skip
        p[stage]["optimizer"]["warmup_steps"] = 1
    p["pretrain"]["input_length"] = 32
    for options in p["finetune"]["tasks"].values():
        options.update(num_examples=8, num_eval_examples=4)
    p["evaluate"].update(max_examples_per_task=4, batch_size=4, max_loss_batches=1, num_samples=1)
    p["lengths"]["task_options"].update(num_examples=8, num_eval_examples=4)
    p["lengths"].update(seeds=[0], seq_lengths=p["lengths"]["seq_lengths"][:1], eval_examples=4, eval_batch_size=4,
                        batch_size=2)  # fmt: skip
    p["lengths"]["budget"].update(kind="flops", steps=[1], value=None, min_steps=1)  # one step of the reference
    p["lengths"]["optimizer"].update(warmup_steps=0, schedule="constant")
    p["trainer"].update(accelerator="cpu", precision="32-true", progress_bar=False)
    p["trainer"]["divergence"]["patience_steps"] = 0
    p["mlflow"]["log_models"] = False
    return p


def run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


@pytest.mark.parametrize("name", ["lra_listops", "table2", "scaling", "long_range"])
def test_a_reduced_run_of_the_preset_goes_through_every_stage(name, tmp_path):
    project = make_project(tmp_path, with_tokenizer=True)
    params = reduced(name, project)
    if params["tokenizer"]["user_defined_symbols"]:  # Table 2's letters one token each, as the preset's tokenizer
        write_tokenizer(project / "data" / "tokenizer", params["tokenizer"]["user_defined_symbols"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    check = run(project, "pipeline.config")
    assert check.returncode == 0, check.stderr
    variant = next(iter(params["models"]))
    for stage in ("pretrain", "finetune", "evaluate", "lengths"):
        proc = run(project, f"pipeline.{stage}", "--model", variant, "--seed", "0")
        assert proc.returncode == 0, f"{name} {stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    evaluated = yaml.safe_load((project / "metrics" / "evaluate" / f"{variant}-0.json").read_text())
    tasks = list(params["finetune"]["tasks"])
    assert all(task in evaluated for task in tasks)
    if params["evaluate"].get("attention"):  # Table 2: the same weights evaluated under every attention setting
        assert set(evaluated["attention"]) == set(params["evaluate"]["attention"])
    lengths = yaml.safe_load((project / "metrics" / "lengths" / f"{variant}-0.json").read_text())
    assert (
        list(lengths["lengths"]) == [str(params["lengths"]["seq_lengths"][0])]
        and lengths["task"] == params["lengths"]["task"]
    )
