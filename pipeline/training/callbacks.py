"""The Lightning pieces around the training module: the step checkpoint, the data module and the sampler position
it saves, the progress bar and the MLflow logger.

`StepCheckpoint` is the periodic `last.ckpt` writer: it writes atomically (a killed save never leaves a truncated
`last.ckpt`), keeps the one before as `previous.ckpt` (what a corrupt `last.ckpt` falls back to), checkpoints a step
that also validates after its validation (so the validation row is in the saved history), and under SLURM turns
`SIGUSR1` into a checkpoint at the next optimizer-step boundary followed by `scontrol requeue`, so the requeued job
resumes exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from pipeline.common import StageInterrupted, note_signal
from pipeline.data.datamodule import ResumableSampler
from pipeline.tracking.runs import TrackedRun


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar without the `v_num` column (the MLflow run id, meaningless next to a loss)."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The bar's metrics: Lightning's, minus the logger version."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RequeuedError(StageInterrupted):
    """The SLURM job saved its state and asked to be requeued; this attempt ends here (SLURM restarts it)."""

    def __init__(self) -> None:
        super().__init__(signal.SIGUSR1)


PREVIOUS_NAME = "previous.ckpt"


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps, written atomically, the one before kept as
    `previous.ckpt`; skipped while the divergence guard sees a stuck streak; SIGUSR1 under SLURM -> checkpoint at
    the next step boundary, `scontrol requeue`, and this attempt ends (`RequeuedError`).

    Lightning's own SLURM auto-requeue saves `hpc_ckpt_<n>.ckpt` from inside the signal handler, in the middle of
    whatever step is running, and `trainer.validate` later reloads that file: the resumed run is not exact and the
    published weights are stale. The stage therefore turns it off (`SLURMEnvironment(auto_requeue=False)`) and
    uses this callback's `requeue_on_signal` instead.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, requeue_on_signal: bool = False):
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            save_on_train_epoch_end=False,
        )
        self.requeue_on_signal = requeue_on_signal
        self._signalled = False
        self._previous_handler: Any = None

    # -- SIGUSR1: remember it, act at the next step boundary
    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's signal connector saved the handlers it restores at teardown, so ours is not among them
        super().on_train_start(trainer, pl_module)
        if self.requeue_on_signal:
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self.requeue_on_signal and self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if getattr(pl_module, "divergence_streak", 0) > 0:
            return  # keep the last good checkpoint while the run may be diverging
        if self._validation_follows(trainer):
            # a step that also validates is checkpointed after its validation (Lightning's deferred save, in
            # `on_validation_end`), so the checkpoint's history holds the validation row: a run killed right after
            # it resumes with that row, and one killed during the validation resumes from the checkpoint before
            if self._checkpoint_step(trainer) and not self._should_skip_saving_checkpoint(trainer):
                self._defer_save_until_validation = True
        else:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if not self.requeue_on_signal or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        signalled = trainer.strategy.reduce_boolean_decision(self._signalled, all=False)
        if not signalled:
            return
        if self._validation_follows(trainer):
            # a validation follows this step; a checkpoint saved before it would resume past it (the row lost),
            # so the requeue waits for the next step boundary
            self._signalled = True
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}.ckpt"))
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
            if job:
                # said first, flushed: the requeue ends this job with SIGTERM, maybe before scontrol has returned
                say = f"step {trainer.global_step}: checkpoint saved; scontrol requeue {job}"
                print(say, file=sys.stderr, flush=True)
                # SIGUSR1 ignored meanwhile, and so by scontrol, which inherits that: on several nodes the signal can
                # reach this node's processes after another node's rank saw it, and it would kill scontrol
                previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                try:
                    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                finally:
                    signal.signal(signal.SIGUSR1, previous)
                if proc.returncode != 0:
                    print(
                        f"scontrol requeue {job} failed (exit {proc.returncode}): {proc.stderr.strip()}; the job "
                        "ends as interrupted and is not requeued: re-run the stage to resume from its checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
        trainer.strategy.barrier()
        note_signal(signal.SIGUSR1)  # the stage ends as interrupted (KILLED in MLflow), whatever Lightning makes of it
        raise RequeuedError()

    def _checkpoint_step(self, trainer: L.Trainer) -> bool:
        every = self._every_n_train_steps
        return every >= 1 and trainer.global_step % every == 0 and not trainer.fit_loop.epoch_loop._should_accumulate()

    @staticmethod
    def _validation_follows(trainer: L.Trainer) -> bool:
        """Whether the fit loop validates right after the step that just ended (in `on_train_batch_end`)."""
        loop = trainer.fit_loop
        return trainer.state.fn == "fit" and loop.epoch_loop._should_check_val_fx(loop._data_fetcher)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning saves `last` at the end of a run that saved none: not the weights of a stuck streak
        if getattr(pl_module, "divergence_streak", 0) > 0:
            return
        super().on_train_end(trainer, pl_module)

    # -- atomic save, the one before kept
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        tmp = target.with_name(f".{target.name}.saving")
        if trainer.is_global_zero and (tmp.exists() or tmp.is_symlink()):
            _remove_path(tmp)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp, self.save_weights_only)  # collective under DeepSpeed: every rank calls it
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            previous = target.with_name(PREVIOUS_NAME)
            if target.exists():
                _remove_path(previous)
                os.replace(target, previous)
            os.replace(tmp, target)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class TrainDataModule(L.LightningDataModule):
    """Training and validation loaders over datasets taking `(epoch, index)` items.

    `batches_consumed` (micro-batches this process has trained on) is advanced by `SamplerPosition` and saved
    in every checkpoint; the next `train_dataloader()` resumes the stream right after it.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None,
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.train, self.val, self.collate_fn = train, val, collate_fn
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.batches_consumed = 0

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._ranks()
        sampler = ResumableSampler(len(self.train), self.seed, self.batches_consumed * self.batch_size, rank, world)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None or len(self.val) == 0:
            return []
        rank, world = self._ranks()
        indices = list(range(rank, len(self.val) - len(self.val) % world if world > 1 else len(self.val), world))
        return DataLoader(
            torch.utils.data.Subset(self.val, indices),
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError("the checkpoint was written with another batch size; cannot resume its data stream")
        self.batches_consumed = int(state["batches_consumed"])


class SamplerPosition(L.Callback):
    """Counts consumed micro-batches into the datamodule (Lightning runs checkpoint callbacks after this one)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        trainer.datamodule.batches_consumed += 1


class MlflowMetrics(Logger):
    """A Lightning logger writing metrics, at the step given, into an existing MLflow run (rank zero only).

    Unlike Lightning's `MLFlowLogger` it neither creates nor terminates runs: `TrackedRun` owns the run's life.
    """

    def __init__(self, run: TrackedRun):
        super().__init__()
        self.run = run

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str | None:
        return self.run.run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> TrackedRun:
        return self.run

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log_metrics(metrics, step=step)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the stage logs the whole validated config itself, flattened
