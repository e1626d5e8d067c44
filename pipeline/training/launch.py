"""Where training processes come from: Lightning (`local`), torchrun, or a SLURM job that the stage waits for.

A training stage calls `launch_if_needed(cfg, stage, variant, argv, seed=seed)` first thing:

- `launcher.kind: local`, or already inside a launched process: returns None and the stage trains in-process
  (Lightning starts `trainer.devices - 1` more processes itself when it needs them);
- `torchrun`: runs torchrun's agent, `torchrun --nnodes N --nproc-per-node P --rdzv-endpoint host:port -m
  pipeline.<stage> <argv>`, in this process (torch's own `torch.distributed.run`, as the `torchrun` command runs it)
  and returns its exit code. With several nodes it first checks that this node's hostname and the rendezvous host
  resolve, prints the command to start on the other nodes (this stage's own), and turns the agent's failures (a
  rendezvous endpoint out of reach, nodes that did not join, a failed worker) into one message each;
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

import ipaddress
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipeline.common import StageError, StageInterrupted, atomic_output, note_signal, repo_root
from pipeline.config import Config
from pipeline.config.paths import run_label
from pipeline.training.strategy import launched_externally

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
        # how long the agent waits on the rendezvous store (reaching it, then each request): the heartbeat's timeout,
        # so an unreachable endpoint or the store's lost node ends the agent as soon as it ends the workers
        "--rdzv-conf",
        f"read_timeout={math.ceil(la.heartbeat_timeout_s)}",
        "-m",
        f"pipeline.{stage}",
        *argv,
    ]


def other_node_command(stage: str, argv: list[str], root: Path | None = None) -> str:
    """The shell command that starts this stage on another node: the same stage, project and interpreter (whose
    torchrun agent then joins the rendezvous)."""
    root = root or repo_root()
    return f"cd {shlex.quote(str(root))} && {shlex.join([sys.executable, '-m', f'pipeline.{stage}', *argv])}"


def check_node_addresses(cfg: Config, hostname: str | None = None) -> None:
    """Before a multi-node rendezvous: `StageError` unless this node's hostname resolves to an address the other
    nodes can reach (torchrun's agent and gloo advertise it) and the rendezvous endpoint's host resolves."""
    host, colon, port = cfg.launcher.rdzv_endpoint.rpartition(":")
    if not colon or host.count(":") and not host.startswith("["):  # no port (torchrun's default), or bare IPv6
        host, port = cfg.launcher.rdzv_endpoint, "29400"
    host = host.strip("[]")
    hostname = hostname or socket.gethostname()
    fix = "add it to /etc/hosts (or DNS) on every node"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError) as exc:
        raise StageError(
            f"this node's hostname {hostname!r} does not resolve ({exc.args[-1]}): the other nodes reach this one "
            f"by it; {fix}, with this node's address on the network the nodes share"
        ) from None
    try:
        endpoint = {info[4][0] for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise StageError(
            f"launcher.rdzv_endpoint {cfg.launcher.rdzv_endpoint}: the host {host!r} does not resolve on this node "
            f"({hostname}: {exc.args[-1]}); {fix}, or give its IP address"
        ) from None
    # a loopback endpoint: every "node" is on this machine, where the loopback address reaches them all
    if not _loopback(endpoint) and _loopback(addresses):
        raise StageError(
            f"this node's hostname {hostname!r} resolves to the loopback address only ({', '.join(sorted(addresses))})"
            f": the other nodes could not reach this one; map it to this node's address on the network the nodes "
            "share (in /etc/hosts or DNS)"
        )


def _loopback(addresses: set[str]) -> bool:
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def run_torchrun(cfg: Config, stage: str, argv: list[str]) -> int:
    """Run the stage under torchrun's agent, in this process, from the repo root; returns the workers' exit code.

    With `launcher.nnodes > 1` the same stage must be started on every other node (the command is printed here).
    """
    cmd = torchrun_command(cfg, stage, argv)
    print(f"launching: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if cfg.launcher.nnodes > 1:
        check_node_addresses(cfg)
        print(
            f"on each of the other {cfg.launcher.nnodes - 1} node(s), with the same environment, run: "
            f"{other_node_command(stage, argv)}",
            file=sys.stderr,
            flush=True,
        )
    return run_agent(cfg, cmd[3:])


def run_agent(cfg: Config, args: list[str]) -> int:
    """torchrun's agent on `args` (its command line) in this process; the first failed worker's exit code, or 0.

    The agent's own failure reports (a traceback per failure) are replaced by one message: a failed worker has
    printed its own error already.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )

    from pipeline.training.liveness import AGENT_NOTICE

    la = cfg.launcher
    where = f"launcher.rdzv_endpoint {la.rdzv_endpoint}"
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # its error lines repeat what the workers and this function say
    cwd = os.getcwd()
    os.chdir(repo_root())  # the workers' `-m pipeline.<stage>` resolves from the project
    fd, notice = tempfile.mkstemp(prefix="pipeline-agent-")
    os.close(fd)
    os.environ[AGENT_NOTICE] = notice  # inherited by the workers
    finished = threading.Event()
    guard = threading.Thread(target=_guard_agent, args=(Path(notice), finished, 2 * la.heartbeat_interval_s),
                             name="agent-guard", daemon=True)  # fmt: skip
    guard.start()
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal, as a shell reports it
            return 128 - failure.exitcode
        return failure.exitcode or 1
    except SignalException as exc:  # the agent stopped its workers on SIGTERM/SIGINT
        note_signal(int(exc.sigval))
        raise StageInterrupted(int(exc.sigval)) from None
    except RendezvousTimeoutError:
        raise StageError(
            f"not all {la.nnodes} nodes joined the rendezvous at {la.rdzv_endpoint} in time: start this stage on "
            f"every node (launcher.nnodes: {la.nnodes}), each with the same {where}"
        ) from None
    except RendezvousConnectionError as exc:
        inner = exc.__cause__ or exc
        raise StageError(
            f"cannot reach the rendezvous at {where} from this node ({socket.gethostname()}: "
            f"{str(inner).splitlines()[0][:160]}): start the stage on that host first (it holds the rendezvous), "
            "check the address and port, and that no firewall blocks it"
        ) from None
    except (RendezvousError, socket.gaierror) as exc:
        raise StageError(f"torchrun's rendezvous at {where} failed: {str(exc).splitlines()[0][:200]}") from None
    finally:
        finished.set()
        os.environ.pop(AGENT_NOTICE, None)
        Path(notice).unlink(missing_ok=True)
        agent_log.setLevel(level)
        os.chdir(cwd)
    return 0


def _guard_agent(notice: Path, finished: threading.Event, grace_s: float) -> None:
    """End this process when a worker's watchdog ended its worker (it wrote its exit code into `notice`) and torchrun's
    agent has not returned `grace_s` later: the agent blocks forever on a rendezvous store whose node went silent."""
    while not finished.wait(0.5):
        code = notice.read_text().strip() if notice.is_file() else ""
        if not code:
            continue
        if finished.wait(grace_s):
            return
        print(
            f"error: the torchrun job failed with exit code {code} (its workers said why, above); torchrun's agent "
            "waits on the lost rendezvous store, so this stage stops without it",
            file=sys.stderr,
            flush=True,
        )
        notice.unlink(missing_ok=True)
        os._exit(int(code) if code.isdigit() else 1)


# --------------------------------------------------------------------------------------------------- SLURM


def slurm_dir(stage: str, variant: str, root: Path | None = None, seed: int | None = None) -> Path:
    """Where the sbatch script and the job logs go: `logs/slurm/<stage>/<variant>/<seed>/`, beside the outputs, not
    among them (DVC hashes `artifacts/`; a job log there would make the stages that read it look changed)."""
    root = root or repo_root()
    base = root / "logs" / "slurm" / stage / variant
    return base if seed is None else base / str(seed)


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
        f"# {_job_name(stage, variant, seed)}, written by pipeline/training/launch.py (launcher.kind: slurm). "
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
