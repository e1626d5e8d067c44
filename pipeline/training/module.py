"""The one LightningModule both families train with: loss, optimizer, schedule and logging.

The network itself is a plain `nn.Module` from `models/` held as `self.model` (so checkpoint keys are
`model.<parameter name>`); this module owns everything around it, as in lightning-hydra-template.

Batches are dicts built by `pipeline/datamodule.py`:
    input_ids (B, S) long, attention_mask (B, S) bool, labels (B, T) long with -100 where no loss is taken;
    encoder-decoder layouts add decoder_input_ids / decoder_attention_mask (B, T);
    prefix_lm adds prefix_lengths (B,).

Divergence guard (`trainer.divergence` in params): besides a non-finite loss or gradient norm, a run whose loss sits
at the uniform-prediction level ln(vocab) (within `uniform_tolerance` nats), or whose gradient norm is exactly zero,
for `patience_steps` optimizer steps in a row stops with `DivergedError`; while such a streak lasts no periodic
checkpoint is written, so the last good one is kept. A run that ends inside such a streak of `ENDING_STREAK` steps
or more (or `patience_steps`, if fewer) is diverged too (`check_ending`): its model predicts nothing better than
uniform and must not be published as a result.

Metrics are logged every `log_every_n_steps` optimizer steps, and once more at the end of training for the steps
since the last logged one (so a run shorter than its logging interval still reports its tokens and loss).

`StepCheckpoint` is the periodic `last.ckpt` writer: it writes atomically (a killed save never leaves a truncated
`last.ckpt`), keeps the one before as `previous.ckpt` (what a corrupt `last.ckpt` falls back to), and under SLURM
turns `SIGUSR1` into a checkpoint at the next optimizer-step boundary followed by `scontrol requeue`, so the
requeued job resumes exactly where an uninterrupted run would be.

Logged metrics (the same names for every family, so MLflow runs compare directly):
    train/loss, train/ppl, train/z_loss, train/grad_norm, train/tokens (cumulative target tokens),
    train/tokens_per_s (input + target tokens per second, all devices), train/flops_per_s, train/mfu
    (only when a peak FLOP/s figure is known), val/loss, val/ppl; and, from Lightning's `LearningRateMonitor`
    (added by the training stage), `train/lr/decay` and `train/lr/no_decay`: the rate of each parameter group
    (`build_optimizer`; the same value under every schedule here), at Lightning's step numbering (the steps done
    before the one that uses it). The loss history (`history`, the stage's `-train.csv`) still records the rate
    each logged step used.

Throughput and MFU are measured here rather than by Lightning's `ThroughputMonitor`: that callback counts on rank
zero only and multiplies by the world size (ranks' batches differ in non-padding tokens; here the exact counts are
summed over ranks at the logging steps), synchronises CUDA after every micro-batch, names its metrics differently for
one and several devices, and its peak table does not know the plain "NVIDIA H200" name, so MFU would vanish on the
project's GPU. Validation time is left out of both the logged windows and the whole-run figures (`run_speed`:
tokens/s, FLOP/s and MFU over this process's whole training, what the stage writes to `final/training.json`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from pipeline.common import DivergedError
from pipeline.data.datamodule import token_losses

# Dense peak FLOP/s per device for MFU, looked up by CUDA device name (bf16/fp16 tensor cores).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


class NonFiniteLossError(DivergedError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


ENDING_STREAK = 3
"""Stuck steps in a row at the end of a run that make it diverged (`Seq2SeqLM.check_ending`): a healthy loss may
pass through the uniform level for a step or two on its way down, never for three at the end."""


@dataclass
class OptimSettings:
    """What the module needs from a `pretrain`/`finetune` params section (see `pipeline/config.py`)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_steps: int = 100
    z_loss: float = 0.0
    log_every_n_steps: int = 10
    peak_flops: float | None = None
    divergence_patience: int = 0  # optimizer steps; 0 turns the stuck-loss / zero-gradient guard off
    uniform_tolerance: float = 0.01  # nats around ln(vocab) that count as "uniform predictions"

    @classmethod
    def from_section(cls, section: Any, peak_flops: float | None = None, divergence: Any = None) -> OptimSettings:
        """From a `pretrain`/`finetune` section and the optional `trainer.divergence` section."""
        o = section.optimizer
        guard = {}
        if divergence is not None:
            guard = {
                "divergence_patience": int(divergence.patience_steps),
                "uniform_tolerance": float(divergence.uniform_tolerance),
            }
        return cls(
            **guard,
            name=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            betas=(float(o.betas[0]), float(o.betas[1])),
            eps=o.eps,
            schedule=o.schedule,
            warmup_steps=o.warmup_steps,
            min_lr_ratio=o.min_lr_ratio,
            max_steps=section.max_steps,
            z_loss=section.z_loss,
            log_every_n_steps=section.log_every_n_steps,
            peak_flops=peak_flops,
        )


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then the schedule.

    `inverse_sqrt` is T5's schedule (paper section 3.1.2): 1/sqrt(max(step, warmup)), scaled so that the peak
    (at the end of warmup) is 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / max(step + 1, warmup_steps, 1))
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(model: torch.nn.Module, s: OptimSettings) -> torch.optim.Optimizer:
    """AdamW (decay on matrices only, not on norms and biases) or Adafactor (T5's factored second moments)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [  # the names are LearningRateMonitor's metric suffixes: train/lr/decay, train/lr/no_decay
        {"params": decay, "weight_decay": s.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if s.name == "adamw":
        # the fused kernel updates each tensor in one pass instead of about ten elementwise ops: on CPU 3.5 ms
        # against 12-18 ms per step for the tiny T5 (1 thread), the bulk of a step's optimizer time
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, fused=fused or None)
    if s.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=s.lr)
    raise ValueError(f"unknown optimizer {s.name!r}")


def peak_flops_per_device() -> float | None:
    """Dense bf16 peak of the current CUDA device when known (for MFU); None on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def rng_states() -> dict[str, Any]:
    """Every random state training draws from (Python, NumPy, torch CPU and CUDA), as plain values and tensors
    so checkpoints still load with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": (int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], *states["numpy_gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Seq2SeqLM(L.LightningModule):
    """Trains any `models/` family on the batches of `pipeline/datamodule.py`."""

    def __init__(self, model: torch.nn.Module, settings: OptimSettings):
        super().__init__()
        self.model = model
        self.settings = settings
        self.tokens_seen = 0  # labelled (target) tokens consumed, all devices
        self.history: list[dict[str, float]] = []  # one row per logged step (train) and per validation (val)
        self._reset_window()
        self._val_sums = torch.zeros(2, dtype=torch.float64)
        self._val_rng: dict[str, Any] | None = None
        self._grad_norm: float | None = None
        self._progress: dict[str, float] = {}
        self.run_speed: dict[str, float] = {}  # this process's whole training (set when training ends)
        self._run = [0, 0.0]  # input + target tokens and FLOPs this process trained on (this rank)
        self._run_start: float | None = None
        self._excluded_s = 0.0  # validation time inside training, left out of every throughput figure
        self._val_start: float | None = None
        self.last_val: dict[str, float] = {}
        self._pending_rng: dict[str, Any] | None = None
        self.divergence_streak = 0  # consecutive optimizer steps that looked stuck (see `_check_stuck`)
        self._stuck_what = ""  # how the last stuck step looked, for the message
        self._last_lr = 0.0  # the rate and the gradient norm of the last optimizer step (the end-of-training row)
        self._last_grad_norm: float | None = None
        self._step_loss = [0.0, 0]  # sum of micro-batch losses since the last optimizer step, and their count
        self._step_grad_norm: float | None = None

    # ---- the loss ----

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {k: batch[k] for k in ("decoder_input_ids", "decoder_attention_mask", "prefix_lengths") if k in batch}
        return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"), **kwargs)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ce_sum, z_sum, count = token_losses(self(batch), batch["labels"])
        denom = count.clamp(min=1)
        return ce_sum / denom, z_sum / denom, count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, z, count = self._losses(batch)
        loss = ce + self.settings.z_loss * z if self.settings.z_loss else ce
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(self._diverged(f"the loss is {loss.item()}"))
        self._step_loss[0] += float(ce.detach())
        self._step_loss[1] += 1
        n = int(count)
        self._window["loss"] += float(ce.detach()) * n
        self._window["z"] += float(z.detach()) * n
        self._window["targets"] += n
        tokens = int(batch["attention_mask"].sum()) + n
        self._window["tokens"] += tokens
        self._run[0] += tokens
        flops_fn = getattr(self.model, "training_flops", None)
        if flops_fn is not None:
            target_len = batch["labels"].shape[1] if "decoder_input_ids" in batch else 0
            flops = flops_fn(batch["input_ids"].shape[0], batch["input_ids"].shape[1], target_len)
            self._window["flops"] += flops
            self._run[1] += flops
        if self._progress:
            self.log_dict(self._progress, prog_bar=True, logger=False)
        return loss

    # ---- optimizer and schedule ----

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.settings
        optimizer = build_optimizer(self.model, s)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, s.schedule, s.warmup_steps, s.max_steps, s.min_lr_ratio)
        )
        # "name": what LearningRateMonitor logs the rates under (train/lr/<parameter group>)
        schedule = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _logging_step(self) -> bool:
        """Whether the optimizer step being taken (number `global_step + 1`) gets logged."""
        return (self.global_step + 1) % self.settings.log_every_n_steps == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # gradients are unscaled here (mixed precision) and not yet clipped: the norm the clipping sees.
        # A non-finite norm stops the run before the update would poison the weights (and the next checkpoint);
        # under 16-mixed the loss scaler skips such steps itself, and DeepSpeed keeps its gradients elsewhere.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if self.trainer.precision != "16-mixed" and not bool(torch.isfinite(norm)):
            raise NonFiniteLossError(self._diverged(f"the gradient norm is {float(norm)}"))
        self._step_grad_norm = self._last_grad_norm = float(norm)
        if self._logging_step():
            self._grad_norm = float(norm)

    def _check_stuck(self) -> None:
        """After each optimizer step: count steps stuck at the uniform loss or with a zero gradient norm; stop after
        `divergence_patience` in a row. The loss is averaged over ranks, so every rank decides the same."""
        s = self.settings
        loss_sum, count = self._step_loss
        self._step_loss = [0.0, 0]
        grad_norm, self._step_grad_norm = self._step_grad_norm, None
        if s.divergence_patience <= 0 or count == 0:
            return
        loss = torch.tensor([loss_sum / count], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        loss_value = float(loss)
        uniform = math.log(self.model.config.vocab_size)
        at_uniform = abs(loss_value - uniform) <= s.uniform_tolerance
        zero_grad = grad_norm is not None and grad_norm == 0.0
        self.divergence_streak = self.divergence_streak + 1 if (at_uniform or zero_grad) else 0
        at = f"a loss of {loss_value:.4f} = ln(vocab) {uniform:.4f}"
        self._stuck_what = "a gradient norm of 0" if zero_grad else at
        if self.divergence_streak >= s.divergence_patience:
            raise DivergedError(
                self._diverged(
                    f"{self._stuck_what} for {self.divergence_streak} steps in a row "
                    "(trainer.divergence.patience_steps), the model predicts nothing better than uniform"
                )
            )

    def check_ending(self) -> None:
        """After training: `DivergedError` when the run ended inside a stuck streak of `ENDING_STREAK` steps (or
        `patience_steps`, if fewer), which the guard did not see through because the run was over first."""
        s = self.settings
        if s.divergence_patience > 0 and self.divergence_streak >= min(s.divergence_patience, ENDING_STREAK):
            raise DivergedError(
                self._diverged(
                    f"the run ended with {self._stuck_what} for its last {self.divergence_streak} steps, the model "
                    "predicts nothing better than uniform",
                    "nothing was published",
                )
            )

    def _diverged(self, what: str, done: str = "stopped") -> str:
        return (
            f"training diverged at step {self.global_step}: {what}; {done}, the last good checkpoint is kept "
            "(lower the learning rate, enable gradient clipping or z-loss, or use bf16)"
        )

    # ---- train logging ----

    def _reset_window(self) -> None:
        self._window = {"loss": 0.0, "z": 0.0, "targets": 0, "tokens": 0, "flops": 0.0}
        self._window_start = time.perf_counter()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Straight to the loggers (rank zero only), at exactly this step, and into the loss history."""
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, "train/tokens": float(self.tokens_seen), **metrics})

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the logging happens here rather than in on_train_batch_end because checkpoint callbacks save in
        # on_train_batch_end before the module's hook runs: the saved state must include this step's row
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses
        super().optimizer_step(*args, **kwargs)
        self._check_stuck()
        self._last_lr = lr
        if not self._logging_step():
            return
        self._log_window(self.global_step + 1, lr)  # Lightning advances its step counter after this hook returns

    def _log_final_window(self) -> None:
        """At the end of training: the row of the steps since the last logged one (every rank calls this: the
        window's sums are reduced), unless the last step was logged already."""
        step = self.global_step
        if step == 0 or any(r["step"] == step and "train/loss" in r for r in self.history):
            return
        self._grad_norm = self._last_grad_norm
        self._log_window(step, self._last_lr)

    def _log_window(self, step: int, lr: float) -> None:
        """Log the steps since the last logged one as the row of `step`, and start a new window."""
        w = self._window
        sums = torch.tensor([w["loss"], w["z"], w["targets"], w["tokens"], w["flops"]], dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        loss_sum, z_sum, targets, tokens, flops = sums.tolist()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        self.tokens_seen += int(targets)
        loss = loss_sum / max(targets, 1)
        metrics = {
            "train/loss": loss,
            "train/ppl": math.exp(min(loss, 50.0)),
            "train/z_loss": z_sum / max(targets, 1),
            "train/tokens": float(self.tokens_seen),
        }
        grad_norm = self._grad_norm
        if grad_norm is None and hasattr(self.trainer.model, "get_global_grad_norm"):  # DeepSpeed keeps it
            grad_norm = self.trainer.model.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self._log(metrics, step)
        self.history[-1]["train/lr"] = lr  # the loss history's `lr` column; LearningRateMonitor logs it
        # throughput is logged but kept out of the history, which must not depend on the machine's speed
        speed = {f"train/{k}": v for k, v in self._speed(tokens, flops, elapsed).items()}
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(speed, step=step)
        self._progress = {"loss": loss, "tok/s": speed["train/tokens_per_s"]}
        self._grad_norm = None
        self._reset_window()

    def _speed(self, tokens: float, flops: float, seconds: float) -> dict[str, float]:
        """tokens_per_s, flops_per_s and (with a known peak) mfu of all devices together."""
        seconds = max(seconds, 1e-9)
        speed = {"tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds}
        if self.settings.peak_flops:
            speed["mfu"] = flops / seconds / (self.settings.peak_flops * self.trainer.world_size)
        return speed

    def on_train_end(self) -> None:
        """The row of the steps since the last logged one, then the whole-run averages: every token and FLOP this
        process trained on (summed over ranks once, here) over its training time without validation; a resumed run
        counts from its resume."""
        self._log_final_window()
        if self._run_start is None:
            return
        seconds = time.perf_counter() - self._run_start - self._excluded_s
        sums = torch.tensor(self._run, dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        tokens, flops = sums.tolist()
        self.run_speed = self._speed(tokens, flops, seconds)

    # ---- validation ----

    def on_validation_epoch_start(self) -> None:
        # validation must not move the random streams training draws from (LSH hashing draws in eval too),
        # so an interrupted run that resumes makes exactly the same draws as one that never stopped
        self._val_start = time.perf_counter() if self.trainer.state.fn == "fit" else None  # not trainer.validate()
        self._val_rng = rng_states()
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ce_sum, _, count = token_losses(self(batch), batch["labels"])
        self._val_sums += torch.stack([ce_sum.double(), count.double()])

    def on_validation_epoch_end(self) -> None:
        if self._val_start is not None:  # inside fit: validation time is not training time
            spent = time.perf_counter() - self._val_start
            self._excluded_s += spent
            self._window_start += spent
            self._val_start = None
        sums = self._val_sums
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss_sum, count = sums.tolist()
        if self._val_rng is not None:
            set_rng_states(self._val_rng)
            self._val_rng = None
        if count == 0 or self.trainer.sanity_checking:
            return
        loss = loss_sum / count
        metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        self._log(metrics, self.global_step)
        self.last_val = metrics

    # ---- checkpointed state beyond weights, optimizer and scheduler ----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["training_state"] = {
            "tokens_seen": self.tokens_seen,
            "history": list(self.history),
            "window": dict(self._window),
            "rng": rng_states(),
            "divergence_streak": self.divergence_streak,
            "last_step": {"lr": self._last_lr, "grad_norm": self._last_grad_norm},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("training_state")
        if not state:
            return
        self.tokens_seen = state["tokens_seen"]
        self.history = list(state["history"])
        self._window = dict(state["window"])
        self._pending_rng = state["rng"]
        self.divergence_streak = int(state.get("divergence_streak", 0))
        last = state.get("last_step", {})
        self._last_lr, self._last_grad_norm = float(last.get("lr", 0.0)), last.get("grad_norm")

    def on_train_start(self) -> None:
        # restore the random states last: Lightning seeds, builds and (for DeepSpeed) loads everything before this
        if self._pending_rng is not None:
            set_rng_states(self._pending_rng)
            self._pending_rng = None
        self._window_start = self._run_start = time.perf_counter()
        self._run, self._excluded_s = [0, 0.0], 0.0
