"""The fault suite: real stage processes on one tiny prepared project, each with one fault injected by hand.

    python -m tests.faults [--only NAME ...] [--keep DIR] [--jobs N]

prints one table (case, expected, exit code, traceback?, outputs intact?, verdict) and exits non-zero when any case
is wrong. A case is right when all of these hold:

- the exit code is the expected one (0 finished; 1 failed or diverged; 2 bad params or arguments; 130 SIGINT;
  143 SIGTERM), and no traceback is printed for a problem the user can fix;
- what the stage printed holds every expected piece of its message (on stderr when it fails: the culprit and what
  to do) and none of what it must not say (misleading advice, the name of a temporary file);
- the outputs a failure must not touch (the published model, metrics and loss histories of the previous good run,
  the checkpoints, a previous evaluation or prepare) are byte-for-byte unchanged, or still absent; a success leaves
  complete, loadable outputs; no temporary sibling is left behind;
- the MLflow store (a real sqlite store, read through MLflow's client) shows exactly the runs the case expects the
  command to start, resume or end, with their status (`stage:STATUS`), and no run is left RUNNING.

The base project (tests/train_project.py: tiny T5, synthetic tokenized data, real tokenizer) is trained once
(pretrain, then finetune); every case works on a copy of it. Cases that need root (a full or read-only tmpfs
mounted over an output folder) run only where `mount` works.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = "artifacts/pretrain/t5/0"
FT = "artifacts/finetune/t5/0"
RUN_CKPT = "checkpoints/pretrain/t5/0"  # resumable state: not under artifacts/, not a DVC output
FT_CKPT = "checkpoints/finetune/t5/0"
PUBLISHED = (
    f"{RUN}/final/model.safetensors",
    f"{RUN}/final/config.json",
    "artifacts/timing/pretrain/t5-0.json",
    "metrics/pretrain/t5-0.json",
    "metrics/pretrain/t5-0-train.csv",
    "metrics/pretrain/t5-0-val.csv",
)
BASE_OVERRIDES = {
    "pretrain.max_steps": 12,
    "pretrain.checkpoint_every_n_steps": 4,
    "pretrain.val_every_n_steps": 6,
    "finetune.max_steps": 4,
    "finetune.checkpoint_every_n_steps": 2,
    "finetune.val_every_n_steps": 2,
    "mlflow.log_models": False,
    "trainer.divergence.patience_steps": 0,  # the guard is on in the divergence cases (it must fit in 4 steps)
}
SLOW_OVERRIDES = {"pretrain.max_steps": 400}  # for signals mid-training: long enough to be interrupted


@dataclass
class Case:
    """One fault: how the project is damaged (`setup`), the command run on it, and everything its ending must be."""

    name: str
    group: str
    expected: int  # exit code
    command: list[str]
    setup: Callable[[Path], None] = lambda p: None
    message: tuple[str, ...] = ()  # must all be printed (on stderr when the case fails; anywhere when it succeeds)
    mlflow: tuple[str, ...] = ()  # `stage:STATUS` of every MLflow run the command starts, resumes or ends, sorted
    protect: tuple[str, ...] = PUBLISHED  # must be byte-identical afterwards when the case fails (None: absent)
    signal_after: tuple[int, str] | None = None  # (signal, what to wait for) for interruptions: see `_wait`
    check: Callable[[Path], str | None] = lambda p: None  # extra check: a problem description or None
    env: dict[str, str] = field(default_factory=dict)
    unsaid: tuple[str, ...] = ()  # must not be printed (misleading advice, a temporary file's name)


def stage(name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{name}", *extra]


PRETRAIN = stage("pretrain", "--model", "t5", "--seed", "0")
FINETUNE = stage("finetune", "--model", "t5", "--seed", "0")
EVALUATE = stage("evaluate", "--model", "t5", "--seed", "0")
LENGTHS = stage("lengths", "--model", "t5", "--seed", "0")
PREPARE = stage("prepare")
PREPARED = (  # a previous good prepare (written by `prepared` in a case's setup)
    "metrics/prepare.json",
    "data/prepared/stats.json",
    "data/prepared/dataset_dict.json",
    "data/prepared/train/state.json",
)
DIVERGING = {"pretrain.optimizer.lr": 1e6, "trainer.gradient_clip_val": 0.0}  # every weight moved to nonsense
EVALUATED = (  # a previous good evaluation (written by `evaluated` in a case's setup)
    "metrics/evaluate/t5-0.json",
    "artifacts/eval/t5/0/report.json",
    "artifacts/eval/t5/0/examples.json",
    "artifacts/eval/t5/0/samples.json",
)
EVAL_STAGING = "artifacts/eval/t5/.0.*.tmp"  # evaluate's output folder while it is being written (common.publish)
# evaluation long enough to be interrupted while it generates into its staging folder (about 10 s on one core)
LONG_EVAL = {
    "evaluate.num_beams": [1, 4],
    "evaluate.max_new_tokens": 48,
    "evaluate.max_examples_per_task": 2000,
    "finetune.tasks.duplication.num_eval_examples": 2000,
}


# ----------------------------------------------------------------------------------------------- helpers


def edit_params(project: Path, **dotted: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in dotted.items():
        node = params
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def params(**dotted: object) -> Callable[[Path], None]:
    return lambda p: edit_params(p, **dotted)


def raw_params(old: str, new: str) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        text = (p / "params.yaml").read_text()
        assert old in text, old
        (p / "params.yaml").write_text(text.replace(old, new, 1))

    return setup


def write(rel: str, data: bytes) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        (p / rel).parent.mkdir(parents=True, exist_ok=True)
        (p / rel).write_bytes(data)

    return setup


def truncate(rel: str) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        data = (p / rel).read_bytes()
        (p / rel).write_bytes(data[: len(data) // 2])

    return setup


def remove(rel: str) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        target = p / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def evaluated(p: Path) -> None:
    """Run `evaluate` once, so the case has a previous good evaluation that a failure must leave alone."""
    proc = subprocess.run(EVALUATE, cwd=p, env=_env(p), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"setup: evaluate failed\n{proc.stderr[-3000:]}")


def chain(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        for s in steps:
            s(p)

    return setup


def mount_tmpfs(
    rel: str, size: str, fill: bool = False, readonly: bool = False, free: int = 0
) -> Callable[[Path], None]:
    """Put a small tmpfs (its previous contents copied in) over `rel`: full (ENOSPC; with `free` bytes left) or
    read-only."""

    def setup(p: Path) -> None:
        target = p / rel
        keep = Path(tempfile.mkdtemp())
        shutil.copytree(target, keep, dirs_exist_ok=True)
        used = sum(f.stat().st_size for f in keep.rglob("*") if f.is_file())
        room = max(int(size.removesuffix("k")) * 1024 if size.endswith("k") else 1 << 20, 2 * used + (64 << 10))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(target)], check=True)
        shutil.copytree(keep, target, dirs_exist_ok=True)
        shutil.rmtree(keep)
        if fill:
            try:
                with (target / ".filler").open("wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:
                pass  # full: exactly what the case wants
            filler = target / ".filler"
            os.truncate(filler, max(0, filler.stat().st_size - free))
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)

    return setup


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    d = Path(tempfile.mkdtemp())
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)]
    ok = subprocess.run(mount, capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(d)])
    d.rmdir()
    return ok


def unmount_all(project: Path) -> None:
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        where = line.split()[1]
        if where.startswith(str(project)):
            subprocess.run(["umount", "-l", where], capture_output=True)


def mlflow_runs(project: Path) -> dict[str, tuple[str, str, int | None]] | None:
    """Every run of the project's MLflow store: id -> (stage tag, status, end time); None when the store cannot be
    read (a case that damages it). The parent runs that only group a pipeline execution are left out."""
    db = project / "mlflow.db"
    if not db.is_file():
        return {}
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(f"sqlite:///{db}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, max_results=1000) if experiments else []
    except Exception:  # noqa: BLE001 - not a database, damaged: what the case did to it
        return None
    return {
        r.info.run_id: (r.data.tags.get("stage", "?"), r.info.status, r.info.end_time)
        for r in runs
        if r.data.tags.get("stage") != "pipeline"
    }


def mlflow_problem(case: Case, before: dict | None, after: dict | None) -> str | None:
    """The runs the command started, resumed or ended must be exactly `case.mlflow`, and none left RUNNING."""
    if before is None or after is None:
        return (
            None
            if before is after
            else f"MLflow store readable before: {before is not None}, after: {after is not None}"
        )
    changed = tuple(
        sorted(
            f"{stage}:{status}"
            for rid, (stage, status, end) in after.items()
            if before.get(rid) != (stage, status, end)
        )
    )
    if changed != tuple(sorted(case.mlflow)):
        return f"MLflow runs {list(changed)}, expected {sorted(case.mlflow)}"
    running = [f"{stage} {rid[:8]}" for rid, (stage, status, _) in after.items() if status == "RUNNING"]
    return f"MLflow runs left RUNNING: {running}" if running else None


def exists(*rels: str) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        missing = [r for r in rels if not list(p.glob(r))]
        return f"missing {missing}" if missing else None

    return check


def absent(*rels: str) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        there = [r for r in rels if list(p.glob(r))]
        return f"written though it must not be: {there}" if there else None

    return check


def no_tmp_left(p: Path) -> str | None:
    left = [str(x.relative_to(p)) for x in p.rglob(".*.tmp")] + [str(x.relative_to(p)) for x in p.rglob(".*.old")]
    return f"temporary files left: {left}" if left else None


def complete_outputs(p: Path) -> str | None:
    import models

    try:
        models.load_pretrained(p / RUN / "final")
        json.loads((p / "metrics/pretrain/t5-0.json").read_text())
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"outputs incomplete: {exc}"
    return None


def all_of(*checks: Callable[[Path], str | None]) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        return next((msg for c in checks if (msg := c(p))), None)

    return check


# ------------------------------------------------------------------------------------------------- cases


def cases(mount_ok: bool) -> list[Case]:
    ckpt = f"{RUN_CKPT}/last.ckpt"
    ft_ckpt = f"{FT_CKPT}/last.ckpt"
    ft_weights = f"{RUN}/final/model.safetensors"
    ft_published = (f"{FT}/final/model.safetensors", "metrics/finetune/t5-0.json")
    bad_params = "error: params.yaml: 1 problem(s)"
    out = [
        # --- bad params: exit 2 before anything is touched
        Case("unknown key", "params", 2, PRETRAIN, params(**{"pretrain.lrr": 0.1}), ("pretrain.lrr", "optimizer")),
        Case("wrong type", "params", 2, PRETRAIN, params(**{"pretrain.max_steps": "ten"}), ("pretrain.max_steps",)),
        Case(
            "not YAML",
            "params",
            2,
            PRETRAIN,
            write("params.yaml", b"pretrain: [unclosed\n  - : :"),
            ("not valid YAML",),
        ),
        Case(
            "negative divergence patience",
            "params",
            2,
            PRETRAIN,
            params(**{"trainer.divergence.patience_steps": -1}),
            ("trainer.divergence.patience_steps",),
        ),
        Case(
            "16-mixed on CPU",
            "params",
            2,
            PRETRAIN,
            params(**{"trainer.precision": "16-mixed"}),
            ("'16-mixed' needs a GPU",),
        ),  # fmt: skip
        Case(
            "file: tracking store",
            "params",
            2,
            PRETRAIN,
            params(**{"mlflow.tracking_uri": "file:/tmp/x"}),
            ("mlflow.tracking_uri", "no longer accepts file stores"),
        ),
        Case("missing params file", "params", 2, [*PRETRAIN, "--params", "nothere.yaml"], message=("file not found",)),
        Case(
            "unknown variant",
            "params",
            1,
            stage("pretrain", "--model", "nope", "--seed", "0"),
            message=("error: --model nope: not a variant of `models:`",),
        ),
        Case(
            "lr 1e-4 written by hand",
            "params",
            0,
            stage("config", "params.yaml"),
            raw_params("lr: 0.003", "lr: 1e-4"),
            ("params.yaml: ok",),
        ),
        Case(
            "slurm on a CPU partition",
            "params",
            0,
            stage("config", "params.yaml"),
            params(**{"launcher.kind": "slurm", "launcher.slurm.gpus_per_node": 0}),
            ("params.yaml: ok",),
        ),
        Case(
            "divergence patience longer than the run",  # issue 27: lr 1e6 for 12 steps exited 0 with a dead model
            "params",
            2,
            PRETRAIN,
            params(**{**DIVERGING, "trainer.divergence.patience_steps": 50}),
            (bad_params, "trainer.divergence.patience_steps: 50 steps is longer than finetune.max_steps (4)"),
        ),
        Case(
            "divergence patience longer than finetune",
            "params",
            2,
            PRETRAIN,
            params(**{"trainer.divergence.patience_steps": 5}),
            ("patience_steps: 5 steps is longer than finetune.max_steps (4)", "set it to at most 4, or 0"),
        ),
        Case("no seeds", "params", 2, PRETRAIN, params(seeds=[]), ("seeds",)),
        Case("the same seed twice", "params", 2, PRETRAIN, params(seeds=[0, 0]), ("seeds", "distinct")),
        Case("zero steps", "params", 2, PRETRAIN, params(**{"pretrain.max_steps": 0}), ("pretrain.max_steps",)),
        Case("negative lr", "params", 2, PRETRAIN, params(**{"pretrain.optimizer.lr": -1}), ("pretrain.optimizer.lr",)),
        Case("empty params file", "params", 2, PRETRAIN, write("params.yaml", b""), ("expected a mapping",)),
        Case("params not UTF-8", "params", 2, PRETRAIN, write("params.yaml", b"seed: \xff\xfe\n"), ("not valid YAML",)),
        Case(
            "variant name with a dash",
            "params",
            2,
            PRETRAIN,
            lambda p: _rename_variant(p, "t5-big"),
            ("models.t5-big", "letters, digits and '_'"),
        ),
        Case(
            "--seed not a number",
            "params",
            2,
            stage("pretrain", "--model", "t5", "--seed", "zero"),
            message=("usage:", "--seed: invalid int value: 'zero'"),
        ),
        Case(
            "--seed not in seeds",  # issue 27: trained and wrote artifacts/pretrain/t5/7 that no DVC stage tracks
            "params",
            1,
            stage("pretrain", "--model", "t5", "--seed", "7"),
            message=("error: --seed 7: not one of `seeds:` in params.yaml (0)", "add it to `seeds:`"),
            check=absent("artifacts/pretrain/t5/7", "metrics/pretrain/t5-7*"),
        ),
        Case(
            "--seed not in seeds (finetune)",
            "params",
            1,
            stage("finetune", "--model", "t5", "--seed", "-1"),
            message=("error: --seed -1: not one of `seeds:`",),
            check=absent("artifacts/finetune/t5/-1", "metrics/finetune/t5--1*"),
        ),
        Case(
            "--seed not in seeds (evaluate)",
            "params",
            1,
            stage("evaluate", "--model", "t5", "--seed", "7"),
            message=("error: --seed 7: not one of `seeds:`",),
            check=absent("artifacts/eval/t5/7", "metrics/evaluate/t5-7*"),
        ),
        # --- data and tokenizer
        Case(
            "tokenized data missing", "data", 1, PRETRAIN, remove("data/tokenized"), ("data/tokenized", "tokenize")
        ),  # fmt: skip
        Case(
            "tokenized data corrupt",
            "data",
            1,
            PRETRAIN,
            lambda p: _corrupt_token_store(p),
            ("is corrupt or unreadable", "dvc repro tokenize --force"),
        ),
        Case(
            "sequence longer than the data",
            "data",
            1,
            PRETRAIN,
            params(**{"pretrain.input_length": 1 << 14, "pretrain.noise_density": 0.0005}),
            ("the training split is shorter than one sequence of 16384 tokens",),
        ),
        Case(
            "tokenizer.json missing",
            "tokenizer",
            1,
            PRETRAIN,
            remove("data/tokenizer/tokenizer.json"),
            ("tokenizer.json not found", "dvc repro tokenize"),
        ),
        Case(
            "tokenizer.json corrupt",
            "tokenizer",
            1,
            PRETRAIN,
            write("data/tokenizer/tokenizer.json", b"{vocab"),
            ("tokenizer.json is corrupt or unreadable",),
        ),
        Case(
            "spm.model corrupt (finetune)",
            "tokenizer",
            1,
            FINETUNE,
            write("data/tokenizer/spm.model", b"junk"),
            ("spm.model is not a readable SentencePiece model",),
            protect=ft_published,
        ),
        Case(
            "finetune without pretrained model",
            "data",
            1,
            FINETUNE,
            remove(f"{RUN}/final"),
            ("has no weights: run `dvc repro pretrain@t5-0` first",),
            protect=ft_published,
        ),
        # --- prepare: the corpus files a user points it at (with a previous good prepare to keep)
        Case(
            "JSONL record without text",  # issue 27: counted as too short, never named
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.jsonl": _jsonl(30, missing={7})})),
            ("a.jsonl: record 8 has no text: its 'text' field is missing or null (the fields it has: body)",),
            protect=PREPARED,
        ),
        Case(
            "JSONL without the text field",  # issue 27: the message blamed the corpus size
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.jsonl": _jsonl(30, missing=set(range(30)))})),
            ("a.jsonl: no field 'text' (data.files.text_field) in record 1; found: body",),
            protect=PREPARED,
        ),
        Case(
            "JSONL text that is a number",
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.jsonl": _jsonl(30, number={3})})),
            ("a.jsonl: record 4 has a int, not text, in its 'text' field",),
            protect=PREPARED,
        ),
        Case(
            "JSONL line cut off",
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.jsonl": _jsonl(30) + b'{"text": "cut off here\n'})),
            ("a.jsonl: cannot read it as json", "replace it, or narrow data.files.glob"),
            protect=PREPARED,
        ),
        Case(
            "corrupt parquet",  # issue 27: a 45-line pyarrow traceback, then a message without the file's name
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.parquet": _parquet(30), "b.parquet": _parquet(30)[:300]}, "corpus/*.parquet")),
            ("b.parquet: cannot read it as parquet (ArrowInvalid: ", "the file is damaged or not parquet"),
            protect=PREPARED,
            unsaid=("Failed to read",),  # the builder's own log line, twice, before our message
        ),
        Case(
            "CSV without the text column",
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.csv": _csv(30, "body")}, "corpus/*.csv")),
            ("a.csv: no field 'text' (data.files.text_field) in record 1; found: title, body",),
            protect=PREPARED,
        ),
        Case(
            "empty CSV file",
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.csv": _csv(30, "text"), "b.csv": b""}, "corpus/*.csv")),
            ("b.csv: cannot read it as csv (EmptyDataError",),
            protect=PREPARED,
        ),
        Case(
            "corpus of one document repeated",  # the message said too few documents, not where they went
            "prepare",
            1,
            PREPARE,
            chain(prepared, corpus({"a.jsonl": (b'{"text": "' + b"the same words again " * 8 + b'"}\n') * 30})),
            ("the corpus has 1 document(s) after filtering; need at least 3", "29 duplicate(s) removed (data.dedup)"),
            protect=PREPARED,
        ),
        Case(
            "corpus glob matches nothing",
            "prepare",
            1,
            PREPARE,
            chain(prepared, params(**{"data.files.glob": "nowhere/*.jsonl"})),
            ("data.files.glob: 'nowhere/*.jsonl' matched no files",),
            protect=PREPARED,
        ),
        # --- checkpoints
        Case(
            "corrupt last.ckpt: stop",
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, write(ckpt, b"PK\x03\x04 not really")),
            ("last.ckpt is corrupt or unreadable", "trainer.on_corrupt_checkpoint"),
            protect=(*PUBLISHED, ckpt),
        ),
        Case(
            "truncated last.ckpt: stop",
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, truncate(ckpt)),
            ("last.ckpt is corrupt or unreadable",),
            protect=(*PUBLISHED, ckpt),
        ),
        Case(
            "corrupt last.ckpt: previous",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, truncate(ckpt), params(**{"trainer.on_corrupt_checkpoint": "previous"})),
            ("moved it aside", "resuming from checkpoints/pretrain/t5/0/previous.ckpt"),
            ("pretrain:FINISHED",),
            check=all_of(exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
        ),
        Case(
            "corrupt last.ckpt: scratch",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, truncate(ckpt), params(**{"trainer.on_corrupt_checkpoint": "scratch"})),
            ("moved it aside", "pretrain@t5-0: 12 steps"),
            ("pretrain:FINISHED",),
            check=all_of(exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
        ),
        Case(
            "last.ckpt a directory without shards",
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, remove(ckpt), lambda p: (p / ckpt).mkdir()),
            ("last.ckpt is corrupt or unreadable (a directory without DeepSpeed shards",),
            protect=PUBLISHED,
        ),
        Case(
            "last.ckpt of another model",  # resumed, it failed inside Lightning with a traceback of 26 tensors
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, foreign_checkpoint(ckpt)),
            ("last.ckpt is corrupt or unreadable (its weights are not this model's: 26 of 26 tensors differ, e.g.",),
            protect=(*PUBLISHED, ckpt),
        ),
        Case(
            "last.ckpt of another model: previous",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, foreign_checkpoint(ckpt), params(**{"trainer.on_corrupt_checkpoint": "previous"})),
            ("its weights are not this model's", "resuming from checkpoints/pretrain/t5/0/previous.ckpt"),
            ("pretrain:FINISHED",),
            check=all_of(exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
        ),
        Case(
            "planted pickle in last.ckpt",  # issue 27: the message quoted torch's advice to load it unrestricted
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, planted_pickle(ckpt)),
            ("last.ckpt is corrupt or unreadable (it holds a reference to posix.system", "it was not loaded"),
            protect=(*PUBLISHED, ckpt),
            check=absent("PLANTED"),
            unsaid=("weights_only",),
        ),
        Case(
            "planted pickle in last.ckpt: previous",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, planted_pickle(ckpt), params(**{"trainer.on_corrupt_checkpoint": "previous"})),
            ("posix.system", "moved it aside"),
            ("pretrain:FINISHED",),
            check=all_of(absent("PLANTED"), exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
            unsaid=("weights_only",),
        ),
        Case(
            "resume from a good last.ckpt",
            "checkpoints",
            0,
            PRETRAIN,
            unfinished,
            ("resuming from checkpoints/pretrain/t5/0/",),
            ("pretrain:FINISHED",),
            check=complete_outputs,
        ),
        Case(
            "run.json corrupt: starts over",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, write(f"{RUN_CKPT}/run.json", b'{"fingerprint": ')),
            ("pretrain@t5-0: 12 steps",),
            ("pretrain:FINISHED",),
            check=complete_outputs,
            unsaid=("resuming from",),
        ),
        # --- weights
        Case(
            "pretrained weights corrupt (finetune)",
            "weights",
            1,
            FINETUNE,
            write(ft_weights, b"\x08garbage!"),
            ("model.safetensors is corrupt or unreadable", "re-run `dvc repro pretrain@t5-0`"),
            protect=ft_published,
        ),
        Case(
            "pretrained weights truncated (finetune)",
            "weights",
            1,
            FINETUNE,
            truncate(ft_weights),
            ("model.safetensors is corrupt or unreadable",),
            protect=ft_published,
        ),
        Case(
            "pretrained config.json corrupt",
            "weights",
            1,
            FINETUNE,
            write(f"{RUN}/final/config.json", b"{"),
            ("config.json is corrupt or unreadable",),
            protect=ft_published,
        ),
        Case(
            "finetuned weights truncated (evaluate)",
            "weights",
            1,
            EVALUATE,
            truncate(f"{FT}/final/model.safetensors"),
            ("finetune/t5/0/final/model.safetensors is corrupt or unreadable", "dvc repro finetune@t5-0"),
            protect=EVALUATED,
        ),
        Case(
            "evaluate before finetune",
            "weights",
            1,
            EVALUATE,
            remove(f"{FT}/final"),
            ("has no model: run `dvc repro finetune@t5-0` first",),
            protect=EVALUATED,
        ),
        Case(
            "metrics JSON corrupt (compare)",
            "weights",
            1,
            stage("compare"),
            write("metrics/pretrain/t5-0.json", b'{"val_loss": '),
            ("metrics/pretrain/t5-0.json is corrupt or unreadable",),
            protect=("reports/comparison.md", "metrics/compare.json"),
        ),
        Case(
            "metrics CSV corrupt (compare)",
            "weights",
            1,
            stage("compare"),
            write("metrics/pretrain/t5-0-train.csv", b"step,tokens,loss\n4,100,5.1\xff\x00\n8,2"),
            ("t5-0-train.csv is corrupt or unreadable",),
            protect=("reports/comparison.md", "metrics/compare.json"),
        ),
        # --- tracking store
        Case(
            "mlflow.db not a database",
            "tracking",
            1,
            PRETRAIN,
            chain(unfinished, write("mlflow.db", b"not a database " * 200)),
            ("mlflow.db is not an SQLite database", "move it aside"),
            protect=(*PUBLISHED, ckpt, "mlflow.db"),
        ),
        Case(
            "tracking server unreachable",
            "tracking",
            1,
            PRETRAIN,
            message=("MLflow tracking server http://127.0.0.1:9 is unreachable",),
            env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        ),
        Case(
            "tracking server in params unreachable",
            "tracking",
            1,
            EVALUATE,
            params(**{"mlflow.tracking_uri": "http://127.0.0.1:9", "mlflow.connect_timeout_s": 2}),
            ("MLflow tracking server http://127.0.0.1:9 is unreachable", "mlflow.tracking_uri"),
            protect=EVALUATED,
        ),
        Case(
            "tracking store folder missing",
            "tracking",
            1,
            PRETRAIN,
            message=("directory /nonexistent/dir does not exist or is not writable",),
            env={"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"},
        ),
        Case(
            "mlflow.db not a database (evaluate)",
            "tracking",
            1,
            EVALUATE,
            chain(evaluated, write("mlflow.db", b"not a database " * 200)),
            ("mlflow.db is not an SQLite database",),
            protect=(*EVALUATED, "mlflow.db"),
        ),
        # --- divergence: nothing published, the run FAILED
        Case(
            "lr 1e6: stuck at ln(vocab)",
            "divergence",
            1,
            PRETRAIN,
            params(**{**DIVERGING, "trainer.divergence.patience_steps": 3}),
            ("error: training diverged at step 3: a gradient norm of 0 for 3 steps in a row",),
            ("pretrain:FAILED",),
        ),
        Case(
            "lr 1e6: the run ends stuck before the patience",  # issue 27: the guard never saw the run through
            "divergence",
            1,
            PRETRAIN,
            params(**{**DIVERGING, "trainer.divergence.patience_steps": 12, "finetune.max_steps": 12}),
            ("error: training diverged at step 12: the run ended with a gradient norm of 0 for its last 11 steps",),
            ("pretrain:FAILED",),
            check=absent(ckpt),  # the stuck weights are not checkpointed: nothing good to keep here
        ),
        Case(
            "lr 1e30: non-finite",
            "divergence",
            1,
            PRETRAIN,
            params(**{"pretrain.optimizer.lr": 1e30, "trainer.gradient_clip_val": 0.0}),
            ("error: training diverged at step", "is nan"),
            ("pretrain:FAILED",),
        ),
        Case(
            "run shorter than its logging interval",  # issue 27: tokens 0 and train_loss null in its metrics
            "logging",
            0,
            PRETRAIN,
            params(**{"pretrain.log_every_n_steps": 20}),
            ("pretrain@t5-0: 12 steps, 384 target tokens",),
            ("pretrain:FINISHED",),
            check=all_of(complete_outputs, logged_through(12)),
        ),
        # --- signals
        Case(
            "SIGTERM mid-training",
            "signals",
            143,
            PRETRAIN,
            params(**SLOW_OVERRIDES),
            ("interrupted by SIGTERM: no outputs were published; re-run the stage to resume from its last checkpoint",),
            ("pretrain:KILLED",),
            signal_after=(signal.SIGTERM, ckpt),
        ),
        Case(
            "SIGINT mid-training",
            "signals",
            130,
            PRETRAIN,
            params(**SLOW_OVERRIDES),
            ("interrupted by SIGINT",),
            ("pretrain:KILLED",),
            signal_after=(signal.SIGINT, ckpt),
        ),
        Case(
            "SIGTERM at startup",
            "signals",
            143,
            PRETRAIN,
            params(**SLOW_OVERRIDES),
            ("interrupted by SIGTERM",),
            signal_after=(signal.SIGTERM, ""),
        ),
        Case(
            "SIGTERM in finetune",
            "signals",
            143,
            FINETUNE,
            params(**{"finetune.max_steps": 400}),
            ("interrupted by SIGTERM", "resume from its last checkpoint"),
            ("finetune:KILLED",),
            protect=ft_published,
            signal_after=(signal.SIGTERM, ft_ckpt),
        ),
        Case(
            "SIGTERM in evaluate",  # issue 27: it said to resume "from its last checkpoint"; evaluate has none
            "signals",
            143,
            EVALUATE,
            chain(evaluated, params(**LONG_EVAL)),
            ("interrupted by SIGTERM: no outputs were published; re-run the stage to start it over",),
            protect=EVALUATED,
            signal_after=(signal.SIGTERM, EVAL_STAGING),
            unsaid=("last checkpoint",),
        ),
        Case(
            "SIGINT in evaluate",
            "signals",
            130,
            EVALUATE,
            chain(evaluated, params(**LONG_EVAL)),
            ("interrupted by SIGINT", "start it over"),
            protect=EVALUATED,
            signal_after=(signal.SIGINT, EVAL_STAGING),
        ),
        Case(
            "SIGTERM in lengths",  # issue 27: a killed run started over without saying so
            "signals",
            143,
            LENGTHS,
            params(**{"lengths.budget.value": 1.0e11}),
            ("this stage keeps no checkpoints", "interrupted by SIGTERM", "re-run the stage to start it over"),
            protect=("metrics/lengths/t5-0.json", "artifacts/lengths/t5/0"),
            signal_after=(signal.SIGTERM, "log:keeps no checkpoints"),
            unsaid=("resume",),
        ),
        # --- processes killed with SIGKILL: their MLflow runs are closed by the next run of the same stage
        Case(
            "SIGKILL mid-training, then re-run",
            "killed",
            0,
            PRETRAIN,
            chain(params(**{"pretrain.max_steps": 60}), killed_pretrain),
            ("left RUNNING by a process that ended", "marked KILLED", "resuming from"),
            ("pretrain:FINISHED",),  # the killed run, closed, then resumed
            check=complete_outputs,
        ),
        Case(
            "SIGKILL, then a re-run with other params",
            "killed",
            0,
            PRETRAIN,
            chain(params(**{"pretrain.max_steps": 60}), killed_pretrain, params(**{"pretrain.max_steps": 12})),
            ("left RUNNING by a process that ended", "marked KILLED", "pretrain@t5-0: 12 steps"),
            ("pretrain:FINISHED", "pretrain:KILLED"),
            check=complete_outputs,
        ),
        Case(
            "SIGKILL, then a corrupt checkpoint stops the re-run",  # issue 27: both runs stayed RUNNING for good
            "killed",
            1,
            PRETRAIN,
            chain(params(**{"pretrain.max_steps": 60}), killed_pretrain, write(ckpt, b"PK\x03\x04 not really")),
            ("marked KILLED", "last.ckpt is corrupt or unreadable"),
            ("pretrain:KILLED",),
            protect=(*PUBLISHED, ckpt),
        ),
        Case(
            "evaluate run killed with SIGKILL, then evaluate",
            "killed",
            0,
            EVALUATE,
            stale_run("evaluate"),
            ("left RUNNING by a process that ended", "evaluated in"),
            ("evaluate:FINISHED", "evaluate:KILLED"),
            check=exists(*EVALUATED),
        ),
        Case(
            "evaluate beside another live evaluate run",
            "killed",
            0,
            EVALUATE,
            live_run("evaluate"),
            ("evaluated in",),
            ("evaluate:FINISHED", "evaluate:KILLED"),  # KILLED: the live one, stopped by the check with SIGTERM
            check=stop_live_run,
            unsaid=("left RUNNING",),
        ),
        Case(
            "lengths run killed with SIGKILL, then lengths stops early",
            "killed",
            1,
            LENGTHS,
            chain(stale_run("lengths"), remove("data/tokenizer/spm.model")),
            ("left RUNNING by a process that ended", "spm.model not found"),
            ("lengths:KILLED",),
            protect=("metrics/lengths/t5-0.json", "artifacts/lengths/t5/0"),
        ),
        # --- concurrency and left-overs
        Case(
            "second run while one runs",
            "concurrency",
            1,
            PRETRAIN,
            lambda p: _concurrent(p),
            ("pretrain@t5-0 is already running in another process",),
            ("pretrain:KILLED",),  # the first run, stopped by the check once it has proven undisturbed
            check=lambda p: _stop_first(p),
            unsaid=("marked KILLED",),
        ),
        Case(
            "temporary left by a killed writer",
            "concurrency",
            0,
            PRETRAIN,
            chain(lambda p: (p / RUN / ".final.999999.deadbeef.tmp").mkdir(), unfinished),
            ("resuming from",),
            ("pretrain:FINISHED",),
            check=complete_outputs,
        ),
        # --- evaluate: the stage after training, with a previous good evaluation to keep
        Case(
            "spm.model corrupt (evaluate)",
            "tokenizer",
            1,
            EVALUATE,
            chain(evaluated, write("data/tokenizer/spm.model", b"junk")),
            ("spm.model is not a readable SentencePiece model",),
            protect=EVALUATED,
        ),
    ]
    if mount_ok:
        out += [
            Case(
                "read-only metrics folder",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs("metrics/pretrain", "1m", readonly=True)),
                ("cannot write metrics/pretrain/", "Read-only file system"),  # found before the run starts
            ),
            Case(
                "full disk for the metrics",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs("metrics/pretrain", "256k", fill=True)),
                ("no space left on the device writing metrics/pretrain/", "filesystem mounted at"),
                ("pretrain:FAILED",),
            ),
            Case(
                "full disk while fine-tuning",  # issue 27: the message named fsspec's temporary file under /tmp
                "disk",
                1,
                FINETUNE,
                # room for run.json, not for the checkpoint (which fsspec writes in /tmp first, then copies)
                chain(unfinished_finetune, mount_tmpfs(FT_CKPT, "256k", fill=True, free=32 << 10)),
                (
                    "no space left on the device writing checkpoints/finetune/t5/0/last.ckpt (the "
                    "filesystem mounted at ",
                    "checkpoints/finetune/t5/0, 0.0 MB free)",
                ),
                ("finetune:FAILED",),
                protect=(*ft_published, ft_ckpt),
                unsaid=("/tmp/tmp",),
            ),
            Case(
                "read-only artifacts folder",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs(RUN, "64m", readonly=True)),
                ("cannot write artifacts/pretrain/t5/0/final", "Read-only file system"),  # before the run starts
            ),
        ]
    return out


# ------------------------------------------------------------------------------------------- case helpers


def _corrupt_token_store(p: Path) -> None:
    files = sorted(f for f in (p / "data/tokenized").rglob("*") if f.is_file() and f.suffix != ".json")
    target = max(files, key=lambda f: f.stat().st_size)
    target.write_bytes(target.read_bytes()[:7])
    for meta in (p / "data/tokenized").rglob("*.json"):
        meta.write_text(meta.read_text()[:-5])


def _rename_variant(p: Path, name: str) -> None:
    data = yaml.safe_load((p / "params.yaml").read_text())
    data["models"] = {name: data["models"]["t5"]}
    (p / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _jsonl(n: int, missing: set[int] = frozenset(), number: set[int] = frozenset()) -> bytes:
    """`n` JSON-lines records of about 150 characters; those in `missing` hold `body` instead of `text`, those in
    `number` a number as their `text`."""
    lines = []
    for i in range(n):
        text = f"document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(24))
        record = {"body": text} if i in missing else {"text": 12345 if i in number else text}
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def _csv(n: int, column: str) -> bytes:
    import csv
    import io

    texts = [json.loads(line)["text"] for line in _jsonl(n).decode().splitlines()]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["title", column])
    writer.writerows([f"title {i}", text] for i, text in enumerate(texts))
    return buf.getvalue().encode()


def _parquet(n: int) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in _jsonl(n).decode().splitlines()]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


def corpus(files: dict[str, bytes], glob: str = "corpus/*.jsonl") -> Callable[[Path], None]:
    """The corpus `prepare` reads: these files under `corpus/` (any others removed), `data.source: files`."""

    def setup(p: Path) -> None:
        shutil.rmtree(p / "corpus", ignore_errors=True)
        for name, data in files.items():
            write(f"corpus/{name}", data)(p)
        edit_params(p, **{"data.source": "files", "data.files.glob": glob, "data.files.format": "auto"})

    return setup


def prepared(p: Path) -> None:
    """A previous good `prepare` of a 30-document corpus (the outputs `PREPARED` a failed prepare must keep)."""
    corpus({"a.jsonl": _jsonl(30)})(p)
    shutil.rmtree(p / "data/prepared", ignore_errors=True)
    proc = subprocess.run(PREPARE, cwd=p, env=_env(p), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"setup: prepare failed\n{proc.stderr[-3000:]}")


def planted_pickle(rel: str) -> Callable[[Path], None]:
    """A checkpoint whose unpickling would call os.system (and create the file PLANTED in the project)."""

    def setup(p: Path) -> None:
        import torch

        torch.save({"state_dict": {}, "payload": _Planted(str(p / "PLANTED"))}, p / rel)

    return setup


def foreign_checkpoint(rel: str) -> Callable[[Path], None]:
    """The checkpoint, its weights replaced by those of a narrower model (a file copied from another run)."""

    def setup(p: Path) -> None:
        import torch

        checkpoint = torch.load(p / rel, weights_only=True)
        checkpoint["state_dict"] = {k: v[..., :1] for k, v in checkpoint["state_dict"].items()}
        torch.save(checkpoint, p / rel)

    return setup


class _Planted:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def logged_through(steps: int) -> Callable[[Path], str | None]:
    """The run's metrics count its tokens and final loss, and its loss history has a row for its last step."""

    def check(p: Path) -> str | None:
        metrics = json.loads((p / "metrics/pretrain/t5-0.json").read_text())
        rows = (p / "metrics/pretrain/t5-0-train.csv").read_text().splitlines()
        if not metrics["tokens"] or metrics["train_loss"] is None:
            return f"metrics without the training: tokens {metrics['tokens']}, train_loss {metrics['train_loss']}"
        if not rows[-1].startswith(f"{steps},"):
            return f"the loss history ends {rows[-1]!r}, not at step {steps}"
        return None

    return check


def unfinished(p: Path) -> None:
    """Make the finished pretrain run look interrupted at its last checkpoint (a re-run resumes from it)."""
    _unfinish(p / RUN_CKPT)


def unfinished_finetune(p: Path) -> None:
    _unfinish(p / FT_CKPT)


def _unfinish(checkpoints: Path) -> None:
    state_path = checkpoints / "run.json"
    state = json.loads(state_path.read_text())
    state["completed"] = False
    state_path.write_text(json.dumps(state))


def _env(project: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def killed_pretrain(p: Path) -> None:
    """Start pretraining and SIGKILL it once its first checkpoint exists: its MLflow run is left RUNNING."""
    ckpt = p / RUN_CKPT / "last.ckpt"
    ckpt.unlink(missing_ok=True)
    (p / RUN_CKPT / "run.json").unlink(missing_ok=True)
    proc = subprocess.Popen(PRETRAIN, cwd=p, env=_env(p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    if [s for _, s, _ in (mlflow_runs(p) or {}).values()].count("RUNNING") != 1:
        raise RuntimeError("setup: the killed run did not leave its MLflow run RUNNING")


# A process that starts a real MLflow run of `stage` for t5 seed 0, as the stage would, then `WHAT`.
_RUN_CODE = """
import os, signal, sys, time
from pipeline.common import install_signal_handlers
from pipeline.tracking.runs import TrackedRun, tracked_run, tracking_uri
install_signal_handlers()
run = TrackedRun(tracking_uri(None, "."), "t5-vs-reformer", system_metrics=False)
try:
    with tracked_run(run, "{stage}@t5-0", {{"stage": "{stage}", "variant": "t5", "seed": "0"}}):
        print("started", flush=True)
        {what}
except KeyboardInterrupt:  # SIGTERM (StageInterrupted): the run is KILLED
    sys.exit(143)
"""


def stale_run(stage_name: str) -> Callable[[Path], None]:
    """An MLflow run of `stage_name` left RUNNING by a process killed with SIGKILL (as the OOM killer does)."""

    def setup(p: Path) -> None:
        code = _RUN_CODE.format(stage=stage_name, what="os.kill(os.getpid(), signal.SIGKILL)")
        proc = subprocess.run([sys.executable, "-c", code], cwd=p, env=_env(p), capture_output=True, text=True)
        if proc.returncode != -signal.SIGKILL or "started" not in proc.stdout:
            raise RuntimeError(f"setup: the run to kill ended {proc.returncode}\n{proc.stderr[-3000:]}")

    return setup


_LIVE: dict[Path, subprocess.Popen] = {}


def live_run(stage_name: str) -> Callable[[Path], None]:
    """An MLflow run of `stage_name` whose process is alive (it waits; SIGTERM ends it, KILLED)."""

    def setup(p: Path) -> None:
        code = _RUN_CODE.format(stage=stage_name, what="time.sleep(900)")
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=p,
            env=_env(p),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if proc.stdout.readline().strip() != "started":
            raise RuntimeError("setup: the live run did not start")
        _LIVE[p] = proc

    return setup


def stop_live_run(p: Path) -> str | None:
    """The live run was left alone (still RUNNING after the case's command); then it is stopped with SIGTERM."""
    proc = _LIVE.pop(p)
    statuses = [s for _, s, _ in (mlflow_runs(p) or {}).values()]
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    if statuses.count("RUNNING") != 1:
        return f"the live run was not left RUNNING (statuses {statuses})"
    return None if code == 143 else f"the live run's process ended with exit {code} on SIGTERM"


_FIRST: dict[Path, subprocess.Popen] = {}


def _concurrent(p: Path) -> None:
    """Start a first run and wait until it trains; the case's own run is then a second run of the same stage."""
    edit_params(p, **{"pretrain.max_steps": 5000})  # still training when the second run gets to the lock
    ckpt = p / RUN_CKPT / "last.ckpt"
    ckpt.unlink()
    first = subprocess.Popen(PRETRAIN, cwd=p, env=_env(p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _FIRST[p] = first


def _stop_first(p: Path) -> str | None:
    """The first run was not disturbed by the second: it is still training, and ends 143 on SIGTERM."""
    first = _FIRST.pop(p)
    if first.poll() is not None:
        return f"the first run ended early (exit {first.returncode})"
    first.send_signal(signal.SIGTERM)
    code = first.wait(timeout=900)
    return None if code == 143 else f"the first run ended with exit {code} on SIGTERM"


# ---------------------------------------------------------------------------------------------- running


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    if path.is_dir():
        return "dir"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(base: Path) -> None:
    """The tiny project, with a finished pretrain and finetune of t5 seed 0."""
    from tests.train_project import make_project

    base.mkdir(parents=True, exist_ok=True)
    make_project(base, BASE_OVERRIDES, with_tokenizer=True)
    p = yaml.safe_load((base / "params.yaml").read_text())
    p["models"] = {"t5": p["models"]["t5"]}
    p["finetune"]["tasks"] = {"duplication": p["finetune"]["tasks"]["duplication"]}
    p["finetune"]["init"] = "pretrained"
    (base / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (base / "data/prepared").mkdir(parents=True, exist_ok=True)
    for cmd in (PRETRAIN, FINETUNE):
        proc = subprocess.run(cmd, cwd=base, env=_env(base), capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"preparing the base project failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")


@dataclass
class Result:
    case: Case
    code: int | None
    traceback: bool
    intact: bool
    problem: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == self.case.expected and not self.traceback and self.intact and self.problem is None


def run_case(case: Case, base: Path, work: Path) -> Result:
    project = work / case.name.replace(" ", "_").replace("/", "_").replace(":", "")
    unmount_all(project)
    shutil.rmtree(project, ignore_errors=True)  # a previous run of the same case (--keep)
    shutil.copytree(base, project, symlinks=True)
    start = time.monotonic()
    try:
        case.setup(project)
        before = {rel: digest(project / rel) for rel in case.protect}
        runs_before = mlflow_runs(project)
        wait_for = case.signal_after[1] if case.signal_after else ""
        if wait_for and not wait_for.startswith("log:") and not _is_pattern(wait_for):
            (project / wait_for).unlink(missing_ok=True)
        proc = subprocess.Popen(
            case.command,
            cwd=project,
            env=_env(project, case.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = _Collector(proc.stdout), _Collector(proc.stderr)
        if case.signal_after is not None:
            _wait(project, proc, err, wait_for)
            proc.send_signal(case.signal_after[0])
        proc.wait(timeout=900)
        stdout, stderr = out.text(), err.text()
        unmount_all(project)
        traceback = "Traceback (most recent call last)" in stderr + stdout
        if case.expected == 0:
            intact = True
        else:
            after = {rel: digest(project / rel) for rel in case.protect}
            intact = after == before
        problem = _message_problem(case, stdout, stderr) or case.check(project)
        problem = problem or mlflow_problem(case, runs_before, mlflow_runs(project)) or no_tmp_left(project)
        if os.environ.get("FAULTS_VERBOSE") or (proc.returncode != case.expected or traceback or problem):
            (work / f"{project.name}.log").write_text(stdout + "\n----- stderr -----\n" + stderr)
        # killed by a signal before Python could handle it: report what a shell (and DVC) sees, 128 + signal
        code = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
        return Result(case, code, traceback, intact, problem, time.monotonic() - start)
    finally:
        for leftover in (_FIRST.pop(project, None), _LIVE.pop(project, None)):
            if leftover is not None and leftover.poll() is None:
                leftover.kill()
        unmount_all(project)


class _Collector:
    """Reads a pipe to its end in a thread (so the case can wait for a line while the process runs)."""

    def __init__(self, pipe: Any):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(pipe.readline, "")), daemon=True)
        self.thread.start()

    def text(self) -> str:
        self.thread.join(timeout=60)
        return "".join(self.lines)


def _wait(project: Path, proc: subprocess.Popen, err: _Collector, wait_for: str) -> None:
    """Until `wait_for` is there: `log:<text>` a line of the stage's stderr holding the text, else a path or glob
    in the project; an empty `wait_for` gives the stage 3 s (it is still importing)."""
    if not wait_for:
        time.sleep(3.0)
        return
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if wait_for.startswith("log:"):
            if any(wait_for[4:] in line for line in list(err.lines)):
                return
        elif _present(project, wait_for):
            return
        time.sleep(0.02)


def _message_problem(case: Case, stdout: str, stderr: str) -> str | None:
    """What the user was told must hold every `case.message` (on stderr when the case fails) and no `unsaid`."""
    if not case.message:
        return "the case names no expected message"
    said = stdout + stderr if case.expected == 0 else stderr
    missing = [m for m in case.message if m not in said]
    if missing:
        return f"not said: {missing}"
    wrong = [m for m in case.unsaid if m in stdout + stderr]
    if wrong:
        return f"said, though it must not be: {wrong}"
    if case.expected in (1, 2) and not _said_something(stderr):
        return "no error line on stderr"
    return None


def _is_pattern(rel: str) -> bool:
    return any(c in rel for c in "*?[")


def _present(project: Path, rel: str) -> bool:
    """`rel` exists in `project` (a glob pattern: something matches it)."""
    return any(project.glob(rel)) if _is_pattern(rel) else (project / rel).exists()


def _said_something(stderr: str) -> bool:
    lines = stderr.splitlines()
    return any(line.startswith(("error:", "interrupted", "usage:")) or "error" in line.lower() for line in lines)


def table(results: list[Result]) -> str:
    rows = [("case", "group", "expected", "exit", "traceback?", "outputs intact?", "verdict", "s")]
    for r in results:
        verdict = "ok" if r.ok else ("WRONG: " + (r.problem or ("exit code" if r.code != r.case.expected else "")))
        if not r.ok and r.traceback:
            verdict += " traceback"
        if not r.ok and not r.intact:
            verdict += " outputs changed"
        rows.append(
            (
                r.case.name,
                r.case.group,
                str(r.case.expected),
                str(r.code),
                "yes" if r.traceback else "no",
                "yes" if r.intact else "NO",
                verdict,
                f"{r.seconds:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the cases whose name contains one of these")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs of wrong cases)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at the same time (default: %(default)s)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = work / "base"
        t0 = time.monotonic()
        if not (base / RUN / "final" / "model.safetensors").is_file():
            prepare(base)
        print(f"base project ready in {time.monotonic() - t0:.0f} s", flush=True)
        selected = [c for c in cases(can_mount()) if not args.only or any(o in c.name for o in args.only)]
        from concurrent.futures import ThreadPoolExecutor

        def one(case: Case) -> Result:
            r = run_case(case, base, work / "cases")
            print(f"  {case.name}: exit {r.code} ({'ok' if r.ok else 'WRONG'}, {r.seconds:.0f} s)", flush=True)
            return r

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(one, selected))
        print(table(results))
        wrong = [r for r in results if not r.ok]
        tracebacks = sum(r.traceback for r in results)
        print(
            f"{len(results)} cases: {len(results) - len(wrong)} right, {len(wrong)} wrong; tracebacks {tracebacks}; "
            f"wrong exit codes {sum(r.code != r.case.expected for r in results)}; "
            f"silent successes {sum(r.code == 0 and r.case.expected != 0 for r in results)}; "
            f"outputs changed {sum(not r.intact for r in results)}"
        )
        return 1 if wrong else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
