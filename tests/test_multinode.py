"""Two nodes on one machine (tests/netns.py: network namespaces, own address and hostname each, a veth pair, the
shared filesystem): the real `pretrain` stage across them, one process per node, gloo on CPUs.

- torchrun: DDP and DeepSpeed ZeRO-3 across the two nodes end at the model a single-node 2-process (DDP) run of
  the same global batch ends at (fp32 reduction order aside); global rank 0 alone writes the outputs and the one
  MLflow run; node b runs the command node a's stage prints, as printed, by a shell in another directory.
- A node that dies ends the job: frozen (every process stopped, its link down) or killed, the survivor exits
  non-zero with one message naming the lost rank and node, and the MLflow run is FAILED; after the frozen one,
  `dvc repro` (and the printed command on node b) resumes from the last checkpoint to the weights of the
  uninterrupted run. SIGTERM ends a survivor blocked on a frozen node.
- The cluster's edges: a rendezvous host or a node hostname that does not resolve, a rendezvous endpoint nobody
  answers at: one message each, no traceback.
- SLURM across them (tests/slurm_nodes.py): `launcher.kind: slurm`, `nnodes: 2`, and a `scancel --signal=USR1`
  requeue that resumes to the uninterrupted run's weights.

The tests share the two nodes, the single-node run and one uninterrupted two-node run (module fixtures). Each run
is tiny (12 steps of a one-layer T5), with a 1 s heartbeat and a 10 s timeout where a node dies. Slow. Skipped,
saying why, where namespaces cannot be made (not root, no iproute2) or SLURM cannot be installed; `.ci/run` sets
`REQUIRE_MULTINODE=1`, and there they fail with the reason instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

import models
from tests.netns import Node, netns_unavailable, two_nodes
from tests.train_project import ROOT, make_project

pytestmark = pytest.mark.slow

PROJECT_FILES = ("pipeline", "models", "dvc.yaml", ".dvcignore", ".gitignore")
RUN = "artifacts/pretrain/t5/0"
CKPT = "checkpoints/pretrain/t5/0"  # resumable state, outside artifacts/ (not a DVC output)
STAGE = [sys.executable, "-m", "pipeline.pretrain", "--model", "t5", "--seed", "0"]
REPRO = [sys.executable, "-m", "dvc", "repro", "--single-item", "pretrain@t5-0"]
PORT = 29517
TRAIN = {
    "pretrain.max_steps": 12,
    "pretrain.checkpoint_every_n_steps": 2,
    "pretrain.val_every_n_steps": 6,
    "pretrain.log_every_n_steps": 2,
    "trainer.threads": 1,
    "mlflow.log_models": False,
}
ZERO3 = {"trainer.strategy": "deepspeed", "deepspeed.stage": 3, "deepspeed.param_persistence_threshold": 1000}
FAST_HEARTBEAT = {"launcher.heartbeat_interval_s": 1.0, "launcher.heartbeat_timeout_s": 10.0}


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is None:
        return
    if os.environ.get("REQUIRE_MULTINODE") == "1":
        pytest.fail(f"REQUIRE_MULTINODE=1 but two nodes cannot be made here: {reason}", pytrace=False)
    pytest.skip(f"two nodes cannot be made here: {reason}")


def test_without_namespaces_ci_fails_and_elsewhere_skips(monkeypatch):
    """CI (`REQUIRE_MULTINODE=1`, set by .ci/run) must not skip the multi-node tests silently; elsewhere they skip."""
    monkeypatch.setattr(sys.modules[__name__], "netns_unavailable", lambda: "no iproute2")
    monkeypatch.delenv("REQUIRE_MULTINODE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="two nodes cannot be made here: no iproute2"):
        require_netns()
    monkeypatch.setenv("REQUIRE_MULTINODE", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_MULTINODE=1 but two nodes cannot be made here"):
        require_netns()
    assert "export REQUIRE_MULTINODE=1" in (ROOT / ".ci" / "run").read_text()


def test_a_killed_harness_leaves_nothing_behind_the_next_one_does_not_remove(tmp_path):
    """A test process killed with its two nodes up: the next harness removes its namespaces, the processes in them
    (a munged or slurmd left there), its links, hosts files and scratch, and leaves a live harness's alone."""
    require_netns()
    from tests.netns import NETNS_ETC, namespace_pids, remove_leftovers

    script = (
        "import os, pathlib, subprocess, sys, tempfile, time\n"
        "from tests.netns import PREFIX, two_nodes\n"
        "with two_nodes() as (a, b):\n"
        "    b.popen(['sleep', '600'])\n"
        "    while not b.pids():\n"  # in node b's namespace once `ip netns exec` has entered it
        "        time.sleep(0.05)\n"
        "    pathlib.Path(tempfile.gettempdir(), f'{PREFIX}-{os.getpid()}-scratch').mkdir()\n"
        "    print(a.name, b.name, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    survivor = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        names = victim.stdout.readline().split()
        alive = survivor.stdout.readline().split()
        assert len(names) == 2 and len(alive) == 2 and namespace_pids(names[1])  # the sleep runs on node b
        victim.kill()
        victim.wait()
        removed = remove_leftovers()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for name in names:
            assert name in removed and name not in listed and not (NETNS_ETC / name).exists()
        assert not list(Path(tempfile.gettempdir()).glob(f"t5rmn-{victim.pid}-*"))
        assert all(name in listed for name in alive)  # a harness whose process lives is left alone
    finally:
        for proc in (victim, survivor):
            proc.kill()
            proc.wait()
        remove_leftovers()


@pytest.fixture(scope="module")
def nodes():
    require_netns()
    with two_nodes() as pair:
        yield pair


def environment() -> dict[str, str]:
    """Both nodes' environment: this one, without PYTHONPATH (the stage imports the project's own code)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    return env | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def project(root: Path, overrides: dict, a: Node | None = None, dvc: bool = False) -> Path:
    """A project with the pipeline's code, tiny data and params: two nodes (rendezvous on node a) when `a` is
    given, else one node with two Lightning-started processes; a git + DVC repository when `dvc`."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)
    if a is not None:
        layout = {"launcher.kind": "torchrun", "launcher.nnodes": 2, "trainer.num_nodes": 2,
                  "launcher.rdzv_endpoint": f"{a.name}:{PORT}"}  # fmt: skip
    else:
        layout = {"trainer.devices": 2}
    make_project(root, TRAIN | layout | overrides)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"] = {"t5": params["models"]["t5"]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if dvc:
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            subprocess.run(cmd, cwd=root, env=environment(), check=True, capture_output=True)
    return root


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, limit_s: float = 300) -> re.Match:
    """The first match of `pattern` in the growing file `path` (fails when `proc` ends first)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text()) if path.exists() else None
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{path.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {limit_s} s:\n{path.read_text()[-4000:]}")


class TwoNodeRun:
    """The stage started on node a (`argv`, default the stage command) and, on node b, the command node a printed
    for the other nodes, run as printed by a shell in another directory."""

    def __init__(self, a: Node, b: Node, root: Path, argv: list[str] | None = None, tag: str = ""):
        self.root, self.env = root, environment()
        self.logs = (root / f"node-a{tag}.log", root / f"node-b{tag}.log")
        self.a = a.popen(argv or STAGE, cwd=root, env=self.env, stdout=self.logs[0].open("w"), stderr=subprocess.STDOUT)
        self.printed = wait_for(self.logs[0], r"other 1 node\(s\), with the same environment, run: (.*)\n", self.a)[1]
        self.b = b.popen(["bash", "-c", self.printed], cwd="/", env=self.env, stdout=self.logs[1].open("w"),
                         stderr=subprocess.STDOUT)  # fmt: skip

    def wait(self, limit_s: float = 600) -> tuple[int, int]:
        deadline = time.monotonic() + limit_s
        codes = []
        for proc in (self.a, self.b):
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes[0], codes[1]

    def log(self, node: int) -> str:
        return self.logs[node].read_text()


def mlflow_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if r.data.tags.get("stage") != "pipeline"]  # stage runs, not the execution's parent


def weights(root: Path) -> dict[str, torch.Tensor]:
    _, model = models.load_pretrained(root / RUN / "final")
    return model.state_dict()


def metrics(root: Path) -> dict:
    return json.loads((root / "metrics/pretrain/t5-0.json").read_text())


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]


# ------------------------------------------------------------------------------------------- same model


@pytest.fixture(scope="module")
def uninterrupted(nodes, tmp_path_factory) -> TwoNodeRun:
    """A two-node DDP run, not interrupted: compared with one node, and the weights a resumed run must end at."""
    a, b = nodes
    root = project(tmp_path_factory.mktemp("uninterrupted") / "p", FAST_HEARTBEAT, a)
    run = TwoNodeRun(a, b, root)
    assert run.wait() == (0, 0), run.log(0)[-3000:] + run.log(1)[-3000:]
    return run


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> Path:
    """The single-node run both strategies across two nodes are compared with: DDP, two processes on one node
    (Lightning starts the second), the same global batch. (ZeRO-3 and DDP on one node agree to the 7th digit.)"""
    root = project(tmp_path_factory.mktemp("single") / "p", {"trainer.strategy": "ddp"})
    done = subprocess.run(STAGE, cwd=root, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_nodes_train_the_model_one_node_does(tmp_path, nodes, uninterrupted, single_node, strategy):
    a, b = nodes
    single = single_node
    if strategy == "ddp":  # the DDP run on two nodes: the one the lost-node tests compare with (the heartbeat's
        run = uninterrupted  # settings change when a loss is noticed, not what is computed)
    else:
        run = TwoNodeRun(a, b, project(tmp_path / "two", ZERO3, a))
        assert run.wait() == (0, 0), run.log(0)[-3000:] + run.log(1)[-3000:]
    two = run.root
    assert f"cd {two} && " in run.printed and "-m pipeline.pretrain --model t5 --seed 0" in run.printed
    # global rank 0 on node a (c10d orders nodes by hostname) wrote the outputs and the one MLflow run
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in run.log(0) and "GLOBAL_RANK: 1, MEMBER: 2/2" in run.log(1)
    assert "MLflow run" in run.log(0) and "MLflow run" not in run.log(1)
    (tracked,) = mlflow_runs(two)
    assert tracked.info.status == "FINISHED" and tracked.data.tags["stage"] == "pretrain"
    if strategy == "zero3":  # really sharded over the two nodes: one model-states file per rank
        shards = sorted(p.name for p in (two / CKPT / "last.ckpt").glob("*/zero_pp_rank_*_model_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]

    got, want = metrics(two), metrics(single)
    print(f"{strategy}: val loss two nodes {got['val_loss']:.7f}, one node {want['val_loss']:.7f}; "
          f"train loss {got['train_loss']:.7f} / {want['train_loss']:.7f}")  # fmt: skip
    assert got["steps"] == want["steps"] == TRAIN["pretrain.max_steps"] and got["tokens"] == want["tokens"]
    for key in ("val_loss", "train_loss"):
        assert abs(got[key] - want[key]) <= 1e-3 * abs(want[key]), (key, got[key], want[key])
    for name, value in weights(single).items():  # fp32 sums in another order: close, not necessarily equal
        torch.testing.assert_close(weights(two)[name], value, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------- a node that dies


def started(a: Node, b: Node, root: Path, argv: list[str]) -> TwoNodeRun:
    """Both nodes running the stage, past its first checkpoint."""
    run = TwoNodeRun(a, b, root, argv)
    wait_for(root / "node-a.log", r"GLOBAL_RANK: 0", run.a)
    checkpoint = root / CKPT / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and run.a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists() and run.a.poll() is None, run.log(0)[-3000:]
    return run


def resume(a: Node, b: Node, root: Path, run: TwoNodeRun, uninterrupted: Path) -> None:
    """Node b back (its processes gone, its link up); `dvc repro` again, node b running the printed command: the
    run resumes from its last checkpoint and ends at the uninterrupted run's weights."""
    b.kill()
    b.thaw()
    run.b.wait(timeout=60)
    again = TwoNodeRun(a, b, root, REPRO, tag="-again")
    assert again.wait() == (0, 0), again.log(0)[-3000:] + again.log(1)[-3000:]
    assert "resuming from checkpoints/pretrain/t5/0/last.ckpt" in again.log(0)
    (tracked,) = mlflow_runs(root)  # the same MLflow run, finished this time
    assert tracked.info.status == "FINISHED"
    want = weights(uninterrupted)
    for name, value in weights(root).items():
        assert torch.equal(value, want[name]), f"{name} differs from the uninterrupted run's"


@pytest.mark.parametrize("death", ["frozen", "killed"])
def test_a_lost_node_ends_the_job_and_dvc_repro_resumes(tmp_path, nodes, uninterrupted, death):
    a, b = nodes
    root = project(tmp_path / "p", FAST_HEARTBEAT, a, dvc=True)
    run = started(a, b, root, REPRO)
    lost_at = time.monotonic()
    b.freeze() if death == "frozen" else b.kill()
    code = run.a.wait(timeout=120)
    print(f"{death} node: the survivor exited {code} after {time.monotonic() - lost_at:.1f} s "
          f"(heartbeat every {FAST_HEARTBEAT['launcher.heartbeat_interval_s']:g} s, "
          f"timeout {FAST_HEARTBEAT['launcher.heartbeat_timeout_s']:g} s)")  # fmt: skip
    assert code != 0
    log = run.log(0)
    why = "no heartbeat for" if death == "frozen" else "it stopped answering"
    message = f"error: lost global rank 1 (node {b.name}): {why}"
    assert log.count(message) == 1, log[-4000:]
    assert "re-run the stage on every node" in log
    assert_no_traceback(log)
    (tracked,) = mlflow_runs(root)
    assert tracked.info.status == "FAILED"
    assert not (root / RUN / "final").exists()
    if death == "frozen":  # the harder case to come back from; the killed one ends the same way
        resume(a, b, root, run, uninterrupted.root)
    else:
        run.b.wait(timeout=60)


def test_sigterm_ends_a_survivor_blocked_on_a_frozen_node(tmp_path, nodes):
    a, b = nodes
    slow = {"launcher.heartbeat_interval_s": 1.0, "launcher.heartbeat_timeout_s": 300.0}  # the loss goes unnoticed
    root = project(tmp_path / "p", slow, a)
    run = started(a, b, root, STAGE)
    b.freeze()
    time.sleep(3)  # node a's worker is now blocked in a collective with the frozen node
    assert run.a.poll() is None
    run.a.send_signal(signal.SIGTERM)
    code = run.a.wait(timeout=120)
    b.kill()
    b.thaw()
    log = run.log(0)
    assert code == 143, log[-4000:]
    assert "interrupted by SIGTERM" in log
    assert_no_traceback(log)
    (tracked,) = mlflow_runs(root)
    assert tracked.info.status == "KILLED"


# ------------------------------------------------------------------------------------- the cluster's edges


def test_names_that_do_not_resolve_and_an_endpoint_nobody_answers(tmp_path, nodes):
    a, b = nodes
    # a short timeout: it is also how long node b's agent waits for the endpoint before it gives up
    root = project(tmp_path / "p", {"launcher.heartbeat_interval_s": 1.0, "launcher.heartbeat_timeout_s": 3.0}, a)
    endpoint = f"launcher.rdzv_endpoint {a.name}:{PORT}"

    def stage(node: Node) -> str:
        done = node.run(STAGE, cwd=root, env=environment(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        assert_no_traceback(done.stderr)
        (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        return error

    try:
        b.set_hosts({b.name: b.addr})  # node b does not know node a's name
        assert stage(b).startswith(f"error: {endpoint}: the host {a.name!r} does not resolve on this node")
        a.set_hosts({b.name: b.addr})  # node a does not know its own name
        assert stage(a).startswith(f"error: this node's hostname {a.name!r} does not resolve")
    finally:
        for node in (a, b):
            node.set_hosts({n.name: n.addr for n in (a, b)})
    # node b alone: nothing answers at node a's endpoint (heartbeat_timeout_s bounds the wait)
    assert stage(b).startswith(f"error: cannot reach the rendezvous at {endpoint} from this node ({b.name}")


# ------------------------------------------------------------------------------------------ SLURM across them


def test_slurm_across_two_nodes_requeues_on_sigusr1_and_resumes_exactly(tmp_path, nodes, uninterrupted):
    """slurmctld + a slurmd per node (tests/slurm_nodes.py): `dvc repro` on node a submits the stage with
    `launcher.kind: slurm`, `nnodes: 2`; `scancel --signal=USR1` makes it checkpoint, requeue itself and resume, to
    the weights of the uninterrupted two-node run."""
    from tests.slurm_nodes import slurm_on, slurm_unavailable

    reason = slurm_unavailable()
    if reason is not None:
        if os.environ.get("REQUIRE_MULTINODE") == "1":
            pytest.fail(f"REQUIRE_MULTINODE=1 but SLURM cannot be installed here: {reason}", pytrace=False)
        pytest.skip(f"SLURM cannot be installed here: {reason}")
    a, b = nodes
    on_slurm = {
        "launcher.kind": "slurm",
        "launcher.nnodes": 2,
        "trainer.num_nodes": 2,
        "trainer.devices": 1,
        "launcher.slurm.gpus_per_node": 0,  # a CPU partition: launcher.nproc_per_node (1) task per node
        "launcher.slurm.cpus_per_task": 1,
        "launcher.slurm.time": "00:20:00",
        "launcher.slurm.poll_interval_s": 1.0,
        "launcher.slurm.setup": ["export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu"],
    }
    root = project(tmp_path / "p", FAST_HEARTBEAT | on_slurm, dvc=True)
    with slurm_on(a, b, tmp_path / "slurm") as env:
        log = root / "node-a.log"
        proc = a.popen(REPRO, cwd=root, env=env | {"PYTHONPATH": ""}, stdout=log.open("w"), stderr=subprocess.STDOUT)
        job = wait_for(log, r"submitted SLURM job (\d+)", proc)[1]
        checkpoint = root / CKPT / "last.ckpt"
        deadline = time.monotonic() + 600
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), log.read_text()[-4000:]
        signalled = a.run(["scancel", "--signal=USR1", job], env=env, capture_output=True, text=True, timeout=60)
        assert signalled.returncode == 0, signalled.stderr
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
        job_log = (root / "logs/slurm/pretrain/t5/0" / f"slurm-{job}.out").read_text()
        restarts = a.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    assert "scontrol requeue" in job_log and "resuming from" in job_log, job_log[-4000:]
    assert "Restarts=1" in restarts and "NumNodes=2" in restarts, restarts
    assert re.search(rf"NodeList={a.name[:-1]}\[a-b\]|NodeList={a.name},{b.name}", restarts), restarts
    (tracked,) = mlflow_runs(root)
    assert tracked.info.status == "FINISHED"
    want = weights(uninterrupted.root)
    for name, value in weights(root).items():
        assert torch.equal(value, want[name]), f"{name} differs from the uninterrupted two-node run's"
