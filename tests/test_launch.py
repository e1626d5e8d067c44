"""Launchers: the sbatch script, the torchrun command line, and SLURM submit-and-wait.

SLURM cannot run here, so the submit-and-wait tests put stand-in `sbatch`/`sacct`/`squeue` shell scripts on PATH:
they test our code against a stand-in of an external system (the commands' documented output formats), not SLURM.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import StageError
from pipeline.config import config_from_dict
from pipeline.training.launch import launch_if_needed, sbatch_script, submit_and_wait, torchrun_command
from pipeline.training.strategy import launched_externally, process_layout

MODELS = {"t5": {"preset": "tiny"}, "reformer": {"preset": "tiny"}}
ARGV = ["--family", "t5", "--params", "params.yaml"]
ROOT = Path(__file__).resolve().parents[1]


def cluster_config(**slurm):
    return config_from_dict(
        {
            "models": MODELS,
            "trainer": {"accelerator": "gpu", "devices": 4, "num_nodes": 2, "strategy": "deepspeed"},
            "launcher": {
                "kind": "slurm",
                "nnodes": 2,
                "slurm": {"gpus_per_node": 4, "cpus_per_task": 6, "time": "12:00:00", **slurm},
            },
        }
    )


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sbatch_script_for_two_nodes_of_four_gpus(tmp_path):
    cfg = cluster_config(
        partition="gpu",
        account="proj42",
        qos="high",
        mem="256G",
        setup=["module load cuda/12.4", "source .venv/bin/activate"],
        extra_sbatch=["--constraint=a100", "exclusive"],
    )
    script = sbatch_script(cfg, "pretrain", "t5", ARGV, root=tmp_path)
    options = sbatch_options(script)
    for expected in (
        "--job-name=pretrain-t5",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gres=gpu:4",
        "--cpus-per-task=6",
        "--time=12:00:00",
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--mem=256G",
        "--signal=SIGUSR1@90",
        "--requeue",
        "--constraint=a100",
        "--exclusive",
        f"--output={tmp_path}/logs/slurm/pretrain/t5/slurm-%j.out",
    ):
        assert expected in options, f"{expected} missing from {options}"
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert all(not line.startswith("#SBATCH") for line in lines[lines.index("") :]), "options after commands"

    srun = next(line for line in lines if line.startswith("srun "))
    command = shlex.split(srun.split("||")[0])
    assert command[command.index("python") :] == ["python", "-m", "pipeline.pretrain", *ARGV]
    # setup lines and the launcher marker come before srun, in order
    order = [lines.index(x) for x in ("module load cuda/12.4", "source .venv/bin/activate")]
    marker = next(i for i, line in enumerate(lines) if line.startswith("export PIPELINE_LAUNCHER=slurm"))
    assert order == sorted(order) and order[-1] < marker < lines.index(srun)
    assert f"cd {tmp_path}" in lines

    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # valid shell syntax


def test_sbatch_script_leaves_out_unset_options(tmp_path):
    options = sbatch_options(sbatch_script(cluster_config(), "finetune", "reformer", [], root=tmp_path))
    names = {opt.split("=")[0] for opt in options}
    assert not names & {"--partition", "--account", "--qos", "--mem"}
    assert "--job-name=finetune-reformer" in options


def test_lightning_sees_the_slurm_layout(monkeypatch):
    """Inside the job, devices/num_nodes come from SLURM and pass Lightning's own SLURM environment check."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    cfg = cluster_config()
    env = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "5"}
    env |= {"SLURM_JOB_NAME": "pretrain-t5", "SLURM_JOB_ID": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    for key, value in {**env, "PIPELINE_LAUNCHER": "slurm"}.items():
        monkeypatch.setenv(key, value)
    assert launched_externally() == "slurm"
    devices, num_nodes = process_layout(cfg)
    assert (devices, num_nodes) == (4, 2)
    SLURMEnvironment().validate_settings(num_devices=devices, num_nodes=num_nodes)  # raises on a mismatch
    assert launch_if_needed(cfg, "pretrain", "t5", ARGV) is None  # the task trains instead of resubmitting


def test_torchrun_command_line():
    cfg = config_from_dict(
        {
            "models": MODELS,
            "trainer": {"devices": 2, "num_nodes": 3},
            "launcher": {"kind": "torchrun", "nproc_per_node": 2, "nnodes": 3, "rdzv_endpoint": "node0:29400"},
        }
    )
    cmd = torchrun_command(cfg, "finetune", ARGV)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    args = cmd[3:]
    assert args[args.index("--nnodes") + 1] == "3"
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert args[args.index("--rdzv-endpoint") + 1] == "node0:29400"
    assert args[args.index("-m") + 1 :] == ["pipeline.finetune", *ARGV]
    assert process_layout(cfg) == (2, 3)


def test_torchrun_workers_and_local_runs_train_in_process(monkeypatch):
    cfg = config_from_dict(
        {"models": MODELS, "trainer": {"devices": 2}, "launcher": {"kind": "torchrun", "nproc_per_node": 2}}
    )
    for key, value in {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "RANK": "3"}.items():
        monkeypatch.setenv(key, value)
    assert launch_if_needed(cfg, "pretrain", "t5", ARGV) is None
    assert process_layout(cfg) == (2, 2)  # the environment torchrun set is the truth
    assert launch_if_needed(config_from_dict({"models": MODELS}), "pretrain", "t5", ARGV) is None


def test_launcher_counts_must_match_trainer():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.devices"):
        config_from_dict({"models": MODELS, "launcher": {"kind": "torchrun", "nproc_per_node": 4}})
    with pytest.raises(ConfigError, match="trainer.num_nodes"):
        config_from_dict({"models": MODELS, "trainer": {"devices": "auto"}, "launcher": {"kind": "slurm", "nnodes": 2}})
    with pytest.raises(ConfigError, match="heartbeat_timeout_s: 10 s is under 3 heartbeats"):
        config_from_dict({"models": MODELS, "launcher": {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 10}})


def test_nnodes_that_disagree_with_num_nodes_stop_the_stage_at_validation(tmp_path):
    """A params check: exit 2 before anything is imported or launched, one message naming both keys."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["launcher"] |= {"kind": "torchrun", "nnodes": 2, "rdzv_endpoint": "node0:29400"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline.pretrain", "--model", "t5", "--seed", "0"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "trainer.num_nodes: 1 but launcher.nnodes is 2" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "artifacts").exists()


def test_a_multi_node_rendezvous_needs_a_hostname_the_other_nodes_can_reach():
    """Before torchrun starts on several nodes: a hostname that resolves to the loopback address only (Debian's
    default `127.0.1.1 <hostname>`) would have gloo advertise an address no other node reaches."""
    from pipeline.training.launch import check_node_addresses

    launcher = {"kind": "torchrun", "nnodes": 2, "rdzv_endpoint": "10.1.2.3:29400"}
    cfg = config_from_dict({"models": MODELS, "trainer": {"num_nodes": 2}, "launcher": launcher})
    with pytest.raises(StageError, match="'localhost' resolves to the loopback address only"):
        check_node_addresses(cfg, hostname="localhost")
    launcher["rdzv_endpoint"] = "127.0.0.1:29400"  # every "node" on this machine: the loopback address reaches them
    check_node_addresses(config_from_dict({"models": MODELS, "trainer": {"num_nodes": 2}, "launcher": launcher}),
                         hostname="localhost")  # fmt: skip
    assert "--rdzv-conf" in (cmd := torchrun_command(cfg, "pretrain", ARGV))
    assert cmd[cmd.index("--rdzv-conf") + 1] == "read_timeout=60"  # the agent's store requests: the heartbeat's timeout


# ----------------------------------------------------------------------------- submit and wait (stand-ins)


def write_tool(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root (params.yaml) as cwd, and a bin directory first on PATH for the stand-in commands."""
    (tmp_path / "params.yaml").write_text("{}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for key in ("TORCHELASTIC_RUN_ID", "PIPELINE_LAUNCHER"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path, bin_dir


def fake_sbatch(bin_dir: Path, job_id: str = "4242") -> None:
    """Stand-in `sbatch --parsable`: records the script, writes the job's log where `--output` says, prints the id."""
    write_tool(
        bin_dir,
        "sbatch",
        f"""
[ "$1" = --parsable ] || exit 9
cp "$2" "$(dirname "$0")/submitted.sbatch"
out=$(sed -n 's/^#SBATCH --output=//p' "$2" | sed 's/%j/{job_id}/')
echo "epoch 0 loss 6.1" > "$out"
echo "{job_id};cluster"
""",
    )


def fake_sacct(bin_dir: Path, states: list[str]) -> None:
    """Stand-in `sacct -X -n -P -o State,ExitCode`: one line per call from `states`, the last one repeating."""
    (bin_dir / "states").write_text("\n".join(states) + "\n")
    write_tool(
        bin_dir,
        "sacct",
        """
d=$(dirname "$0")
n=$(cat "$d/calls" 2>/dev/null || echo 0); echo $((n + 1)) > "$d/calls"
total=$(wc -l < "$d/states"); i=$((n + 1)); [ $i -gt $total ] && i=$total
sed -n "${i}p" "$d/states"
""",
    )


def slurm_config(poll: float = 0.0):
    return config_from_dict(
        {
            "models": MODELS,
            "trainer": {"devices": "auto"},
            "launcher": {"kind": "slurm", "slurm": {"poll_interval_s": poll, "gpus_per_node": 2}},
        }
    )


def test_submit_waits_through_a_requeue_and_streams_the_log(project, capsys):
    root, bin_dir = project
    fake_sbatch(bin_dir)
    fake_sacct(bin_dir, ["PENDING|0:0", "RUNNING|0:0", "REQUEUED|0:0", "PENDING|0:0", "RUNNING|0:0", "COMPLETED|0:0"])
    assert launch_if_needed(slurm_config(), "pretrain", "t5", ARGV) == 0
    assert int((bin_dir / "calls").read_text()) == 6  # kept polling through the requeue until COMPLETED
    script = (root / "logs/slurm/pretrain/t5/pretrain-t5.sbatch").read_text()
    assert (bin_dir / "submitted.sbatch").read_text() == script
    captured = capsys.readouterr()
    assert "epoch 0 loss 6.1" in captured.out  # the job's log, streamed while waiting
    assert "4242" in captured.err and "COMPLETED" in captured.err


def test_failed_job_returns_its_exit_code(project, capsys):
    _, bin_dir = project
    fake_sbatch(bin_dir)
    fake_sacct(bin_dir, ["RUNNING|0:0", "FAILED|3:0"])
    assert submit_and_wait(slurm_config(), "finetune", "reformer", ARGV) == 3
    assert "FAILED" in capsys.readouterr().err
    fake_sacct(bin_dir, ["CANCELLED by 1000|0:15"])
    (bin_dir / "calls").unlink()
    assert submit_and_wait(slurm_config(), "finetune", "reformer", ARGV) == 1  # no exit code of its own


def test_without_sacct_squeue_and_the_exit_code_file_decide(project):
    root, bin_dir = project
    fake_sbatch(bin_dir, job_id="77")
    # squeue lists the job twice, then it is gone and the script's exit-code file holds the result
    exit_file = root / "logs/slurm/pretrain/t5/exitcode-77"
    write_tool(
        bin_dir,
        "squeue",
        f"""
d=$(dirname "$0"); n=$(cat "$d/calls" 2>/dev/null || echo 0); echo $((n + 1)) > "$d/calls"
if [ $n -lt 2 ]; then echo RUNNING; else cp "$d/result" {exit_file}; fi
""",
    )
    (bin_dir / "result").write_text("0\n")
    assert submit_and_wait(slurm_config(), "pretrain", "t5", ARGV) == 0
    assert int((bin_dir / "calls").read_text()) == 3
    (bin_dir / "result").write_text("2\n")
    (bin_dir / "calls").unlink()
    exit_file.unlink()
    assert submit_and_wait(slurm_config(), "pretrain", "t5", ARGV) == 2


def test_missing_sbatch_is_a_clear_error(project, monkeypatch):
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "sbatch" else real_which(name, *a, **k))
    with pytest.raises(StageError, match="sbatch. is not on PATH"):
        launch_if_needed(slurm_config(), "pretrain", "t5", ARGV)


@pytest.mark.parametrize("exit_code", [0, 1])
def test_the_requeue_command_survives_a_late_sigusr1(tmp_path, monkeypatch, capsys, exit_code):
    """On several nodes, SIGUSR1 from `scancel --signal=USR1` can reach this node's processes after another node's
    rank saw it and the ranks agreed to requeue: SLURM then signals `scontrol requeue` too, which must not die of it
    (the stand-in `scontrol` signals itself the same way). A failing `scontrol` is said, with what to do; the stage
    ends as interrupted either way."""
    import os
    import signal

    import lightning as L

    from pipeline import common
    from pipeline.training.callbacks import StepCheckpoint
    from pipeline.training.module import Seq2SeqLM
    from tests.test_faults import _fit, _settings, _Tiny

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = f'kill -USR1 $$\necho "$@" > {tmp_path}/requeued\necho refused >&2\nexit {exit_code}\n'
    write_tool(bin_dir, "scontrol", script)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(common, "_received", [])  # the signals this test's stage receives stay this test's
    monkeypatch.setattr(common, "_raising", [False])
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    common.install_signal_handlers()

    class SignalAtStep3(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    ckpt = StepCheckpoint(tmp_path / "ck", every_n_train_steps=100, requeue_on_signal=True)
    try:
        with pytest.raises(BaseException) as info:  # noqa: B017 - which one Lightning raises is not the point here
            _fit(Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=0)), tmp_path, 40, [SignalAtStep3(), ckpt])
        assert common.outcome_of(info.value).outcome is common.Outcome.INTERRUPTED
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "77"]
    said = capsys.readouterr().err  # said before scontrol runs: the requeue's SIGTERM may end the job before it returns
    assert "checkpoint saved; scontrol requeue 77" in said, said
    failed = "scontrol requeue 77 failed (exit 1): refused; the job ends as interrupted and is not requeued"
    assert (failed in said) == (exit_code == 1), said
