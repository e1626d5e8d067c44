"""What the `pretrain` and `finetune` stages share: model, data, Trainer, checkpoints, MLflow, outputs.

`python -m pipeline.<stage> --model V --seed S` (stage `pretrain` or `finetune`, V a variant of `models:` in
params.yaml, S a seed) writes, with paths from `pipeline/config/paths.py`:

- `artifacts/<stage>/V/S/final/`: `model.safetensors` + `config.json` (`models.save_pretrained`, loadable with
  `models.load_pretrained` without DeepSpeed or pickle);
- `artifacts/timing/<stage>/V-S.json`: wall time, throughput, MFU, whether the run resumed, the MLflow run id
  (measurements of this machine, kept apart from the reproducible outputs);
- `checkpoints/<stage>/V/S/`: resumable Lightning checkpoints (`last.ckpt`, a file, or a directory under
  DeepSpeed) and `run.json` (fingerprint of what is trained, MLflow run id, `completed`); not a DVC output.
  Re-running the stage after a kill resumes from `last.ckpt` when the fingerprint matches; a finished run or
  other params start over;
- `metrics/<stage>/V-S.json`: DVC metrics (`steps`, `tokens`, `train_loss`, `val_loss`, `val_ppl`,
  `unigram_entropy` (pretrain: nats per token of the training split's unigram distribution), `parameters`,
  `non_embedding_parameters`, `epochs`); deterministic on CPU, so an interrupted-and-resumed run writes the
  same file as an uninterrupted one (timings live in `artifacts/timing/`);
- `metrics/<stage>/V-S-train.csv`: loss history, one row per logged step, columns
  `step,tokens,loss,ppl,z_loss,lr,grad_norm`;
- `metrics/<stage>/V-S-val.csv`: one row per validation, columns `step,tokens,loss,ppl`.
  (`tokens` counts target tokens trained on so far, all processes; losses are nats per target token.)

The seed S sets the initialisation, the order and corruption noise of the training data and the LSH
rotations; the data split, the tokenizer, the validation examples and the task examples depend only on the
params' `seed`, so every run of every variant is scored on the same examples.

Only global rank zero writes outputs and talks to MLflow; every rank runs the same code otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment

import models
from pipeline.common import (
    CorruptFileError,
    Publication,
    StageError,
    check_checkpoint,
    hold_lock,
    load_model_dir,
    publish,
    raise_if_signalled,
    read_json,
    repo_root,
    require_variant,
    require_writable,
    write_json,
)
from pipeline.config import Config
from pipeline.config.paths import RunPaths
from pipeline.console import quiet_libraries
from pipeline.data.datamodule import (
    Collator,
    PretrainDataset,
    document_arrays,
    load_tokenized,
    mixture_datasets,
    unigram_entropy,
    val_items,
)
from pipeline.tracking import logged as mlflow_logging
from pipeline.tracking.runs import TrackedRun, check_tracking_uri, git_revision, params_hash, tracked_run, tracking_uri
from pipeline.training import liveness, strategy
from pipeline.training.budget import padded_vocab_size
from pipeline.training.callbacks import (
    PREVIOUS_NAME,
    MlflowMetrics,
    ProgressBar,
    SamplerPosition,
    StepCheckpoint,
    TrainDataModule,
)
from pipeline.training.module import OptimSettings, Seq2SeqLM, peak_flops_per_device

log = logging.getLogger("pipeline")

TOKENIZER_DIR = "data/tokenizer"
TOKENIZED_DIR = "data/tokenized"
TRAIN_COLUMNS = ["step", "tokens", "loss", "ppl", "z_loss", "lr", "grad_norm"]
VAL_COLUMNS = ["step", "tokens", "loss", "ppl"]
# trainer keys outside the resume fingerprint: how a run is guarded, shown or threaded, not what it computes
RUN_INDEPENDENT = ("progress_bar", "threads", "divergence", "on_corrupt_checkpoint")


StagePaths = RunPaths  # the name older callers use


def read_tokenizer_info(root: Path) -> dict[str, Any]:
    return read_json(root / TOKENIZER_DIR / "tokenizer.json", "run the tokenize stage (dvc repro tokenize)")


# ------------------------------------------------------------------------------------------------- model


def initial_model(
    cfg: Config, stage: str, variant: str, seed: int, root: Path, vocab_size: int
) -> tuple[torch.nn.Module, str]:
    """The model training starts from, and a description of where it came from."""
    family = cfg.family(variant)
    if stage == "finetune" and cfg.finetune.init == "pretrained":
        source = RunPaths(root, "pretrain", variant, seed)
        if not (source.final / models.WEIGHTS_NAME).is_file():
            raise StageError(
                f"{source.final} has no weights: run `dvc repro {source.dvc_stage()}` first (or set finetune.init)"
            )
        loaded_family, model = load_model_dir(source.final, f"re-run `dvc repro {source.dvc_stage()}`")
        if loaded_family != family:
            raise StageError(f"{source.final} holds a {loaded_family} model, but models.{variant} is {family}")
        return model.train(), str(source.final.relative_to(root))
    if stage == "finetune" and cfg.finetune.init == "checkpoint":
        load = models.spec(family).load_checkpoint
        if load is None:
            raise StageError(f"finetune.init 'checkpoint': the {family} family cannot load original checkpoints")
        directory = Path(cfg.finetune.checkpoint_dir).expanduser()
        directory = directory if directory.is_absolute() else root / directory
        if not directory.is_dir():
            raise StageError(f"finetune.checkpoint_dir {directory} does not exist")
        return load(directory).train(), str(directory)
    config = cfg.model_config(variant, vocab_size)
    seeded = models.spec(family).seeded
    return models.build_model(family, seeded(config, seed) if seeded else config), "scratch"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- data


def pretrain_data(
    cfg: Config, layout: str, tok: dict[str, Any], root: Path, seed: int | None = None
) -> tuple[Any, Any, Any, float]:
    """(train dataset, validation dataset, collator, unigram entropy of the train split) for pretraining.

    `seed` (the run's; default the params' `seed`) draws the training examples' noise; validation noise
    depends on the params' `seed` only, so every run is validated on the same examples.
    """
    p = cfg.pretrain
    splits = load_tokenized(root / TOKENIZED_DIR)
    train_docs, val_docs = document_arrays(splits["train"]), document_arrays(splits["validation"])
    span_args = {}
    if p.objective == "span_corruption":
        vocab = int(tok["vocab_size"])
        sentinels = [vocab - 1 - i for i in range(int(tok["num_sentinels"]))]
        span_args = dict(
            noise_density=p.noise_density,
            mean_noise_span_length=p.mean_noise_span_length,
            eos_id=int(tok.get("eos_id", 1)),
            sentinel_ids=sentinels,
        )
    train = PretrainDataset(train_docs, p.objective, p.input_length, cfg.seed if seed is None else seed, **span_args)
    val = PretrainDataset(val_docs, p.objective, p.input_length, cfg.seed + 1, **span_args)
    if len(train) == 0:
        raise StageError(f"the training split is shorter than one sequence of {p.input_length} tokens")
    return train, val, Collator(layout), unigram_entropy(train_docs)


def finetune_data(cfg: Config, layout: str, root: Path) -> tuple[Any, Any, Any, float | None]:
    """(train dataset, validation dataset, collator, None) for the fine-tuning task mixture."""
    from pipeline.data.tokenizer import Tokenizer

    f = cfg.finetune
    tokenizer = Tokenizer.load(root / TOKENIZER_DIR)
    train, val, rates = mixture_datasets(
        f.tasks,
        tokenizer,
        cfg.seed,
        f.mixing,
        f.mixing_temperature,
        f.mixing_cap,
        root / "data" / "prepared",
        input_length=f.input_length,
        target_length=f.target_length,
    )
    log.info("finetune mixing rates: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    return train, val, Collator(layout, input_length=f.input_length, target_length=f.target_length), None


# ------------------------------------------------------------------------------------------------ runs


def fingerprint(cfg: Config, stage: str, variant: str, seed: int, root: Path, init_source: str) -> str:
    """What the checkpoints are a function of: the params the stage reads, the data, and the initial weights."""
    tokenized = root / TOKENIZED_DIR
    data_sig = sorted(
        (str(p.relative_to(tokenized)), p.read_text()) for p in tokenized.glob("*/meta.json") if p.is_file()
    )
    init = init_source
    weights = Path(init_source) if Path(init_source).is_absolute() else root / init_source
    if (weights / models.WEIGHTS_NAME).is_file():
        init = _file_digest(weights / models.WEIGHTS_NAME)
    d = cfg.to_dict()
    return params_hash(
        {
            "stage": stage,
            "variant": variant,
            "seed": [d["seed"], seed],
            "model": d["models"][variant],
            "section": d[stage],
            # how a run is guarded and reported does not change what it computes
            "trainer": {k: v for k, v in d["trainer"].items() if k not in RUN_INDEPENDENT},
            "deepspeed": d["deepspeed"] if cfg.trainer.strategy == "deepspeed" else None,
            "kernels": dataclasses.asdict(models.cpu_kernels()),  # resolved: `auto` may differ between machines
            "data": data_sig,
            "init": init,
        }
    )


def read_run_state(paths: RunPaths) -> dict[str, Any]:
    path = paths.checkpoints / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def resume_point(
    paths: RunPaths,
    current: str,
    on_corrupt: str = "stop",
    act: bool = True,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Path | None:
    """The newest readable checkpoint of an unfinished run of the same fingerprint, else None.

    Candidates, newest first: `last.ckpt`, `previous.ckpt` (the one before, see `StepCheckpoint`) and any
    `hpc_ckpt_<n>.ckpt` an older version left. One that cannot be read (`check_checkpoint`) stops the stage with
    a message naming it (`trainer.on_corrupt_checkpoint: stop`), or is moved aside, kept and renamed
    `<stage dir>/<name>.corrupt-<time>`, and the one before it is tried (`previous`) or training starts over
    (`scratch`). Only the process that may change files (`act`) moves anything.
    """
    state = read_run_state(paths)
    if state.get("fingerprint") != current or state.get("completed"):
        return None
    candidates = [paths.checkpoints / "last.ckpt", paths.checkpoints / PREVIOUS_NAME]
    candidates += paths.checkpoints.glob("hpc_ckpt_*.ckpt")
    existing = sorted((p for p in candidates if p.exists()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for ckpt in existing:
        try:
            check_checkpoint(ckpt, shapes)
            return ckpt
        except CorruptFileError as exc:
            if on_corrupt == "stop":
                raise
            aside = paths.out / f"{ckpt.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            if act:
                ckpt.rename(aside)
            log.warning(f"{exc}\nmoved it aside to {aside} (trainer.on_corrupt_checkpoint: {on_corrupt})")
            if on_corrupt == "scratch":
                return None
    return None


# ------------------------------------------------------------------------------------------------ stage


def run_training(
    cfg: Config, stage: str, variant: str, seed: int, argv: list[str] | None = None
) -> dict[str, Any] | None:
    """Run the `pretrain` or `finetune` stage for one variant and seed; returns the metrics (rank zero) or None."""
    require_variant(cfg, variant, seed)
    root = repo_root()
    paths = RunPaths(root, stage, variant, seed)
    code = _launch_if_needed(cfg, stage, variant, seed, argv)
    if code is not None:
        if code != 0:
            raise StageError(f"the {cfg.launcher.kind} job for {paths.dvc_stage()} failed with exit code {code}")
        return None

    t_start = time.perf_counter()
    quiet_libraries()
    family = cfg.family(variant)
    section = getattr(cfg, stage)
    rank_zero = strategy.is_global_zero()
    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    # rank zero holds the run's lock (with `exclusive`, its tracked run closes this repository's runs of the same
    # stage, variant and seed left RUNNING); the other ranks' runs are inert
    run = TrackedRun(
        uri, cfg.mlflow.experiment, active=rank_zero, system_metrics=cfg.mlflow.system_metrics, exclusive=True
    )
    if rank_zero:  # an unreachable tracking server fails the stage now, not after the training
        check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)
        require_writable(paths.final, paths.metrics, paths.timing, paths.checkpoints / "last.ckpt")
        # one training process per run at a time (DVC locks `dvc repro`; this covers direct runs); then a run an
        # earlier attempt killed with SIGKILL left RUNNING is closed, even if this attempt stops early
        hold_lock(paths.checkpoints.with_name(f"{paths.seed}.lock"), paths.dvc_stage())
        run.close_stale_runs({"stage": stage, "variant": variant, "seed": str(seed)})

    L.seed_everything(seed, workers=True, verbose=False)  # initialisation, dropout, LSH rotations
    tok = read_tokenizer_info(root)
    model, init_source = initial_model(cfg, stage, variant, seed, root, padded_vocab_size(int(tok["vocab_size"])))
    layout = getattr(model.config, "layout", "encoder_decoder")
    recompute = models.spec(family).activation_checkpointing
    if cfg.trainer.activation_checkpointing and recompute is not None:
        recompute(model.config, True)
    if stage == "pretrain":
        train, val, collate, entropy = pretrain_data(cfg, layout, tok, root, seed)
    else:
        train, val, collate, entropy = finetune_data(cfg, layout, root)

    try:
        trainer_kw = strategy.trainer_kwargs(cfg)
    except strategy.StrategyError as exc:
        raise StageError(str(exc)) from None
    world = _world_size(trainer_kw)
    datamodule = TrainDataModule(
        train,
        val_items(val, section.val_batches, section.batch_size, world),
        collate,
        section.batch_size,
        seed,  # data order
        cfg.trainer.num_workers,
    )
    settings = OptimSettings.from_section(
        section, peak_flops=peak_flops_per_device(), divergence=cfg.trainer.divergence
    )
    module = Seq2SeqLM(model, settings)

    # --- checkpoints: resume the unfinished run of the same fingerprint, or start over
    current = fingerprint(cfg, stage, variant, seed, root, init_source)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}  # what a checkpoint of this run holds
    resume = resume_point(paths, current, cfg.trainer.on_corrupt_checkpoint, act=rank_zero, shapes=shapes)
    previous_run_id = read_run_state(paths).get("mlflow_run_id")
    run_state = read_run_state(paths) if resume else {}

    # --- MLflow: a new run, or the one the interrupted attempt left behind
    tags: dict[str, str] = {}
    if rank_zero:
        tags = {
            "variant": variant,
            "family": family,
            "seed": str(seed),
            "stage": stage,
            "git_revision": git_revision(root),
            "params_hash": current,
            "init": init_source,
        }
        if resume is None:
            run.close_stale(previous_run_id)
        tags.update(mlflow_logging.context_tags(uri, cfg.mlflow.experiment, tags["git_revision"], seed, cfg.preset))
    with tracked_run(run, paths.dvc_stage(), tags, resume_run_id=run_state.get("mlflow_run_id")):
        metrics, timing = _train_and_publish(
            cfg, stage, variant, seed, family, paths, module, datamodule, trainer_kw, run, resume, entropy, current,
            t_start, uri, model, train, val,
        )  # fmt: skip
        if not rank_zero:
            return None
    write_json(paths.checkpoints / "run.json", {"fingerprint": current, "mlflow_run_id": run.run_id, "completed": True})
    _summary(metrics, timing, paths, uri, run.run_id)
    return metrics


def _train_and_publish(
    cfg: Config,
    stage: str,
    variant: str,
    seed: int,
    family: str,
    paths: RunPaths,
    module: Seq2SeqLM,
    datamodule: TrainDataModule,
    trainer_kw: dict[str, Any],
    run: TrackedRun,
    resume: Path | None,
    entropy: float | None,
    current: str,
    t_start: float,
    uri: str,
    model: torch.nn.Module,
    train: Any,
    val: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inside the MLflow run: fit, then publish weights, timings, loss histories and metrics together."""
    root = paths.root
    rank_zero = run.active  # global rank zero
    if rank_zero and resume is None and paths.checkpoints.exists():
        shutil.rmtree(paths.checkpoints)  # only now: the tracking store has proven itself by starting the run
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    model_params: dict[str, Any] = {}
    datasets: list[Any] = []
    if run.active:
        # only the params this stage reads (its dvc.yaml list), and the resolved model under `model.*`
        run.log_params(mlflow_logging.stage_params(cfg.to_dict(), stage, variant, seed, root))
        model_params = mlflow_logging.model_params(model, variant, family)
        run.log_params(model_params)
        run.log_params(mlflow_logging.runtime_params())  # threads, OpenMP wait, CPU product kernel
        sizes = {"train": len(train), "validation": len(val)}
        inputs = mlflow_logging.training_inputs(stage, root, sizes, cfg.to_dict()[stage])
        datasets = mlflow_logging.log_token_splits(inputs, origin=cfg.data.source, stage=stage)
        write_json(
            paths.checkpoints / "run.json", {"fingerprint": current, "mlflow_run_id": run.run_id, "completed": False}
        )
    with publish() as pub:
        metrics = _fit_and_save(cfg, family, paths, module, datamodule, trainer_kw, run, resume, entropy, pub)
        if not rank_zero:
            return {}, {}
        elapsed = time.perf_counter() - t_start
        timing = _write_timing(paths, module, metrics, elapsed, run, uri, resume, pub)
        if cfg.mlflow.log_models:  # a LoggedModel from the safetensors + config; fine-tuned ones registered
            mlflow_logging.log_trained_model(
                pub.staged(paths.final),  # logged before it is published: a failure here publishes nothing
                root / TOKENIZER_DIR,
                name=f"{stage}-{paths.label}",
                params=model_params,
                metrics=metrics,
                model_type=family,
                register_as=f"{cfg.mlflow.experiment}-{variant}" if stage == "finetune" else None,
                dataset=datasets[-1] if datasets else None,
                tags={"variant": variant, "family": family, "seed": str(seed), "stage": stage},
            )
        run.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
    return metrics, timing


def _launch_if_needed(cfg: Config, stage: str, variant: str, seed: int, argv: list[str] | None) -> int | None:
    """torchrun/SLURM: start the job and wait (`pipeline/training/launch.py`); None means: run here, in this process."""
    try:
        from pipeline.training import launch
    except ImportError:
        if cfg.launcher.kind != "local":
            raise
        return None
    return launch.launch_if_needed(cfg, stage, variant, sys.argv[1:] if argv is None else argv, seed=seed)


def _world_size(trainer_kw: dict[str, Any]) -> int:
    devices, nodes = trainer_kw.get("devices", 1), trainer_kw.get("num_nodes", 1)
    return (devices if isinstance(devices, int) else 1) * nodes


def _fit_and_save(
    cfg: Config,
    family: str,
    paths: RunPaths,
    module: Seq2SeqLM,
    datamodule: TrainDataModule,
    trainer_kw: dict[str, Any],
    run: TrackedRun,
    resume: Path | None,
    entropy: float | None,
    pub: Publication,
) -> dict[str, Any]:
    stage = paths.stage
    section = getattr(cfg, stage)
    accumulate = cfg.trainer.accumulate_grad_batches
    on_slurm = strategy.launched_externally() == "slurm"
    # under SLURM, SIGUSR1 -> checkpoint at the next step boundary and requeue (module.StepCheckpoint); Lightning's
    # own auto-requeue saves mid-step and its hpc_ckpt files are later reloaded by trainer.validate (stale weights)
    checkpoint = StepCheckpoint(paths.checkpoints, section.checkpoint_every_n_steps, requeue_on_signal=on_slurm)
    # several processes: a lost peer ends this one too, with a message (rank zero marks its MLflow run first)
    on_end = [lambda result: run.finish(result.mlflow_status)] if run.active else []
    heartbeat = liveness.Heartbeat(cfg.launcher.heartbeat_interval_s, cfg.launcher.heartbeat_timeout_s, on_end)
    callbacks: list[L.Callback] = [SamplerPosition(), checkpoint, heartbeat]
    if run.active:  # the learning rate of each parameter group, through the run's logger (train/lr/<group>)
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.progress_bar:
        callbacks.append(ProgressBar(refresh_rate=max(1, section.log_every_n_steps // 2)))
    trainer = L.Trainer(
        **trainer_kw,
        max_steps=section.max_steps,
        val_check_interval=section.val_every_n_steps * accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        logger=MlflowMetrics(run) if run.active else False,
        log_every_n_steps=section.log_every_n_steps,
        callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=paths.checkpoints / "trainer",  # never holds hpc_ckpt_* files that validate() would load
        plugins=[SLURMEnvironment(auto_requeue=False)] if on_slurm else None,
    )
    if entropy is not None and run.active:
        run.log_metrics({"train/unigram_entropy": entropy}, step=0)
    if resume is not None:
        log.info(f"{paths.dvc_stage()}: resuming from {resume.relative_to(paths.root)}")
    if cfg.trainer.compile:
        module.model = torch.compile(module.model)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    if trainer.interrupted:
        raise KeyboardInterrupt
    raise_if_signalled()  # one Lightning recorded but did not act on (it arrived after the last step)
    module.check_ending()  # before the final save: last.ckpt stays the last good checkpoint
    last_val_step = next((r["step"] for r in reversed(module.history) if "val/loss" in r), None)
    if last_val_step != trainer.global_step and datamodule.val is not None and len(datamodule.val) > 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)

    # the final state, consolidated into one weights file (DeepSpeed shards are merged by the strategy module)
    last = paths.checkpoints / "last.ckpt"
    checkpoint._save_checkpoint(trainer, str(last))  # atomic; the one before stays as previous.ckpt
    if not trainer.is_global_zero:
        return {}
    if cfg.trainer.strategy == "deepspeed":
        state = strategy.consolidate_checkpoint(last)
    else:
        state = {f"model.{k}": v for k, v in _unwrap(module.model).state_dict().items()}
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    config = _unwrap(module.model).config
    recompute = models.spec(family).activation_checkpointing
    if recompute is not None:
        recompute(config, False)  # a training-time choice, not part of the released model
    family_model = models.build_model(family, config)
    family_model.load_state_dict(weights)
    models.save_pretrained(family_model, family, pub.stage(paths.final))

    train_rows = [r for r in module.history if "train/loss" in r]
    val_rows = [r for r in module.history if "val/loss" in r]
    _write_csv(pub.stage(paths.history("train")), TRAIN_COLUMNS, train_rows, "train/")
    _write_csv(pub.stage(paths.history("val")), VAL_COLUMNS, val_rows, "val/")
    metrics: dict[str, Any] = {
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "train_loss": train_rows[-1]["train/loss"] if train_rows else None,
        "val_loss": val_rows[-1]["val/loss"] if val_rows else None,
        "val_ppl": val_rows[-1]["val/ppl"] if val_rows else None,
        "parameters": family_model.num_parameters(),
        "non_embedding_parameters": family_model.num_parameters(non_embedding=True),
        "epochs": datamodule.batches_consumed * section.batch_size * trainer.world_size / len(datamodule.train),
    }
    if entropy is not None:
        metrics["unigram_entropy"] = entropy
    pub.write_json(paths.metrics, metrics)
    return metrics


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]], prefix: str) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            values = {"step": r["step"], "tokens": int(r.get("train/tokens", 0))}
            values.update({c: r.get(prefix + c) for c in columns if c not in values})
            writer.writerow(["" if values[c] is None else values[c] for c in columns])


def _write_timing(
    paths: RunPaths,
    module: Seq2SeqLM,
    metrics: dict[str, Any],
    elapsed: float,
    run: TrackedRun,
    uri: str,
    resume: Path | None,
    pub: Publication,
) -> dict[str, Any]:
    timing = {
        "wall_time_s": elapsed,
        "tokens_per_s": module.run_speed.get("tokens_per_s"),  # whole-run averages, not the last logged window
        "mfu": module.run_speed.get("mfu"),
        "resumed": resume is not None,
        "mlflow_run_id": run.run_id,
        "mlflow_tracking_uri": uri,
    }
    pub.write_json(paths.timing, timing)
    return timing


def _summary(
    metrics: dict[str, Any],
    timing: dict[str, Any],
    paths: RunPaths,
    uri: str,
    run_id: str | None,
) -> None:
    def fmt(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    entropy = f", unigram entropy {fmt(metrics['unigram_entropy'])}" if "unigram_entropy" in metrics else ""
    speed = timing.get("tokens_per_s")
    print(
        f"{paths.dvc_stage()}: {metrics['steps']} steps, {metrics['tokens']:,} target tokens in "
        f"{timing['wall_time_s']:.1f} s ({'n/a' if speed is None else f'{speed:,.0f}'} input + target tokens/s "
        "of training); final loss "
        f"train {fmt(metrics['train_loss'])}, val {fmt(metrics['val_loss'])}{entropy}; "
        f"model {paths.final.relative_to(paths.root)}, metrics {paths.metrics.relative_to(paths.root)}; "
        f"MLflow run {run_id} at {uri}",
        flush=True,
    )
