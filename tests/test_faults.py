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
    kernels = SimpleNamespace(matmul="blas", decoding="plain", paths="reference")
    monkeypatch.setattr(common, "load_config_or_exit", lambda path: SimpleNamespace(trainer=trainer, kernels=kernels))


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


FINALIZER_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.common import install_signal_handlers, outcome_of, raise_if_signalled

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the finalizer

    install_signal_handlers()
    try:
        Finalized()  # collected at once: the handler's exception cannot leave __del__
        print("went on", flush=True)
        raise_if_signalled()
        print("not stopped", flush=True)
    except BaseException as exc:
        sys.exit(outcome_of(exc).exit_code)
    sys.exit(0)
    """
)


def test_signal_inside_a_finalizer_stops_at_the_next_check():
    """A signal whose exception a finalizer swallowed (the lengths stage then trained on for minutes and opened an
    MLflow run only to mark it KILLED) stops the stage at its next check, with no traceback printed."""
    proc = subprocess.run(
        [sys.executable, "-c", FINALIZER_SIGNAL_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (143, "went on\n"), proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_no_mlflow_run_is_opened_after_a_signal(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import TrackedRun, tracked_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common.note_signal(signal.SIGTERM)
    with pytest.raises(StageInterrupted), tracked_run(TrackedRun(uri, "faults", system_metrics=False), "r", {}):
        raise AssertionError("the block must not run")
    experiment = MlflowClient(uri).get_experiment_by_name("faults")
    assert experiment is None or not MlflowClient(uri).search_runs([experiment.experiment_id])


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
    from pipeline.tracking.runs import check_tracking_uri

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

    from pipeline.tracking.runs import TrackedRun, tracked_run

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
    from pipeline.training.module import OptimSettings

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
    from pipeline.training.callbacks import StepCheckpoint
    from pipeline.training.module import Seq2SeqLM

    torch.manual_seed(0)
    module = Seq2SeqLM(_Tiny(), _settings(lr=1e6))
    with pytest.raises(DivergedError, match="ln\\(vocab\\)|gradient norm of 0"):
        _fit(module, tmp_path, 40, [StepCheckpoint(tmp_path / "ck", every_n_train_steps=1)])
    assert module.global_step < 40
    # no checkpoint was written from the stuck steps: the one on disk predates the streak
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert saved["global_step"] <= module.global_step - module.settings.divergence_patience + 1


def test_divergence_guard_leaves_a_learning_run_alone(tmp_path):
    from pipeline.training.module import Seq2SeqLM

    torch.manual_seed(0)
    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2))
    trainer = _fit(module, tmp_path, 40)
    assert trainer.global_step == 40 and module.divergence_streak == 0


def test_step_checkpoint_is_atomic_and_keeps_the_previous(tmp_path):
    from pipeline.training.callbacks import StepCheckpoint
    from pipeline.training.module import Seq2SeqLM

    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=0))
    _fit(module, tmp_path, 6, [StepCheckpoint(tmp_path / "ck", every_n_train_steps=2)])
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["last.ckpt", "previous.ckpt"]
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert torch.load(tmp_path / "ck" / "previous.ckpt", weights_only=True)["global_step"] == 4


def test_sigusr1_checkpoints_at_the_step_boundary_and_requeues(tmp_path, monkeypatch):
    """Under SLURM, SIGUSR1 -> last.ckpt at the next step boundary, then the attempt ends as interrupted."""
    from pipeline.training.callbacks import StepCheckpoint
    from pipeline.training.module import Seq2SeqLM

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
    from pipeline.training.strategy import consolidate_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "payload": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        consolidate_checkpoint(path)
    good = tmp_path / "good.ckpt"
    _lightning_checkpoint(good)
    assert set(consolidate_checkpoint(good)) == {"model.weight", "model.bias"}


def test_restricted_torch_load_is_applied_to_deepspeed_shards(tmp_path):
    from pipeline.training.strategy import restricted_torch_load

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Evil()}, path)
    with restricted_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed's zero_to_fp32 asks for
    assert torch.load is not None and "weights_only" not in repr(torch.load)


# ------------------------------------------------------------------------------------------ issue 27: part two


def test_the_interruption_message_says_what_a_rerun_does(no_config, capsys):
    def body():
        os.kill(os.getpid(), signal.SIGTERM)

    parser = stage_parser("test")
    assert run_stage(lambda cfg, args: body(), parser, []) == 143
    err = capsys.readouterr().err
    assert "start it over (it keeps no checkpoints)" in err and "last checkpoint" not in err
    assert run_stage(lambda cfg, args: body(), parser, [], rerun=common.RESUMES) == 143
    assert "resume from its last checkpoint" in capsys.readouterr().err


def test_a_full_disk_is_named_by_the_output_and_its_filesystem(tmp_path):
    # fsspec writes a checkpoint into /tmp, then moves it: the destination is the error's second file name
    dest = tmp_path / "artifacts/finetune/t5/0/checkpoints/.last.ckpt.saving"
    dest.parent.mkdir(parents=True)
    message = common.user_message(OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpx1y2", None, str(dest)))
    assert f"writing {dest.parent}/last.ckpt (the filesystem mounted at " in message
    assert "MB free)" in message and "/tmp/tmpx1y2" not in message and ".saving" not in message
    staged = tmp_path / "artifacts/pretrain/t5/0/.final.1234.deadbeef.tmp/model.safetensors"
    message = common.user_message(OSError(errno.ENOSPC, "No space left on device", str(staged)))
    assert f"writing {tmp_path}/artifacts/pretrain/t5/0/final/model.safetensors (the filesystem" in message


def test_publish_names_the_file_a_failed_write_was_writing(tmp_path):
    target = tmp_path / "metrics" / "t5-0.json"
    with pytest.raises(OSError) as info, publish() as pub:
        pub.stage(tmp_path / "model").mkdir()
        pub.stage(target).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() or close() raises: no file name
    assert Path(info.value.filename).name.startswith(".t5-0.json.")
    assert f"writing {target} (the filesystem mounted at" in common.user_message(info.value)
    assert not target.exists() and not list(tmp_path.rglob(".*.tmp"))


def test_a_checkpoint_of_another_model_is_refused_before_lightning_loads_it(tmp_path):
    path = tmp_path / "last.ckpt"
    _lightning_checkpoint(path)  # a Linear(3, 3)
    check_checkpoint(path, {"model.weight": (3, 3), "model.bias": (3,)})
    check_checkpoint(path, {"model._orig_mod.weight": (3, 3), "model._orig_mod.bias": (3,)})  # torch.compile's names
    with pytest.raises(CorruptFileError, match=r"not this model's: 2 of 2 tensors differ, e.g. model.bias: \(3,\) in"):
        check_checkpoint(path, {"model.weight": (4, 3), "model.bias": (4,)})
    with pytest.raises(CorruptFileError, match="1 of 3 tensors differ, e.g. model.extra: missing in the file"):
        check_checkpoint(path, {"model.weight": (3, 3), "model.bias": (3,), "model.extra": (1,)})


def test_a_planted_pickle_is_named_without_advice_to_run_it(tmp_path):
    marker = tmp_path / "PLANTED"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": Planted()}, path)
    with pytest.raises(CorruptFileError) as info:
        check_checkpoint(path)
    message = str(info.value)
    assert "it holds a reference to posix.system" in message and "it was not loaded" in message
    assert "weights_only" not in message and "trainer.on_corrupt_checkpoint" in message
    assert not marker.exists()


def test_a_seed_outside_seeds_is_refused():
    from pipeline.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    common.require_variant(cfg, "t5", cfg.seeds[0])
    with pytest.raises(StageError, match=r"--seed 7: not one of `seeds:` in .*params.yaml \(0, 1, 2\); add it"):
        common.require_variant(cfg, "t5", 7)


def test_a_divergence_patience_longer_than_a_run_is_a_params_problem():
    from pipeline.config import ConfigError, config_from_dict

    def load(patience, pretrain=12, finetune=4):
        no_warmup = {"optimizer": {"warmup_steps": 0}}
        raw = {"pretrain": {"max_steps": pretrain, **no_warmup}, "finetune": {"max_steps": finetune, **no_warmup}}
        return config_from_dict({**raw, "trainer": {"divergence": {"patience_steps": patience}}})

    with pytest.raises(ConfigError) as info:
        load(50)
    (problem,) = info.value.problems
    assert problem.startswith("trainer.divergence.patience_steps: 50 steps is longer than finetune.max_steps (4)")
    assert "set it to at most 4, or 0 to turn it off" in problem
    with pytest.raises(ConfigError, match="longer than pretrain.max_steps \\(3\\)"):
        load(4, pretrain=3)
    assert load(4).trainer.divergence.patience_steps == 4 and load(0, 1, 1)  # fits, or off


@pytest.mark.parametrize("steps, rows", [(3, [3]), (7, [5, 7]), (10, [5, 10])])
def test_the_steps_after_the_last_logged_one_are_logged_at_the_end(tmp_path, steps, rows):
    from pipeline.training.module import Seq2SeqLM

    torch.manual_seed(0)
    module = Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=0))  # logs every 5 steps
    _fit(module, tmp_path, steps)
    logged = [r for r in module.history if "train/loss" in r]
    assert [r["step"] for r in logged] == rows
    assert module.tokens_seen == steps * 4 * 8  # every target token of every step, batch 4 x 8
    assert logged[-1]["train/tokens"] == module.tokens_seen and logged[-1]["train/lr"] == pytest.approx(1e-2)
    assert logged[-1]["train/grad_norm"] > 0


def test_a_run_that_ends_stuck_is_diverged_and_keeps_no_stuck_checkpoint(tmp_path):
    from pipeline.training.callbacks import StepCheckpoint
    from pipeline.training.module import Seq2SeqLM

    class Dead(_Tiny):  # uniform predictions and no gradient: what a run blown up by a huge learning rate leaves
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 0.0

    torch.manual_seed(0)
    module = Seq2SeqLM(Dead(), _settings(lr=1e-2, patience=40))  # the guard's patience never runs out
    _fit(module, tmp_path, 12, [StepCheckpoint(tmp_path / "ck", every_n_train_steps=100)])
    assert module.divergence_streak == 12
    with pytest.raises(DivergedError, match="the run ended with a gradient norm of 0 for its last 12 steps"):
        module.check_ending()
    assert not (tmp_path / "ck" / "last.ckpt").exists()  # Lightning's save at the end skipped: weights are stuck
    learning = Seq2SeqLM(_Tiny(), _settings(lr=1e-2, patience=40))
    _fit(learning, tmp_path / "learning", 12)
    learning.check_ending()


STALE_RUN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pipeline.tracking.runs import TrackedRun
    run = TrackedRun(sys.argv[1], "faults", system_metrics=False)
    run.start("r", {"stage": "evaluate", "variant": "t5", "seed": sys.argv[2]})
    print(run.run_id, flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
    """
)


def test_runs_left_running_are_closed_only_when_no_process_runs_them(tmp_path):
    """Real processes start real runs in a sqlite store: one killed with SIGKILL, one alive, one of another seed
    killed too; the next run of evaluate@t5-0 closes the first alone (and, holding the lock, any of its repository)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import KILLED_TAG, close_stale_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def started(seed: str, how: str) -> tuple[str, subprocess.Popen]:
        cmd = [sys.executable, "-c", STALE_RUN_SCRIPT, uri, seed, how]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return proc.stdout.readline().strip(), proc

    killed, first = started("0", "kill")
    other_seed, second = started("1", "kill")
    alive, live = started("0", "sleep")
    try:
        assert first.wait(60) == second.wait(60) == -signal.SIGKILL
        client = MlflowClient(uri)
        identity = {"stage": "evaluate", "variant": "t5", "seed": "0"}
        assert close_stale_runs(uri, "faults", identity) == [killed]
        assert client.get_run(killed).info.status == "KILLED"
        assert "its process (pid" in client.get_run(killed).data.tags[KILLED_TAG]
        assert client.get_run(alive).info.status == client.get_run(other_seed).info.status == "RUNNING"
        # holding the stage's lock in the same repository: no other process can be running it
        assert close_stale_runs(uri, "faults", identity, exclusive=True) == [alive]
        assert client.get_run(other_seed).info.status == "RUNNING"
    finally:
        live.kill()
        live.wait()


def test_a_signal_while_the_params_validate_interrupts_the_stage_after_it(monkeypatch, capsys):
    """Validation runs inside pydantic's Rust core (which calls our validators, which import torch): an exception
    raised there by the signal handler could unwind through Rust and abort the process, or be swallowed."""
    validated, ran = [], []

    def load(path):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the validation
        validated.append(True)  # not interrupted here
        return SimpleNamespace(trainer=SimpleNamespace(threads=1, devices=1))

    monkeypatch.setattr(common, "load_config_or_exit", load)
    assert run_stage(lambda cfg, args: ran.append(True), stage_parser("test"), []) == 143
    assert validated == [True] and ran == []
    assert "interrupted by SIGTERM" in capsys.readouterr().err
