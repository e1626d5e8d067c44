"""Which checkpoint a re-run resumes from: the newest one of an unfinished run with the same fingerprint."""

from __future__ import annotations

import json
import os

import torch

from pipeline.training.train import StagePaths, resume_point


def _paths(tmp_path) -> StagePaths:
    paths = StagePaths(tmp_path, "pretrain", "t5")
    paths.checkpoints.mkdir(parents=True)
    return paths


def _state(paths: StagePaths, fingerprint: str, completed: bool = False) -> None:
    (paths.checkpoints / "run.json").write_text(json.dumps({"fingerprint": fingerprint, "completed": completed}))


def _touch(path, mtime: int) -> None:
    torch.save({"global_step": 0, "state_dict": {}}, path)  # a readable checkpoint: resume_point checks them
    os.utime(path, ns=(mtime, mtime))


def test_no_state_or_other_fingerprint_starts_over(tmp_path):
    paths = _paths(tmp_path)
    _touch(paths.checkpoints / "last.ckpt", 1)
    assert resume_point(paths, "abc") is None  # no run.json
    _state(paths, "other")
    assert resume_point(paths, "abc") is None
    _state(paths, "abc", completed=True)
    assert resume_point(paths, "abc") is None


def test_periodic_checkpoint(tmp_path):
    paths = _paths(tmp_path)
    _state(paths, "abc")
    assert resume_point(paths, "abc") is None  # nothing saved yet
    _touch(paths.checkpoints / "last.ckpt", 10)
    assert resume_point(paths, "abc") == paths.checkpoints / "last.ckpt"


def test_slurm_requeue_checkpoint_before_the_first_periodic_one(tmp_path):
    paths = _paths(tmp_path)
    _state(paths, "abc")
    _touch(paths.checkpoints / "hpc_ckpt_1.ckpt", 5)
    assert resume_point(paths, "abc") == paths.checkpoints / "hpc_ckpt_1.ckpt"


def test_newest_of_periodic_and_requeue_checkpoints(tmp_path):
    paths = _paths(tmp_path)
    _state(paths, "abc")
    _touch(paths.checkpoints / "last.ckpt", 10)
    _touch(paths.checkpoints / "hpc_ckpt_1.ckpt", 20)
    assert resume_point(paths, "abc") == paths.checkpoints / "hpc_ckpt_1.ckpt"
    _touch(paths.checkpoints / "last.ckpt", 30)
    assert resume_point(paths, "abc") == paths.checkpoints / "last.ckpt"
