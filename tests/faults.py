"""The fault suite: real stage processes on one tiny prepared project, each with one fault injected by hand.

    python -m tests.faults [--only NAME ...] [--keep DIR]

prints one table (case, expected, exit code, traceback?, outputs intact?, verdict) and exits non-zero when any case
is wrong. A case is right when the exit code is the expected one (0 finished; 1 failed or diverged; 2 bad params;
130 SIGINT; 143 SIGTERM), no traceback is printed for a problem the user can fix, and the outputs a failure must not
touch (the published model, metrics and loss histories of the previous good run, the checkpoints) are byte-for-byte
unchanged, while a success leaves complete, loadable outputs.

The base project (tests/train_project.py: tiny T5, synthetic tokenized data, real tokenizer) is trained once
(pretrain, then finetune); every case works on a copy of it.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = "artifacts/pretrain/t5/0"
FT = "artifacts/finetune/t5/0"
PUBLISHED = (
    f"{RUN}/final/model.safetensors",
    f"{RUN}/final/config.json",
    f"{RUN}/final/training.json",
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
    name: str
    group: str
    expected: int
    command: list[str]
    setup: Callable[[Path], None] = lambda p: None
    protect: tuple[str, ...] = PUBLISHED  # must be byte-identical afterwards when the case fails
    signal_after: tuple[int, str] | None = None  # (signal, path or glob that must exist first) for interruptions
    check: Callable[[Path], str | None] = lambda p: None  # extra check: a problem description or None
    env: dict[str, str] = field(default_factory=dict)


def stage(name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{name}", *extra]


PRETRAIN = stage("pretrain", "--model", "t5", "--seed", "0")
FINETUNE = stage("finetune", "--model", "t5", "--seed", "0")
EVALUATE = stage("evaluate", "--model", "t5", "--seed", "0")
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


def unfinished(p: Path) -> None:
    """Make the finished pretrain run look interrupted at its last checkpoint (a re-run resumes from it)."""
    state_path = p / RUN / "checkpoints" / "run.json"
    state = json.loads(state_path.read_text())
    state["completed"] = False
    state_path.write_text(json.dumps(state))


def chain(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(p: Path) -> None:
        for s in steps:
            s(p)

    return setup


def mount_tmpfs(rel: str, size: str, fill: bool = False, readonly: bool = False) -> Callable[[Path], None]:
    """Put a small tmpfs (its previous contents copied in) over `rel`: full (ENOSPC) or read-only."""

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


def mlflow_status(project: Path) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("t5-vs-reformer")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
    return runs[0].info.status if runs else None


def status_is(expected: str) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        got = mlflow_status(p)
        return None if got == expected else f"MLflow status {got}, expected {expected}"

    return check


def exists(*rels: str) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        missing = [r for r in rels if not list(p.glob(r))]
        return f"missing {missing}" if missing else None

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
    ckpt = f"{RUN}/checkpoints/last.ckpt"
    ft_weights = f"{RUN}/final/model.safetensors"
    out = [
        # --- bad params: exit 2 before anything is touched
        Case("unknown key", "params", 2, PRETRAIN, params(**{"pretrain.lrr": 0.1})),
        Case("wrong type", "params", 2, PRETRAIN, params(**{"pretrain.max_steps": "ten"})),
        Case("not YAML", "params", 2, PRETRAIN, write("params.yaml", b"pretrain: [unclosed\n  - : :")),
        Case(
            "negative divergence patience", "params", 2, PRETRAIN, params(**{"trainer.divergence.patience_steps": -1})
        ),  # fmt: skip
        Case("16-mixed on CPU", "params", 2, PRETRAIN, params(**{"trainer.precision": "16-mixed"})),
        Case("file: tracking store", "params", 2, PRETRAIN, params(**{"mlflow.tracking_uri": "file:/tmp/x"})),
        Case("missing params file", "params", 2, [*PRETRAIN, "--params", "nothere.yaml"]),
        Case("unknown variant", "params", 1, stage("pretrain", "--model", "nope", "--seed", "0")),
        Case(
            "lr 1e-4 written by hand", "params", 0, stage("config", "params.yaml"), raw_params("lr: 0.003", "lr: 1e-4")
        ),  # fmt: skip
        Case(
            "slurm on a CPU partition",
            "params",
            0,
            stage("config", "params.yaml"),
            params(**{"launcher.kind": "slurm", "launcher.slurm.gpus_per_node": 0}),
        ),  # fmt: skip
        # --- data and tokenizer
        Case("tokenized data missing", "data", 1, PRETRAIN, remove("data/tokenized")),
        Case("tokenized data corrupt", "data", 1, PRETRAIN, lambda p: _corrupt_token_store(p)),
        Case(
            "sequence longer than the data",
            "data",
            1,
            PRETRAIN,
            params(**{"pretrain.input_length": 1 << 14, "pretrain.noise_density": 0.0005}),
        ),  # fmt: skip
        Case("tokenizer.json missing", "tokenizer", 1, PRETRAIN, remove("data/tokenizer/tokenizer.json")),
        Case("tokenizer.json corrupt", "tokenizer", 1, PRETRAIN, write("data/tokenizer/tokenizer.json", b"{vocab")),
        Case("spm.model corrupt (finetune)", "tokenizer", 1, FINETUNE, write("data/tokenizer/spm.model", b"junk")),
        # --- checkpoints
        Case(
            "corrupt last.ckpt: stop",
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, write(ckpt, b"PK\x03\x04 not really")),
            protect=(*PUBLISHED, ckpt),
        ),  # fmt: skip
        Case(
            "truncated last.ckpt: stop",
            "checkpoints",
            1,
            PRETRAIN,
            chain(unfinished, truncate(ckpt)),
            protect=(*PUBLISHED, ckpt),
        ),  # fmt: skip
        Case(
            "corrupt last.ckpt: previous",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, truncate(ckpt), params(**{"trainer.on_corrupt_checkpoint": "previous"})),
            check=all_of(exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
        ),  # fmt: skip
        Case(
            "corrupt last.ckpt: scratch",
            "checkpoints",
            0,
            PRETRAIN,
            chain(unfinished, truncate(ckpt), params(**{"trainer.on_corrupt_checkpoint": "scratch"})),
            check=all_of(exists(f"{RUN}/last.ckpt.corrupt-*"), complete_outputs),
        ),  # fmt: skip
        Case("resume from a good last.ckpt", "checkpoints", 0, PRETRAIN, unfinished, check=complete_outputs),
        # --- weights
        Case(
            "pretrained weights corrupt (finetune)",
            "weights",
            1,
            FINETUNE,
            write(ft_weights, b"\x08garbage!"),
            protect=(f"{FT}/final/model.safetensors",),
        ),  # fmt: skip
        Case(
            "pretrained weights truncated (finetune)",
            "weights",
            1,
            FINETUNE,
            truncate(ft_weights),
            protect=(f"{FT}/final/model.safetensors",),
        ),  # fmt: skip
        Case(
            "pretrained config.json corrupt",
            "weights",
            1,
            FINETUNE,
            write(f"{RUN}/final/config.json", b"{"),
            protect=(f"{FT}/final/model.safetensors",),
        ),  # fmt: skip
        Case(
            "finetuned weights truncated (evaluate)",
            "weights",
            1,
            stage("evaluate", "--model", "t5", "--seed", "0"),
            truncate(f"{FT}/final/model.safetensors"),
        ),  # fmt: skip
        Case(
            "metrics JSON corrupt (compare)",
            "weights",
            1,
            stage("compare"),
            write("metrics/pretrain/t5-0.json", b'{"val_loss": '),
        ),  # fmt: skip
        # --- tracking store
        Case(
            "mlflow.db not a database",
            "tracking",
            1,
            PRETRAIN,
            chain(unfinished, write("mlflow.db", b"not a database " * 200)),
            protect=(*PUBLISHED, ckpt),
        ),  # fmt: skip
        Case("tracking server unreachable", "tracking", 1, PRETRAIN, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
        Case(
            "tracking store folder missing",
            "tracking",
            1,
            PRETRAIN,
            env={"MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"},
        ),  # fmt: skip
        # --- divergence
        Case(
            "lr 1e6: stuck at ln(vocab)",
            "divergence",
            1,
            PRETRAIN,
            params(
                **{
                    "pretrain.optimizer.lr": 1e6,
                    "trainer.divergence.patience_steps": 3,
                    "trainer.gradient_clip_val": 0.0,
                }
            ),
            check=status_is("FAILED"),
        ),  # fmt: skip
        Case(
            "lr 1e30: non-finite",
            "divergence",
            1,
            PRETRAIN,
            params(**{"pretrain.optimizer.lr": 1e30, "trainer.gradient_clip_val": 0.0}),
            check=status_is("FAILED"),
        ),  # fmt: skip
        # --- signals
        Case(
            "SIGTERM mid-training",
            "signals",
            143,
            PRETRAIN,
            params(**SLOW_OVERRIDES),
            signal_after=(signal.SIGTERM, ckpt),
            check=status_is("KILLED"),
        ),  # fmt: skip
        Case(
            "SIGINT mid-training",
            "signals",
            130,
            PRETRAIN,
            params(**SLOW_OVERRIDES),
            signal_after=(signal.SIGINT, ckpt),
            check=status_is("KILLED"),
        ),  # fmt: skip
        Case(
            "SIGTERM at startup", "signals", 143, PRETRAIN, params(**SLOW_OVERRIDES), signal_after=(signal.SIGTERM, "")
        ),  # fmt: skip
        Case(
            "SIGTERM in finetune",
            "signals",
            143,
            FINETUNE,
            params(**{"finetune.max_steps": 400}),
            signal_after=(signal.SIGTERM, f"{FT}/checkpoints/last.ckpt"),
            protect=(f"{FT}/final/model.safetensors",),
        ),  # fmt: skip
        Case(
            "SIGKILL mid-training, then re-run",
            "signals",
            0,
            PRETRAIN,
            chain(params(**{"pretrain.max_steps": 60}), lambda p: _killed_run(p, PRETRAIN, ckpt)),
            check=all_of(complete_outputs, no_tmp_left),
        ),  # fmt: skip
        # --- concurrency and left-overs
        Case(
            "second run while one runs",
            "concurrency",
            1,
            PRETRAIN,
            lambda p: _concurrent(p),
            check=lambda p: _stop_first(p),
        ),  # fmt: skip
        Case(
            "temporary left by a killed writer",
            "concurrency",
            0,
            PRETRAIN,
            chain(lambda p: (p / RUN / ".final.999999.deadbeef.tmp").mkdir(), unfinished),
            check=no_tmp_left,
        ),  # fmt: skip
        # --- evaluate and compare: the stages after training, with a previous good evaluation to keep
        Case(
            "SIGTERM in evaluate",
            "signals",
            143,
            EVALUATE,
            chain(evaluated, params(**LONG_EVAL)),
            protect=EVALUATED,
            signal_after=(signal.SIGTERM, EVAL_STAGING),
            check=no_tmp_left,
        ),  # fmt: skip
        Case(
            "SIGINT in evaluate",
            "signals",
            130,
            EVALUATE,
            chain(evaluated, params(**LONG_EVAL)),
            protect=EVALUATED,
            signal_after=(signal.SIGINT, EVAL_STAGING),
            check=no_tmp_left,
        ),  # fmt: skip
        Case(
            "spm.model corrupt (evaluate)",
            "tokenizer",
            1,
            EVALUATE,
            chain(evaluated, write("data/tokenizer/spm.model", b"junk")),
            protect=EVALUATED,
        ),  # fmt: skip
        Case(
            "mlflow.db not a database (evaluate)",
            "tracking",
            1,
            EVALUATE,
            chain(evaluated, write("mlflow.db", b"not a database " * 200)),
            protect=EVALUATED,
        ),  # fmt: skip
        Case(
            "metrics CSV corrupt (compare)",
            "weights",
            1,
            stage("compare"),
            write("metrics/pretrain/t5-0-train.csv", b"step,tokens,loss\n4,100,5.1\xff\x00\n8,2"),
        ),  # fmt: skip
        Case(
            "finetune without pretrained model",
            "data",
            1,
            FINETUNE,
            remove(f"{RUN}/final"),
            protect=(f"{FT}/final/model.safetensors",),
        ),  # fmt: skip
    ]
    if mount_ok:
        out += [
            Case(
                "read-only metrics folder",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs("metrics/pretrain", "1m", readonly=True)),
            ),  # fmt: skip
            Case(
                "full disk for the metrics",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs("metrics/pretrain", "256k", fill=True)),
            ),  # fmt: skip
            Case(
                "read-only artifacts folder",
                "disk",
                1,
                PRETRAIN,
                chain(unfinished, mount_tmpfs(RUN, "64m", readonly=True)),
            ),  # fmt: skip
        ]
    return out


def _corrupt_token_store(p: Path) -> None:
    files = sorted(f for f in (p / "data/tokenized").rglob("*") if f.is_file() and f.suffix != ".json")
    target = max(files, key=lambda f: f.stat().st_size)
    target.write_bytes(target.read_bytes()[:7])
    for meta in (p / "data/tokenized").rglob("*.json"):
        meta.write_text(meta.read_text()[:-5])


def _env(project: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def _killed_run(p: Path, cmd: list[str], ckpt: str) -> None:
    """Start `cmd`, SIGKILL it once its first checkpoint exists (the case then re-runs it)."""
    (p / ckpt).unlink(missing_ok=True)
    (p / RUN / "checkpoints" / "run.json").unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=p, env=_env(p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (p / ckpt).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()


_FIRST: dict[Path, subprocess.Popen] = {}


def _concurrent(p: Path) -> None:
    """Start a first run and wait until it trains; the case's own run is then a second run of the same stage."""
    edit_params(p, **{"pretrain.max_steps": 5000})  # still training when the second run gets to the lock
    ckpt = p / RUN / "checkpoints" / "last.ckpt"
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
        if case.signal_after is not None and case.signal_after[1] and not _is_pattern(case.signal_after[1]):
            (project / case.signal_after[1]).unlink(missing_ok=True)
        proc = subprocess.Popen(
            case.command,
            cwd=project,
            env=_env(project, case.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if case.signal_after is not None:
            signum, wait_for = case.signal_after
            deadline = time.monotonic() + 300
            if wait_for:
                while not _present(project, wait_for) and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            else:
                time.sleep(3.0)  # still importing / loading data
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=900)
        unmount_all(project)
        traceback = "Traceback (most recent call last)" in stderr + stdout
        if case.expected == 0:
            intact = True
        else:
            after = {rel: digest(project / rel) for rel in case.protect}
            intact = after == before
        problem = case.check(project)
        if case.expected not in (0, 130, 143) and problem is None and proc.returncode == case.expected:
            problem = None if _said_something(stderr) else "no message on stderr"
        if os.environ.get("FAULTS_VERBOSE") or (proc.returncode != case.expected or traceback):
            (work / f"{project.name}.log").write_text(stdout + "\n----- stderr -----\n" + stderr)
        # killed by a signal before Python could handle it: report what a shell (and DVC) sees, 128 + signal
        code = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
        return Result(case, code, traceback, intact, problem, time.monotonic() - start)
    finally:
        unmount_all(project)


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
