"""Where training processes come from: Lightning (`local`), torchrun, or a SLURM job that the stage waits for.

A training stage calls `launch_if_needed(cfg, stage, variant, argv, seed=seed)` first thing:

- `launcher.kind: local`, or already inside a launched process: returns None and the stage trains in-process
  (Lightning starts `trainer.devices - 1` more processes itself when it needs them);
- `torchrun`: runs `torchrun --nnodes N --nproc-per-node P --rdzv-endpoint host:port -m pipeline.<stage> <argv>`
  (as `python -m torch.distributed.run`, the same entry point, from this interpreter) and returns its exit code;
- `slurm`: writes an sbatch script into `artifacts/<stage>/<variant>/<seed>/slurm/`, submits it with
  `sbatch --parsable`, polls `sacct` (or `squeue`) until the job ends, streams the job's log meanwhile, and
  returns 0 only if the job COMPLETED. So `dvc repro` on a login node works unchanged: DVC sees an ordinary
  command that ran to completion.

We never start worker processes ourselves: torchrun, SLURM's `srun` or Lightning do. Inside them,
`pipeline.strategy.launched_externally()` recognises the launch, and Lightning's torchelastic or SLURM cluster
environment supplies ranks. The sbatch script asks SLURM for `SIGUSR1` 90 s before the time limit and allows
requeueing: Lightning's `SLURMEnvironment` (auto-requeue) then saves a checkpoint and requeues the job, which
resumes from it; the waiting stage simply keeps polling through the requeue.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipeline.common import StageError, atomic_output, repo_root
from pipeline.config import Config
from pipeline.paths import RunPaths, run_label
from pipeline.strategy import launched_externally

# SLURM job states after which the job will not run again (https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES).
# PREEMPTED and NODE_FAIL jobs submitted with --requeue go back to PENDING instead, so polling continues then.
TERMINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}
REQUEUE_SIGNAL = "SIGUSR1@90"  # Lightning's SLURMEnvironment listens for SIGUSR1; 90 s to save a checkpoint
LAUNCHER_ENV = "PIPELINE_LAUNCHER"  # exported by the sbatch script so the srun tasks know they were launched
MAX_UNKNOWN_POLLS = 10  # give up when neither sacct nor squeue nor the exit-code file knows the job this often


def launch_if_needed(cfg: Config, stage: str, variant: str, argv: list[str], seed: int | None = None) -> int | None:
    """Start the stage under the configured launcher and return its exit code, or None to train in-process."""
    kind = cfg.launcher.kind
    if kind == "local" or launched_externally() is not None:
        return None
    if kind == "torchrun":
        return run_torchrun(cfg, stage, argv)
    if kind == "slurm":
        return submit_and_wait(cfg, stage, variant, argv, seed)
    raise StageError(f"launcher.kind: unknown launcher {kind!r}")


# ------------------------------------------------------------------------------------------------ torchrun


def torchrun_command(cfg: Config, stage: str, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `python -m pipeline.<stage> <argv>` in every worker process."""
    la = cfg.launcher
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the `torchrun` console script runs
        "--nnodes",
        str(la.nnodes),
        "--nproc-per-node",
        str(la.nproc_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        la.rdzv_endpoint,
        "-m",
        f"pipeline.{stage}",
        *argv,
    ]


def run_torchrun(cfg: Config, stage: str, argv: list[str]) -> int:
    """Run the stage under torchrun from the repo root; returns torchrun's exit code.

    With `launcher.nnodes > 1` the same command must be started on every other node (printed here).
    """
    cmd = torchrun_command(cfg, stage, argv)
    print(f"launching: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if cfg.launcher.nnodes > 1:
        print(f"run the same command on the other {cfg.launcher.nnodes - 1} node(s)", file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=repo_root()).returncode


# --------------------------------------------------------------------------------------------------- SLURM


def slurm_dir(stage: str, variant: str, root: Path | None = None, seed: int | None = None) -> Path:
    """Where the sbatch script and the job logs go: `artifacts/<stage>/<variant>/<seed>/slurm/`."""
    root = root or repo_root()
    if seed is None:
        return root / "artifacts" / stage / variant / "slurm"
    return RunPaths(root, stage, variant, seed).out / "slurm"


def _job_name(stage: str, variant: str, seed: int | None) -> str:
    return f"{stage}-{variant if seed is None else run_label(variant, seed)}"


def sbatch_script(
    cfg: Config, stage: str, variant: str, argv: list[str], root: Path | None = None, seed: int | None = None
) -> str:
    """The sbatch script for one stage run: one task per GPU on every node, `srun` starts them all."""
    root = root or repo_root()
    la, s = cfg.launcher, cfg.launcher.slurm
    logs = slurm_dir(stage, variant, root, seed)
    options = [
        f"--job-name={_job_name(stage, variant, seed)}",
        f"--nodes={la.nnodes}",
        # Lightning's SLURMEnvironment: one task per device (per GPU, or launcher.nproc_per_node CPU tasks)
        f"--ntasks-per-node={s.gpus_per_node or la.nproc_per_node}",
        *([f"--gres=gpu:{s.gpus_per_node}"] if s.gpus_per_node else []),
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={s.time}",
    ]
    for name in ("partition", "account", "qos", "mem"):
        if getattr(s, name):
            options.append(f"--{name}={getattr(s, name)}")
    options += [
        f"--output={logs}/slurm-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        f"--signal={REQUEUE_SIGNAL}",
        "--requeue",
    ]
    options += [opt if opt.startswith("-") else f"--{opt}" for opt in s.extra_sbatch]
    command = shlex.join(["srun", "--kill-on-bad-exit=1", "python", "-m", f"pipeline.{stage}", *argv])
    lines = [
        "#!/bin/bash",
        f"# {_job_name(stage, variant, seed)}, written by pipeline/launch.py (launcher.kind: slurm). "
        "Resubmitted by `dvc repro`.",
        *(f"#SBATCH {opt}" for opt in options),
        "",
        "set -eo pipefail",
        f"cd {shlex.quote(str(root))}",
        f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH  # this interpreter; setup may change it",
        "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun does not inherit --cpus-per-task since SLURM 22.05",
        *s.setup,
        f"export {LAUNCHER_ENV}=slurm  # the tasks train instead of submitting again",
        "status=0",
        f"{command} || status=$?",
        f'echo "$status" > {shlex.quote(str(logs))}/exitcode-$SLURM_JOB_ID',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    """Run a SLURM client command; None when it is missing or fails (the caller falls back)."""
    if shutil.which(cmd[0]) is None:
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc if proc.returncode == 0 else None


def job_state(job_id: str, logs: Path) -> tuple[str | None, str]:
    """`(state, exit code)` of a job: from `sacct`, else `squeue` (while queued/running), else the script's
    exit-code file. `(None, "")` when none of them knows the job (yet)."""
    proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"])
    if proc is not None:
        line = next((ln for ln in proc.stdout.splitlines() if ln.strip()), "")
        if line:
            state, _, exit_code = line.partition("|")
            return state.split()[0], exit_code.strip()  # "CANCELLED by 1234" -> "CANCELLED"
    proc = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"])  # finished jobs too (MinJobAge)
    if proc is not None and proc.stdout.strip():
        return proc.stdout.split()[0], ""
    exit_file = logs / f"exitcode-{job_id}"
    if exit_file.is_file():
        code = exit_file.read_text().strip()
        return ("COMPLETED" if code == "0" else "FAILED"), code
    return None, ""


def submit(script: Path) -> str:
    """`sbatch --parsable script`; returns the job id."""
    if shutil.which("sbatch") is None:
        raise StageError(
            "launcher.kind is 'slurm' but `sbatch` is not on PATH: run on a SLURM login node, "
            "or set launcher.kind to 'local' or 'torchrun'"
        )
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.isdigit():
        raise StageError(f"sbatch printed {proc.stdout.strip()!r}, expected a job id")
    return job_id


def _stream(log: Path, offset: int, out: TextIO) -> int:
    """Copy what was appended to `log` since `offset` to `out`; returns the new offset."""
    if not log.is_file():
        return offset
    with log.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        out.write(chunk.decode("utf-8", errors="replace"))
        out.flush()
    return offset + len(chunk)


def wait_for_job(
    job_id: str,
    logs: Path,
    poll_interval_s: float,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str, str]:
    """Poll until the job reaches a terminal state, streaming its log to `out` (stdout); returns
    `(state, exit code)`."""
    out = out or sys.stdout
    log = logs / f"slurm-{job_id}.out"
    offset, unknown, last = 0, 0, None
    while True:
        state, exit_code = job_state(job_id, logs)
        offset = _stream(log, offset, out)
        if state is None:
            unknown += 1
            if unknown >= MAX_UNKNOWN_POLLS:
                raise StageError(f"SLURM job {job_id}: neither sacct nor squeue knows it; log: {log}")
        else:
            unknown = 0
            if state != last:
                print(f"SLURM job {job_id}: {state}", file=sys.stderr, flush=True)
                last = state
            if state in TERMINAL_STATES:
                _stream(log, offset, out)
                return state, exit_code
        sleep(poll_interval_s)


def submit_and_wait(cfg: Config, stage: str, variant: str, argv: list[str], seed: int | None = None) -> int:
    """Write the sbatch script, submit it, wait for the job; 0 if it COMPLETED, else its exit code (or 1)."""
    logs = slurm_dir(stage, variant, seed=seed)
    logs.mkdir(parents=True, exist_ok=True)
    script = logs / f"{_job_name(stage, variant, seed)}.sbatch"
    with atomic_output(script) as tmp:
        tmp.write_text(sbatch_script(cfg, stage, variant, argv, seed=seed), encoding="utf-8")
    job_id = submit(script)
    print(f"submitted SLURM job {job_id} ({script}); log: {logs}/slurm-{job_id}.out", file=sys.stderr, flush=True)
    try:
        state, exit_code = wait_for_job(job_id, logs, cfg.launcher.slurm.poll_interval_s)
    except KeyboardInterrupt:  # the user stopped `dvc repro`: do not leave the job running behind their back
        subprocess.run(["scancel", job_id], capture_output=True)
        print(f"cancelled SLURM job {job_id}", file=sys.stderr)
        raise
    if state == "COMPLETED":
        return 0
    log = f"{logs}/slurm-{job_id}.out"
    print(f"error: SLURM job {job_id} ended {state} (exit {exit_code or '?'}); log: {log}", file=sys.stderr)
    code = exit_code.split(":")[0]
    return int(code) if code.isdigit() and int(code) > 0 else 1
