"""A real two-node SLURM on the two namespace nodes of tests/netns.py: slurmctld, one slurmd and a munged of its own
on node a, one slurmd on node b, all from Debian's slurm-wlm and munge, in a directory of their own.

    with slurm_on(a, b, directory) as env:      # env: this environment plus SLURM_CONF for the clients
        a.run(["sbatch", ...], env=env)           # clients reach slurmctld from node a (its address is node a's)

The cluster is apart from the single-node SLURM of scripts/slurm_up.sh (other config, state, ports' namespace,
munge socket and key), so both can run at once; every daemon is started in the foreground and stopped on exit.
Needs the packages (scripts/slurm_up.sh installs them) and root; `slurm_unavailable()` says why not, when not.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.netns import PREFIX, Node

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("slurmctld", "slurmd", "munged", "munge", "unmunge", "sbatch", "srun", "squeue", "scontrol", "sinfo")


def slurm_unavailable() -> str | None:
    """None when the SLURM and munge programs are here (installed by scripts/slurm_up.sh when missing)."""
    if all(shutil.which(p) or Path(f"/usr/sbin/{p}").exists() for p in DAEMONS):
        return None
    script = ROOT / "scripts" / "slurm_up.sh"
    try:
        proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{script.name} did not finish: {exc}"
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip()[-500:] or f"{script.name} exited {proc.returncode}"
    return None


def _conf(directory: Path, munge_dir: Path, spool: Path, a: Node, b: Node) -> str:
    """slurm.conf: scripts/slurm_up.sh's, for two nodes by address, state and logs in `directory`; cred_expire is
    also how long a requeued job waits before it starts again (SLURM's default 120 s)."""
    nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={os.cpu_count()} RealMemory=1000" for n in (a, b))
    return f"""# written by tests/slurm_nodes.py: two nodes in network namespaces
ClusterName=t5rmn{os.getpid()}
SlurmctldHost={a.name}({a.addr})
AuthType=auth/munge
AuthInfo=socket={munge_dir}/munge.socket,cred_expire=15
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={directory}/slurmctld
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd-%n.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{nodes}
PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def slurm_on(a: Node, b: Node, directory: Path, startup_s: float = 120) -> Iterator[dict[str, str]]:
    """slurmctld + slurmd on node a, slurmd on node b, munged on this machine; yields the clients' environment."""
    directory.mkdir(parents=True, exist_ok=True)
    # munged runs as its own user: its directory sits where that user can reach it (test directories are private)
    munge_dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{os.getpid()}-munge-"))
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    user = next((p for p in pwd.getpwall() if p.pw_name == "munge"), None)
    if user is not None:
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
    # slurmstepd makes Unix sockets in the spool directory, whose paths must fit in 108 bytes: a test directory's
    # path is too long for them (the job launch fails and SLURM requeues it forever)
    spool = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-spool-"))
    conf = directory / "slurm.conf"
    conf.write_text(_conf(directory, munge_dir, spool, a, b))
    # slurmd initialises a cgroup plugin even when nothing uses it (proctrack/linuxproc, task/none): v1, named, is
    # only read where it is used; autodetection fails in a namespace's fresh /sys, which has no /sys/fs/cgroup
    (directory / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
    for node in (a, b):
        (spool / node.name).mkdir(exist_ok=True)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    sock = munge_dir / "munge.socket"
    munged = ["/usr/sbin/munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
              f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
              f"--seed-file={munge_dir}/munged.seed"]  # fmt: skip
    if user is not None:
        munged = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *munged]
    procs: list[subprocess.Popen] = []
    try:
        # on node a, like the other daemons: whatever a killed test leaves running goes with the namespace
        procs.append(a.popen(munged, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                log = munge_dir / "munged.log"
                raise RuntimeError(f"munged did not start: {log.read_text()[-2000:] if log.exists() else 'no log'}")
            time.sleep(0.1)
        log = (directory / "daemons.log").open("a")
        procs.append(a.popen(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log,
                             stderr=subprocess.STDOUT))  # fmt: skip
        for node in (a, b):
            procs.append(node.popen(["/usr/sbin/slurmd", "-D", "-N", node.name, "-f", str(conf)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + startup_s
        while True:
            info = a.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=30)
            states = dict(line.split() for line in info.stdout.splitlines() if line.strip())
            if len(states) == 2 and all(s.startswith(("idle", "mix", "alloc")) for s in states.values()):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = "".join(p.read_text()[-1500:] for p in sorted(directory.glob("*.log")))
                raise RuntimeError(f"the two-node SLURM did not come up ({info.stdout.strip()}): {logs}")
            time.sleep(1)
        yield env
    finally:
        _stop(procs)
        shutil.rmtree(munge_dir, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
