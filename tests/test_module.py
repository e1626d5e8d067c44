"""The shared LightningModule: loss with padding ignored, z-loss, optimizers, schedules, logging, NaN guard."""

from __future__ import annotations

import math
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from models import build_model, config_class
from pipeline.data.datamodule import token_losses
from pipeline.data.objectives import IGNORE_INDEX
from pipeline.training.module import NonFiniteLossError, OptimSettings, Seq2SeqLM, build_optimizer, lr_factor
from tests.train_project import MODELS

VOCAB = 256


def tiny(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = {k: v for k, v in MODELS[family].items() if k not in ("preset", "family")}
    overrides = fields | {"vocab_size": VOCAB} | extra
    return build_model(family, config_class(family).from_preset("tiny", **overrides))


def seq2seq_batch(b: int = 4, s: int = 16, t: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(3, VOCAB, (b, t), generator=g)
    target_mask = torch.ones(b, t, dtype=torch.bool)
    target_mask[0, t // 2 :] = False  # one padded target row
    return {
        "input_ids": torch.randint(3, VOCAB, (b, s), generator=g),
        "attention_mask": torch.ones(b, s, dtype=torch.bool),
        "decoder_input_ids": torch.cat([torch.zeros(b, 1, dtype=torch.long), targets[:, :-1]], 1),
        "decoder_attention_mask": torch.ones(b, t, dtype=torch.bool),
        "labels": targets.masked_fill(~target_mask, IGNORE_INDEX),
    }


# ------------------------------------------------------------------------------------------------- loss


def test_token_losses_ignore_padding_exactly():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = IGNORE_INDEX
    ce_sum, z_sum, count = token_losses(logits, labels)
    keep = labels != IGNORE_INDEX
    assert int(count) == int(keep.sum()) == 8
    expected = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(ce_sum, expected)
    torch.testing.assert_close(z_sum, (torch.logsumexp(logits[keep], -1) ** 2).sum())
    # changing logits at ignored positions changes nothing
    logits2 = logits.clone()
    logits2[1, 3:] += 100.0
    torch.testing.assert_close(token_losses(logits2, labels)[0], ce_sum)


def test_z_loss_enters_the_training_loss():
    model = tiny("t5", dropout_rate=0.0)
    batch = seq2seq_batch()
    plain = Seq2SeqLM(model, OptimSettings(z_loss=0.0))
    with_z = Seq2SeqLM(model, OptimSettings(z_loss=0.1))
    ce, z, _ = plain._losses(batch)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    for m in (plain, with_z):
        m.trainer = trainer
    loss_plain = plain.training_step(batch, 0)
    loss_z = with_z.training_step(batch, 0)
    torch.testing.assert_close(loss_plain, ce)
    torch.testing.assert_close(loss_z, ce + 0.1 * z)
    assert float(z.detach()) > 0


# ------------------------------------------------------------------------------------ optimizer, schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_schedules_warm_up_linearly_then_follow_their_shape(schedule):
    warmup, total, floor = 10, 100, 0.1
    f = [lr_factor(s, schedule, warmup, total, floor) for s in range(total + 1)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert max(f) == pytest.approx(1.0)
    after = f[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:], strict=False))  # never increases after warmup
    if schedule in ("cosine", "linear"):
        assert f[warmup] == pytest.approx(1.0)
        assert f[total] == pytest.approx(floor)
        assert f[(warmup + total) // 2] == pytest.approx((1 + floor) / 2)  # both pass the midpoint there
    elif schedule == "inverse_sqrt":
        assert f[4 * warmup - 1] == pytest.approx(0.5)  # 1/sqrt(step) scaled to 1 at the end of warmup
    else:
        assert set(after) == {1.0}


def test_adamw_decays_matrices_only_and_adafactor_builds():
    model = tiny("t5")
    opt = build_optimizer(model, OptimSettings(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for p in model.parameters():
        assert (id(p) in decayed) == (p.ndim >= 2)
    assert isinstance(build_optimizer(model, OptimSettings(name="adafactor")), torch.optim.Adafactor)


# ------------------------------------------------------------------------------------------ training


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class Recorder(L.pytorch.loggers.logger.Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name = "recorder"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


def fit(
    family: str, steps: int, settings: OptimSettings, clip: float = 1.0, accumulate: int = 1, batch=None, **trainer_kw
):
    model = tiny(family, dropout_rate=0.0)
    module = Seq2SeqLM(model, settings)
    fixed = batch or seq2seq_batch(s=32 if family == "reformer" else 16)
    loader = torch.utils.data.DataLoader(Batches([fixed] * (steps * accumulate)), batch_size=None)
    recorder = Recorder()
    val = trainer_kw.pop("val", None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=recorder,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
        **trainer_kw,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    return module, recorder


@pytest.mark.parametrize("family", ["t5", "reformer"])
def test_loss_falls_and_metrics_are_logged_every_n_steps(family):
    settings = OptimSettings(lr=1e-2, warmup_steps=0, schedule="constant", max_steps=12, log_every_n_steps=3)
    module, recorder = fit(family, 12, settings)
    train_rows = [r for r in module.history if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.5  # memorising one batch
    logged = {k for _, m in recorder.rows for k in m}
    for name in ("train/loss", "train/ppl", "train/grad_norm", "train/tokens_per_s", "train/tokens"):
        assert name in logged
    assert not any(k.startswith("train/lr") for k in logged)  # LearningRateMonitor's (the stage adds it)
    assert {s for s, _ in recorder.rows} == {3, 6, 9, 12}
    row = train_rows[-1]
    assert row["train/ppl"] == pytest.approx(math.exp(row["train/loss"]))
    assert row["train/tokens"] == 12 * int((seq2seq_batch()["labels"] != IGNORE_INDEX).sum())


def test_learning_rate_follows_the_schedule_and_accumulation_counts_optimizer_steps():
    settings = OptimSettings(lr=1e-3, warmup_steps=2, schedule="cosine", max_steps=5, log_every_n_steps=1)
    module, _ = fit("t5", 5, settings, accumulate=2)
    lrs = [r["train/lr"] for r in module.history if "train/lr" in r]
    expected = [1e-3 * lr_factor(s, "cosine", 2, 5, 0.1) for s in range(5)]
    assert lrs == pytest.approx(expected)


def test_learning_rate_monitor_logs_each_group_as_train_lr():
    """Lightning's LearningRateMonitor (the stage's callback) logs train/lr/decay and train/lr/no_decay through the
    logger: at Lightning's step s (steps done before), the rate optimizer step s uses, which the loss history records
    at step s + 1."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    settings = OptimSettings(lr=1e-3, warmup_steps=2, schedule="cosine", max_steps=6, log_every_n_steps=2)
    module, recorder = fit(
        "t5", 6, settings, accumulate=2, callbacks=[LearningRateMonitor(logging_interval="step")], log_every_n_steps=2
    )
    logged: dict[str, dict[int, float]] = {}
    for step, metrics in recorder.rows:
        for key, value in metrics.items():
            if key.startswith("train/lr"):
                logged.setdefault(key, {})[step] = value
    assert set(logged) == {"train/lr/decay", "train/lr/no_decay"}
    expected = {s: 1e-3 * lr_factor(s, "cosine", 2, 6, 0.1) for s in (1, 3, 5)}
    for values in logged.values():
        assert values == pytest.approx(expected)
    history = {r["step"]: r["train/lr"] for r in module.history if "train/lr" in r}
    assert history == pytest.approx({s + 1: v for s, v in expected.items()})


class _Slow(L.Callback):
    """Sleeps before the training batches from `after` on, and in every validation batch."""

    def __init__(self, after: int, train_s: float, val_s: float):
        self.after, self.train_s, self.val_s, self.slept = after, train_s, val_s, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.after:
            time.sleep(self.train_s)

    def on_validation_batch_start(self, *args, **kwargs):
        time.sleep(self.val_s)
        self.slept += self.val_s


def test_whole_run_speed_is_the_whole_run_without_validation():
    """`run_speed` (what the stage writes to training.json) averages every step of the run, not the last window,
    and leaves validation time out; the logged windows leave it out too."""
    batch = seq2seq_batch()
    tokens_per_batch = int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
    settings = OptimSettings(lr=1e-3, warmup_steps=0, schedule="constant", max_steps=8, log_every_n_steps=4)
    slow = _Slow(after=4, train_s=1.0, val_s=1.5)
    val = torch.utils.data.DataLoader(Batches([batch] * 2), batch_size=None)
    start = time.perf_counter()
    module, recorder = fit(
        "t5", 8, settings, batch=batch, callbacks=[slow], val=val, val_check_interval=4, num_sanity_val_steps=0
    )
    wall = time.perf_counter() - start
    assert slow.slept == 6.0  # 2 batches validated after steps 4 and 8
    total = 8 * tokens_per_batch
    run = module.run_speed["tokens_per_s"]
    windows = [m["train/tokens_per_s"] for _, m in recorder.rows if "train/tokens_per_s" in m]
    assert len(windows) == 2 and windows[1] < windows[0]  # the second window has the slow steps
    assert windows[1] < run < windows[0]  # the whole run lies between its windows: not the last one
    assert total / (wall - slow.slept) <= run <= total / 4.0  # training time only, validation left out
    # the second window (steps 5-8) holds 4 s of slow steps and the 3 s validation after step 4, left out
    assert windows[1] > 4 * tokens_per_batch / 6.0
    assert "mfu" not in module.run_speed  # no peak FLOP/s on CPU


def test_gradient_norm_is_measured_before_clipping():
    settings = OptimSettings(lr=1e-3, warmup_steps=0, schedule="constant", max_steps=2, log_every_n_steps=1)
    module, _ = fit("t5", 2, settings, clip=1e-3)
    norms = [r["train/grad_norm"] for r in module.history if "train/grad_norm" in r]
    assert len(norms) == 2 and all(n > 1e-3 for n in norms)


def test_non_finite_loss_stops_with_a_clear_error():
    batch = seq2seq_batch()
    settings = OptimSettings(lr=1e-3, warmup_steps=0, schedule="constant", max_steps=3, log_every_n_steps=1)
    model = tiny("t5")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    module = Seq2SeqLM(model, settings)
    loader = torch.utils.data.DataLoader(Batches([batch] * 3), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="diverged at step 0: the loss is nan"):
        trainer.fit(module, train_dataloaders=loader)
