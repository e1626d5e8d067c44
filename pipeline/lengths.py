"""Stage `lengths@<variant>-<seed>`: quality versus sequence length at matched compute (issue 10, item 5).

    python -m pipeline.lengths --model <variant> --seed <seed>

For every length L of `lengths.seq_lengths` (shortest first), a fresh copy of the variant's pretrained model of
the same seed (`lengths.init`) is fine-tuned on a long-range task whose expressions are scaled to fill L
(`lengths.task`, `lengths.fill`), under the same compute budget for every variant (`lengths.budget`):

- `flops`: the run takes floor(budget / FLOPs of one step) optimizer steps, the FLOPs of a step coming from the
  model's own accounting (`model.training_flops(batch, L, target_length)`, the padded shapes the collator
  builds), so a cheaper model at a length gets more steps for the same compute; deterministic on CPU;
- `seconds`: the run trains until that much wall-clock has passed (machine- and load-dependent).

Training is the pipeline's one training loop: `pipeline.module.Seq2SeqLM` under a Lightning `Trainer` on the
`pipeline.datamodule` batches, from the model `pipeline.train.initial_model` loads; the budget only sets where
it stops (`Budget`). Then the test examples (the same for every run: they depend on the params' `seed`) are
decoded greedily with `pipeline.evaluate.generate_texts` and scored per example (`pipeline.tasks`), next to the
task's trivial baselines, for `compare` to bootstrap over.

Per length the stage records accuracy, baselines, steps, tokens, FLOPs per step and per token, the budget spent,
training seconds, measured tokens/s (input positions per second of training, padding included) and peak memory
(GPU: the peak allocated during that length; CPU: the process's peak resident size so far, `ru_maxrss`, which
grows with the length because lengths run shortest first), parameters and the training loss. Examples whose
input tokenizes longer than L are dropped (never truncated: the answer depends on the whole expression) and
counted. The run uses one device (`trainer.accelerator`) in the process DVC starts (`launcher` is not used: on a
cluster, run it on a GPU node); there are no checkpoints: a killed run starts over.

Outputs (paths from `pipeline/config/paths.py`): `metrics/lengths/V-S.json` (DVC metrics, one entry per length; the same
bytes every run with a FLOPs budget), `artifacts/timing/lengths/V-S.json` (training seconds, tokens/s and peak
memory per length: measurements of this machine),
`artifacts/lengths/V/S/` (`examples.json`: every prediction with its score and the baselines, per length;
`history.json`: training loss per logged step), and one MLflow run `lengths@V-S` (tags variant, family, seed,
stage) with the metrics as `lengths/L<length>/<name>` and the output folder as artifacts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pipeline.common import (
    StageError,
    publish,
    raise_if_signalled,
    repo_root,
    require_variant,
    require_writable,
    run_stage,
    stage_parser,
)
from pipeline.config import Config
from pipeline.config.paths import RunPaths
from pipeline.training.budget import budget_at, budget_steps, step_flops

log = logging.getLogger("pipeline.lengths")

STAGE = "lengths"
TOKENIZER_DIR = "data/tokenizer"
TIMING_FIGURES = ("train_seconds", "tokens_per_s", "peak_memory_mb")  # written to the timing file, not the metrics


# ------------------------------------------------------------------------------------------- settings


def length_config(cfg: Config, length: int) -> Config:
    """`cfg` as the shared training and decoding code reads it for one length: the task at this length in
    `finetune` (with the stage's init, batch, optimizer and target length) and greedy decoding in `evaluate`."""
    s = cfg.lengths
    finetune = cfg.finetune.model_copy(
        update={
            "init": s.init,
            "checkpoint_dir": None,
            "tasks": {s.task: s.task_options_at(length)},
            "input_length": length,
            "target_length": s.target_length,
            "batch_size": s.batch_size,
            "optimizer": s.optimizer,
            "log_every_n_steps": s.log_every_n_steps,
            "z_loss": 0.0,
        }
    )
    evaluate = cfg.evaluate.model_copy(
        update={"batch_size": s.eval_batch_size, "max_new_tokens": s.max_new_tokens, "num_beams": [1]}
    )
    return Config(cfg.params.model_copy(update={"finetune": finetune, "evaluate": evaluate}), cfg.source)


def with_dropout(family: str, model: torch.nn.Module, rate: float) -> torch.nn.Module:
    """`model` rebuilt with `dropout_rate` = `rate` and its weights, in training mode. The random state is restored
    after the build, so training draws what it would have drawn from a model configured with `rate` from the start
    (dropout holds no weights: the initial weights are the same either way)."""
    import dataclasses

    import models

    if model.config.dropout_rate == rate:
        return model
    with torch.random.fork_rng(devices=[]):
        rebuilt = models.build_model(family, dataclasses.replace(model.config, dropout_rate=rate))
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt.to(next(model.parameters()).device).train()


# ------------------------------------------------------------------------------------------------ data


@dataclass
class LengthData:
    """The task's examples at one length that fit in it, tokenized, and how many did not fit."""

    train: list[Any]
    train_ids: list[tuple[list[int], list[int]]]
    test: list[Any]
    dropped: dict[str, int]


def length_data(cfg: Config, length: int, tokenizer: Any) -> LengthData:
    """Train and test examples of the task at `length` (the params' `seed`: the same for every run), keeping
    those whose input fits in `length` tokens; test examples are capped at `lengths.eval_examples`."""
    from pipeline.data.tasks import build_examples

    s = cfg.lengths
    tasks = {s.task: s.task_options_at(length)}
    kept: dict[str, tuple[list[Any], list[list[int]]]] = {}
    dropped: dict[str, int] = {}
    for split in ("train", "test"):
        examples = build_examples(tasks, split, cfg.seed)[s.task]
        ids = tokenizer.encode([e.inputs for e in examples])
        fits = [i for i, row in enumerate(ids) if len(row) <= length]
        dropped[split] = len(examples) - len(fits)
        kept[split] = ([examples[i] for i in fits], [ids[i] for i in fits])
    train, train_inputs = kept["train"]
    test = kept["test"][0][: s.eval_examples]
    if not train or not test:
        raise StageError(
            f"lengths: no {s.task} example fits in {length} tokens ({dropped} dropped); lower lengths.fill"
        )
    targets = tokenizer.encode([e.targets for e in train])
    return LengthData(train, list(zip(train_inputs, targets, strict=True)), test, dropped)


# -------------------------------------------------------------------------------------------- training


class Budget(L.Callback):
    """Times the training (from its first to its last step) and, with `seconds`, stops it once that much training
    time has passed. (A FLOPs budget is a step count: the Trainer's `max_steps`.)"""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.start = 0.0
        self.elapsed = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.elapsed = time.perf_counter() - self.start
        if self.seconds is not None and self.elapsed >= self.seconds:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.elapsed = time.perf_counter() - self.start


def _peak_memory_start(accelerator: str) -> None:
    if accelerator == "gpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb(accelerator: str) -> float:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_at_length(
    cfg: Config,
    variant: str,
    seed: int,
    length: int,
    index: int,
    root: Path,
    tokenizer: Any,
    data: LengthData,
    scratch: Path,
) -> tuple[torch.nn.Module, dict[str, Any], list[dict[str, float]]]:
    """Fine-tune a fresh copy of the starting model at `length` under the budget; (model, figures, loss history)."""
    from pipeline.data.datamodule import Collator, TextToTextDataset
    from pipeline.data.mixture import Mixture
    from pipeline.training import strategy
    from pipeline.training.budget import padded_vocab_size
    from pipeline.training.callbacks import ProgressBar, SamplerPosition, TrainDataModule
    from pipeline.training.module import OptimSettings, Seq2SeqLM, peak_flops_per_device
    from pipeline.training.train import initial_model

    s = cfg.lengths
    lcfg = length_config(cfg, length)
    L.seed_everything(seed, workers=True, verbose=False)  # the same start at every length, whatever ran before
    model, source = initial_model(lcfg, "finetune", variant, seed, root, padded_vocab_size(tokenizer.vocab_size))
    if s.dropout is not None:
        model = with_dropout(cfg.family(variant), model, s.dropout)
    layout = getattr(model.config, "layout", "encoder_decoder")
    limit = getattr(model.config, "max_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit and length + (s.target_length if layout != "encoder_decoder" else 0) > limit:
        raise StageError(
            f"lengths.seq_lengths: {length} tokens exceed the {limit} positions of models.{variant}; raise its "
            "max_position_embeddings/axial_pos_shape or drop the length"
        )
    per_step = step_flops(cfg.family(variant), model.config, s.batch_size, length, s.target_length)
    budget = budget_at(s, index, padded_vocab_size(tokenizer.vocab_size))  # the reference model's vocabulary
    if s.budget.kind == "flops":
        steps = budget_steps(budget, per_step)
        if steps < s.budget.min_steps:  # validated with the params; here the tokenizer's real vocabulary decides
            raise StageError(
                f"lengths.budget: {budget:.3g} FLOPs buys {variant} {steps} step(s) at length {length} ({per_step:.3g} "
                f"FLOPs each), fewer than lengths.budget.min_steps {s.budget.min_steps}; raise lengths.budget.steps"
            )
        max_steps = steps
    else:
        max_steps = 10**9  # the clock stops it
    accelerator = strategy.resolve_accelerator(cfg)
    settings = OptimSettings.from_section(
        lcfg.finetune.model_copy(update={"max_steps": max_steps}),
        peak_flops=peak_flops_per_device(),
        divergence=cfg.trainer.divergence,
    )
    module = Seq2SeqLM(model, settings)
    name = s.task
    train = TextToTextDataset(Mixture({name: data.train}, {name: 1.0}, cfg.seed), {name: data.train_ids})
    collate = Collator(layout, input_length=length, target_length=s.target_length)
    datamodule = TrainDataModule(train, None, collate, s.batch_size, seed, cfg.trainer.num_workers)
    clock = Budget(budget if s.budget.kind == "seconds" else None)
    callbacks: list[Any] = [SamplerPosition(), clock]
    if cfg.trainer.progress_bar:
        callbacks.append(ProgressBar(refresh_rate=max(1, s.log_every_n_steps)))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        num_nodes=1,
        precision=cfg.trainer.precision,
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=scratch,  # Lightning's own files, if any, never land among the stage's outputs
    )
    _peak_memory_start(accelerator)
    trainer.fit(module, datamodule=datamodule)
    if trainer.interrupted:
        raise KeyboardInterrupt
    raise_if_signalled()  # one Lightning recorded but did not act on (it arrived after the last step)
    peak_mb = _peak_memory_mb(accelerator)
    done = trainer.global_step
    seconds = max(clock.elapsed, 1e-9)
    history = [{"step": r["step"], "loss": r["train/loss"]} for r in module.history if "train/loss" in r]
    figures = {
        "init": source,
        "budget": budget,
        "steps": done,
        "examples_seen": done * s.batch_size,
        "input_tokens": done * s.batch_size * length,
        "flops_per_step": per_step,
        "flops_per_token": per_step / (s.batch_size * length),
        "flops": per_step * done,
        "train_seconds": seconds,
        "tokens_per_s": done * s.batch_size * length / seconds,
        "peak_memory_mb": peak_mb,
        "train_loss": history[-1]["loss"] if history else None,
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(non_embedding=True),
    }
    return module.model.eval(), figures, history


# ---------------------------------------------------------------------------------------------- scoring


class OnDevice:
    """A trained model seen by `generate_texts` (which builds its batches on the CPU): inputs go to the model's
    device and generations come back, so decoding runs where the model trained."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model.generate(input_ids.to(self.device), attention_mask=mask, **kw).cpu()


def score_at_length(
    cfg: Config, length: int, model: torch.nn.Module, tokenizer: Any, data: LengthData
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Greedy answers to the test examples, per-example scores and the trivial baselines: (metrics, examples)."""
    from pipeline.data.task_metrics import baselines, example_scores
    from pipeline.data.tasks import get_task
    from pipeline.evaluate import generate_texts
    from pipeline.report.stats import constant_predictions

    task = get_task(cfg.lengths.task)
    inputs, refs = [x.inputs for x in data.test], [x.targets for x in data.test]
    with torch.no_grad():
        predictions = generate_texts(OnDevice(model), tokenizer, inputs, 1, length_config(cfg, length))
    scores = example_scores(task.metric, predictions, refs)
    trivial = baselines(task, data.train, data.test)
    metrics = {
        task.metric: float(sum(scores) / len(scores)),
        "test_examples": len(scores),
        "constant_predictions": bool(constant_predictions(predictions)),
        **{f"baseline_{k}": v for k, v in trivial.items()},
    }
    examples = {
        "metric": task.metric,
        "references": refs,
        "baselines": trivial,
        "predictions": predictions,
        "scores": scores,
        "samples": [
            {"input": inputs[i], "reference": refs[i], "prediction": predictions[i]} for i in range(min(3, len(refs)))
        ],
    }
    return metrics, examples


# ----------------------------------------------------------------------------------------------- stage


def run(cfg: Config, variant: str, seed: int, root: Path) -> dict[str, Any]:
    """Every length of one variant and seed; writes the outputs and the MLflow run; returns the metrics."""
    from pipeline.console import quiet_libraries
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.tracking.runs import check_tracking_uri, close_stale_runs, tracking_uri

    require_variant(cfg, variant, seed)
    quiet_libraries()
    start = time.perf_counter()
    paths = RunPaths(root, STAGE, variant, seed)
    if cfg.launcher.kind != "local":
        log.warning(
            "%s: runs here, in the process DVC started, on one device; launcher.kind %s is not used by this stage "
            "(run `dvc repro` for it on a GPU node)",
            paths.dvc_stage(),
            cfg.launcher.kind,
        )
    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)  # fail fast
    require_writable(paths.out, paths.metrics, paths.timing)  # fail fast, not after the training
    close_stale_runs(uri, cfg.mlflow.experiment, {"stage": STAGE, "variant": variant, "seed": str(seed)})
    tokenizer = Tokenizer.load(root / TOKENIZER_DIR)
    s = cfg.lengths
    log.info(
        "%s: %d lengths; this stage keeps no checkpoints: if it is interrupted, its next run starts over",
        paths.dvc_stage(),
        len(s.seq_lengths),
    )
    per_length: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, float]] = {}  # measurements of this machine, apart from the reproducible metrics
    examples: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    for index, length in enumerate(s.seq_lengths):
        raise_if_signalled()  # never start another length after a signal, wherever it was caught
        t0 = time.perf_counter()
        data = length_data(cfg, length, tokenizer)
        t_data = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as scratch:
            model, figures, history = train_at_length(
                cfg, variant, seed, length, index, root, tokenizer, data, Path(scratch)
            )
        t_eval = time.perf_counter()
        model.to(_device(cfg))  # Lightning hands the model back on the CPU; decode where it trained
        torch.manual_seed(seed)  # LSH rotations drawn while decoding
        metrics, examples[str(length)] = score_at_length(cfg, length, model, tokenizer, data)
        t_eval = time.perf_counter() - t_eval
        timings[str(length)] = {k: figures.pop(k) for k in TIMING_FIGURES}
        timings[str(length)]["seconds"] = time.perf_counter() - t0
        metrics.update(figures)
        metrics["train_examples"] = len(data.train)
        metrics["dropped_too_long"] = data.dropped
        per_length[str(length)] = metrics
        histories[str(length)] = history
        metric = examples[str(length)]["metric"]
        log.info(
            "%s length %d: %s %.3f (majority %.3f), %d steps, %.3g FLOPs, %.1f s training, %.0f tokens/s; "
            "%.1f s in all (data %.1f s, decoding %.1f s)",
            paths.dvc_stage(), length, metric, metrics[metric], metrics.get("baseline_majority", float("nan")),
            figures["steps"], figures["flops"], timings[str(length)]["train_seconds"],
            timings[str(length)]["tokens_per_s"],
            time.perf_counter() - t0, t_data, t_eval,
        )  # fmt: skip
        del model
    result = {
        "task": s.task,
        "metric": next(iter(examples.values()))["metric"],
        "budget_kind": s.budget.kind,
        "device": _device_name(cfg),
        "memory_method": _memory_method(cfg),
        "lengths": per_length,
    }
    with publish() as pub:  # outputs, metrics and the MLflow run: together or not at all
        tmp = pub.stage(paths.out)
        tmp.mkdir(parents=True)
        (tmp / "examples.json").write_text(json.dumps(examples, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "history.json").write_text(json.dumps(histories) + "\n", encoding="utf-8")
        pub.write_json(paths.metrics, result)
        timing = {"lengths": timings, "memory_method": result.pop("memory_method")}
        pub.write_json(paths.timing, timing)
        log_to_mlflow(cfg, paths, result, histories, root, tmp, timing)
    log.info("%s done in %.0f s", paths.dvc_stage(), time.perf_counter() - start)
    return result


def _device(cfg: Config) -> torch.device:
    from pipeline.training import strategy

    gpu = strategy.resolve_accelerator(cfg) == "gpu" and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def _device_name(cfg: Config) -> str:
    from pipeline.training import strategy

    if strategy.resolve_accelerator(cfg) == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def _memory_method(cfg: Config) -> str:
    from pipeline.training import strategy

    if strategy.resolve_accelerator(cfg) == "gpu" and torch.cuda.is_available():
        return "peak GPU memory allocated while training at this length"
    return "peak resident memory of the process up to this length (ru_maxrss; lengths run shortest first)"


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """`lengths/L<length>/<name>` for every number recorded at every length."""
    out = {}
    for length, metrics in result["lengths"].items():
        for key, value in metrics.items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, int | float) and math.isfinite(value):
                out[f"lengths/L{length}/{key}"] = float(value)
    return out


def log_to_mlflow(
    cfg: Config,
    paths: RunPaths,
    result: dict[str, Any],
    histories: dict[str, list[dict[str, float]]],
    root: Path,
    artifacts: Path,
    timing: dict[str, Any] | None = None,
) -> None:
    """One run `lengths@<variant>-<seed>`: the params the stage reads, the metrics and timings, the loss per length,
    the outputs."""
    from pipeline.tracking import logged as mlflow_logging
    from pipeline.tracking.runs import TrackedRun, git_revision, tracked_run, tracking_uri

    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    run = TrackedRun(uri, cfg.mlflow.experiment, system_metrics=False)
    family = cfg.family(paths.variant)
    tags = {
        "variant": paths.variant,
        "family": family,
        "seed": str(paths.seed),
        "stage": STAGE,
        "git_revision": git_revision(root),
    }
    tags.update(mlflow_logging.context_tags(uri, cfg.mlflow.experiment, tags["git_revision"], paths.seed, cfg.preset))
    with tracked_run(run, paths.dvc_stage(), tags):
        run.log_params(mlflow_logging.stage_params(cfg.to_dict(), STAGE, paths.variant, paths.seed, root))
        run.log_params(
            {
                **mlflow_logging.runtime_params(),
                "lengths.device": result["device"],
            }
        )
        run.log_metrics(mlflow_metrics(result))
        if timing:
            run.log_metrics(mlflow_metrics(timing))
        for length, rows in histories.items():
            for row in rows:
                run.log_metrics({f"lengths/L{length}/train_loss_curve": row["loss"]}, step=int(row["step"]))
        run.log_artifacts(artifacts, STAGE)


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    return run(cfg, args.model, args.seed, repo_root())


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("Quality versus sequence length at matched compute, one variant and seed.", per_run=True)
    return run_stage(body, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
