"""The fault-handling mechanisms, one by one (issue 11): how a stage ends, publishing, loaders, the divergence
guard, the step checkpoint, the tracking store and the consolidation's unpickling.

Each test exercises the real mechanism (real signals, real files, a real Lightning Trainer, a real sqlite MLflow
store); the whole-stage fault suite is `python -m tests.faults` (tests/test_faults_suite.py runs it, slow).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from pipeline import common
from pipeline.common import (
    CorruptFileError,
    DivergedError,
    Outcome,
    StageError,
    StageInterrupted,
    check_checkpoint,
    outcome_of,
    publish,
    read_json,
    recover_output,
    run_stage,
    stage_parser,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_recorded_signals():
    common._received.clear()
    yield
    common._received.clear()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


# -------------------------------------------------------------------------------------------------- outcomes


def test_outcome_table():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    cases = [
        (None, Outcome.FINISHED, 0, "FINISHED"),
        (KeyboardInterrupt(), Outcome.INTERRUPTED, 130, "KILLED"),
        (StageInterrupted(signal.SIGTERM), Outcome.INTERRUPTED, 143, "KILLED"),
        (SIGTERMException(), Outcome.INTERRUPTED, 143, "KILLED"),  # Lightning's bare SystemExit
        (DivergedError("loss stuck"), Outcome.DIVERGED, 1, "FAILED"),
        (StageError("bad input"), Outcome.FAILED, 1, "FAILED"),
        (SystemExit(2), Outcome.FAILED, 2, "FAILED"),
        (SystemExit(None), Outcome.FAILED, 1, "FAILED"),  # never 0 for a stage that did not return
        (OSError(errno.ENOSPC, "No space left on device", "metrics/x.json"), Outcome.FAILED, 1, "FAILED"),
        (RuntimeError("a bug"), Outcome.FAILED, 1, "FAILED"),
    ]
    for exc, outcome, code, status in cases:
        result = outcome_of(exc)
        assert (result.outcome, result.exit_code, result.mlflow_status) == (outcome, code, status), exc
    assert outcome_of(RuntimeError("a bug")).bug
    assert not outcome_of(OSError(errno.EROFS, "Read-only file system", "artifacts")).bug
    assert "metrics/x.json" in outcome_of(OSError(errno.ENOSPC, "No space", "metrics/x.json")).message


def test_lightning_sys_exit_after_sigint_is_still_an_interruption():
    common.note_signal(signal.SIGINT)
    assert outcome_of(SystemExit(1)).exit_code == 130  # Lightning turns Ctrl-C into sys.exit(1)
    common._received.clear()
    common.note_signal(signal.SIGTERM)
    assert outcome_of(None).outcome is Outcome.INTERRUPTED  # a signal makes even a return non-zero


def _stage(body):
    parser = stage_parser("test")
    return lambda: run_stage(lambda cfg, args: body(), parser, [])


@pytest.fixture
def no_config(monkeypatch):
    trainer = SimpleNamespace(threads=1, devices=1)  # what run_stage reads before the body
    monkeypatch.setattr(common, "load_config_or_exit", lambda path: SimpleNamespace(trainer=trainer))


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_run_stage_exit_code_of_a_signal(no_config, capsys, signum, code):
    def body():
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have stopped the stage")

    assert _stage(body)() == code
    assert "interrupted by" in capsys.readouterr().err


def test_run_stage_user_errors_have_no_traceback(no_config, capsys):
    def body():
        raise OSError(errno.ENOSPC, "No space left on device", "/x/metrics/pretrain.json")

    assert _stage(body)() == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "/x/metrics/pretrain.json" in err and "Traceback" not in err


def test_run_stage_bug_keeps_its_traceback(no_config, capsys):
    def body():
        raise ZeroDivisionError("oops")

    assert _stage(body)() == 1
    assert "Traceback" in capsys.readouterr().err


LIGHTNING_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import lightning as L, torch
    from pipeline.common import install_signal_handlers, outcome_of

    class Slow(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)
        def training_step(self, batch, i):
            if i == 2:
                print("ready", flush=True)
            time.sleep(0.2)
            return self.w(batch[0]).sum()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(400, 2)), batch_size=1)

    install_signal_handlers()
    trainer = L.Trainer(accelerator="cpu", max_steps=400, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(Slow())
    except BaseException as exc:
        sys.exit(outcome_of(exc).exit_code)
    sys.exit(outcome_of(None).exit_code)
    """
)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_inside_lightning_fit(signum, code):
    """Lightning raises a bare SystemExit on SIGTERM and exits 1 on SIGINT: the stage still reports 143/130."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LIGHTNING_SIGNAL_SCRIPT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    for line in proc.stdout:
        if "ready" in line:
            break
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code


# ------------------------------------------------------------------------------------------------ publishing


def test_publish_all_or_nothing(tmp_path):
    a, b = tmp_path / "final", tmp_path / "metrics" / "m.json"
    a.mkdir()
    (a / "w").write_text("old")
    b.parent.mkdir()
    b.write_text("old")
    with pytest.raises(RuntimeError), publish() as pub:
        tmp = pub.stage(a)
        tmp.mkdir()
        (tmp / "w").write_text("new")
        pub.write_json(b, {"new": 1})
        raise RuntimeError("writing the metrics failed")
    assert (a / "w").read_text() == "old" and b.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "metrics"]  # no temporary left
    with publish() as pub:
        tmp = pub.stage(a)
        tmp.mkdir()
        (tmp / "w").write_text("new")
        pub.write_json(b, {"new": 1})
    assert (a / "w").read_text() == "new" and json.loads(b.read_text()) == {"new": 1}


def test_publish_read_only_metrics_folder_keeps_the_model(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    final, metrics = tmp_path / "final", tmp_path / "metrics"
    final.mkdir()
    metrics.mkdir()
    (final / "w").write_text("old")
    metrics.chmod(0o555)
    try:
        with pytest.raises(PermissionError), publish() as pub:
            pub.stage(final).mkdir()
            pub.write_json(metrics / "m.json", {})
    finally:
        metrics.chmod(0o755)
    assert (final / "w").read_text() == "old"


def test_nothing_is_published_after_a_signal(tmp_path):
    target = tmp_path / "m.json"
    target.write_text("old")
    with pytest.raises(StageInterrupted), publish() as pub:
        pub.write_json(target, {"new": 1})
        common.note_signal(signal.SIGTERM)
    assert target.read_text() == "old"


def test_recovery_after_a_kill(tmp_path):
    target = tmp_path / "tokenized"
    # killed between moving the old output aside and moving the new one in: the old one comes back
    (tmp_path / ".tokenized.old").mkdir()
    (tmp_path / ".tokenized.old" / "f").write_text("old")
    # a temporary folder of a dead process, and one of an old version (no pid)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".tokenized.{dead.stdout.strip()}.abcd1234.tmp").mkdir()
    (tmp_path / ".tokenized.k2j4h5.tmp").mkdir()
    alive = tmp_path / f".tokenized.{os.getpid()}.live0000.tmp"
    alive.mkdir()
    recover_output(target)
    assert (target / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tokenized", alive.name])


# --------------------------------------------------------------------------------------------------- loaders


def test_read_json_names_the_corrupt_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"val_loss": 1.0,')
    with pytest.raises(CorruptFileError, match="metrics.json.*re-run it"):
        read_json(path, "re-run it")
    with pytest.raises(StageError, match="not found"):
        read_json(tmp_path / "missing.json", "re-run it")


def _lightning_checkpoint(path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3}, path)


def test_check_checkpoint(tmp_path):
    good = tmp_path / "last.ckpt"
    _lightning_checkpoint(good)
    check_checkpoint(good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(CorruptFileError) as info:
            check_checkpoint(bad)
        assert str(bad) in str(info.value) and "on_corrupt_checkpoint" in str(info.value)


def test_load_model_dir_names_a_truncated_weights_file(tmp_path):
    from models import WEIGHTS_NAME

    directory = tmp_path / "final"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"family": "t5", "config": {}}))
    (directory / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptFileError) as info:
        common.load_model_dir(directory, "re-run `dvc repro pretrain@t5-0`")
    message = str(info.value)
    assert "final" in message and "re-run `dvc repro pretrain@t5-0`" in message


# ------------------------------------------------------------------------------------------- tracking store


def test_mlflow_db_that_is_not_a_database(tmp_path):
    from pipeline.tracking import check_tracking_uri

    db = tmp_path / "mlflow.db"
    db.write_text("this is not sqlite " * 100)
    with pytest.raises(StageError, match="not an SQLite database.*mv"):
        check_tracking_uri(f"sqlite:///{db}", 1.0)


@pytest.mark.parametrize(
    "ending, status",
    [(None, "FINISHED"), (KeyboardInterrupt(), "KILLED"), (StageError("x"), "FAILED"), ("signal", "KILLED")],
)
def test_tracked_run_status(tmp_path, ending, status):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TrackedRun, tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrackedRun(uri, "faults", system_metrics=False)
    with pytest.raises(BaseException) if ending is not None else _nothing(), tracked_run(run, "r", {"stage": "t"}):
        if ending == "signal":
            common.note_signal(signal.SIGTERM)  # arrived while the block still completed: not FINISHED
        elif ending is not None:
            raise ending
    assert MlflowClient(uri).get_run(run.run_id).info.status == status


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------- divergence and ckpts


class _Tiny(torch.nn.Module):
    """A model with the family interface (logits only): embedding -> ReLU MLP -> vocabulary."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.out(torch.relu(self.hidden(self.emb(input_ids))))


class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 8, (8,), generator=g)  # a learnable task: predict the input token
        return {"input_ids": x, "attention_mask": torch.ones(8, dtype=torch.bool), "labels": x}


def _fit(module, tmp_path, steps, callbacks=(), ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=4)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def _settings(lr: float, patience: int = 4):
    from pipeline.module import OptimSettings

    guard = SimpleNamespace(patience_steps=patience, uniform_tolerance=0.01)
    section = SimpleNamespace(
        optimizer=SimpleNamespace(
            name="adamw", lr=lr, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, schedule="constant",
            warmup_steps=0, min_lr_ratio=0.1,
        ),
        max_steps=40,
        z_loss=0.0,
        log_every_n_steps=5,
    )  # fmt: skip
    return OptimSettings.from_section(section, divergence=guard)


def test_divergence_guard_stops_a_run_stuck_at_uniform(tmp_path):
    from pipeline.module import Seq2SeqLM, StepCheckpoint

    torch.manual_seed(0)
    module = Seq2SeqLM(_Tiny(), _settings(lr=1e6))
    with pytest.raises(DivergedError, match="ln\\(vocab\\)|gradient norm of 0"):
        _fit(module, tmp_path, 40, [StepCheckpoint(tmp_path / "ck", every_n_train_steps=1)])
    assert module.global_step < 40
    # no checkpoint was written from the stuck steps: the one on disk predates the streak
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert saved["global_step"] <= module.global_step - module.settings.divergence_patience + 1


def test_divergence_guard_leaves_a_learning_run_alone(tmp_path):
    from pipeline.module import Seq2SeqLM

    torch.manual_seed(0)
    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2))
    trainer = _fit(module, tmp_path, 40)
    assert trainer.global_step == 40 and module.divergence_streak == 0


def test_step_checkpoint_is_atomic_and_keeps_the_previous(tmp_path):
    from pipeline.module import Seq2SeqLM, StepCheckpoint

    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=0))
    _fit(module, tmp_path, 6, [StepCheckpoint(tmp_path / "ck", every_n_train_steps=2)])
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["last.ckpt", "previous.ckpt"]
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert torch.load(tmp_path / "ck" / "previous.ckpt", weights_only=True)["global_step"] == 4


def test_sigusr1_checkpoints_at_the_step_boundary_and_requeues(tmp_path, monkeypatch):
    """Under SLURM, SIGUSR1 -> last.ckpt at the next step boundary, then the attempt ends as interrupted."""
    from pipeline.module import Seq2SeqLM, StepCheckpoint

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    common.install_signal_handlers()

    class SignalAtStep3(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # in the middle of a step

    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=0))
    ckpt = StepCheckpoint(tmp_path / "ck", every_n_train_steps=100, requeue_on_signal=True)
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(BaseException) as info:
        _fit(module, tmp_path, 40, [SignalAtStep3(), ckpt])
    assert outcome_of(info.value).outcome is Outcome.INTERRUPTED
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) == previous  # the handler does not outlive the fit


# ---------------------------------------------------------------------------------------------- consolidation


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-by-checkpoint",))


def test_consolidation_refuses_arbitrary_pickles(tmp_path):
    from pipeline.strategy import consolidate_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "payload": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        consolidate_checkpoint(path)
    good = tmp_path / "good.ckpt"
    _lightning_checkpoint(good)
    assert set(consolidate_checkpoint(good)) == {"model.weight", "model.bias"}


def test_restricted_torch_load_is_applied_to_deepspeed_shards(tmp_path):
    from pipeline.strategy import restricted_torch_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Evil()}, path)
    with restricted_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed's zero_to_fp32 asks for
    assert torch.load is not None and "weights_only" not in repr(torch.load)
