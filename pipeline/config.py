"""Typed, validated configuration: `params.yaml` is the single source of truth for every knob.

One dataclass per `params.yaml` section; each field carries its docstring right below it. `load_config`
checks the whole file at once (unknown keys, wrong types, values outside their allowed set, impossible
combinations across sections) and raises one `ConfigError` that lists every problem with its YAML path.
Stage entry points call `load_config_or_exit`, which prints those problems and exits with status 2 before
any output is touched. `python -m pipeline.config [params.yaml]` validates a file and prints the result.

DVC's `-S key=value` (for `dvc exp run`) edits `params.yaml` itself, so there is no second override system.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_PARAMS = "params.yaml"
VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a DVC stage suffix and a folder name: no '-', '@', '/'


class ConfigError(ValueError):
    """Every problem found in a params file, each as 'yaml.path: what is wrong'."""

    def __init__(self, problems: list[str], source: str = DEFAULT_PARAMS):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


# --------------------------------------------------------------------------------------------- sections


@dataclass
class BuiltinSource:
    topics: bool = True
    """Include the language-reference topics shipped in `pydoc_data` (about 0.5 MB of prose)."""
    docstrings: bool = True
    """Include the docstrings of the standard library, read by parsing its source files (never importing)."""


@dataclass
class HubSource:
    name: str = "wikitext"
    """Dataset name on the Hugging Face hub, or a local directory holding a dataset script/data files."""
    config: str | None = "wikitext-103-raw-v1"
    """Dataset configuration name (None for datasets without one)."""
    split: str = "train"
    """Split to read; the pipeline makes its own train/validation/test split from it."""
    text_column: str = "text"
    """Column holding the document text."""
    streaming: bool = True
    """Stream the dataset instead of downloading it whole (use with `data.max_documents` for large corpora)."""
    revision: str | None = None
    """Dataset revision (branch, tag or commit) for reproducibility."""


@dataclass
class FilesSource:
    glob: str = "corpus/**/*.txt"
    """Glob (relative to the repo root, `**` allowed) of local `.txt`, `.jsonl` or `.parquet` files."""
    text_field: str = "text"
    """Field holding the text in `.jsonl` and `.parquet` files (ignored for `.txt`: one document per file)."""


@dataclass
class DataConfig:
    source: Literal["builtin", "hub", "files"] = "builtin"
    """Where documents come from: `builtin` (offline, the Python installation's own prose), `hub` or `files`."""
    builtin: BuiltinSource = field(default_factory=BuiltinSource)
    """Options of the `builtin` source."""
    hub: HubSource = field(default_factory=HubSource)
    """Options of the `hub` source."""
    files: FilesSource = field(default_factory=FilesSource)
    """Options of the `files` source."""
    max_documents: int | None = None
    """Keep at most this many documents (after filtering), None for all; caps streamed hub corpora."""
    min_chars: int = 64
    """Drop documents shorter than this many characters (after whitespace normalisation)."""
    normalize_whitespace: bool = True
    """Collapse runs of spaces/tabs, strip lines, and collapse 3+ newlines into a paragraph break."""
    dedup: bool = True
    """Remove exact duplicate documents (after normalisation)."""
    validation_fraction: float = 0.05
    """Fraction of documents in the validation split."""
    test_fraction: float = 0.05
    """Fraction of documents in the test split."""
    on_invalid_utf8: Literal["skip", "error"] = "skip"
    """For `files`: skip (and count) files or records that are not valid UTF-8, or stop with an error."""


@dataclass
class TokenizerConfig:
    model_file: str | None = None
    """Existing SentencePiece model to load instead of training one (e.g. T5's original `spiece.model`)."""
    vocab_size: int = 8000
    """Total vocabulary size, sentinels included (SentencePiece pieces = vocab_size - num_sentinels)."""
    num_sentinels: int = 100
    """Number of `<extra_id_N>` sentinel tokens appended at the top of the vocabulary (T5 uses 100)."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm; T5 uses unigram."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by the vocabulary; the rest map to unk."""
    input_sentence_size: int = 2_000_000
    """Maximum number of sentences SentencePiece samples for training (deterministically)."""
    num_proc: int = 2
    """Worker processes for `datasets.map` tokenization."""
    batch_size: int = 1000
    """Documents per `datasets.map` batch."""


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    """Optimizer: AdamW, or Adafactor (T5's original choice, factored second moments)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); not applied to norms and biases."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "inverse_sqrt", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup (T5 pretraining uses inverse square root)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine and linear schedules, as a fraction of `lr`."""


@dataclass
class TrainingLoopConfig:
    """The knobs every training stage shares; `pretrain` and `finetune` set their own defaults."""

    batch_size: int = 16
    """Sequences per optimizer step per device (before gradient accumulation)."""
    max_steps: int = 200
    """Optimizer steps; with batch size and length this fixes the token budget shared by both families."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    z_loss: float = 0.0
    """Weight of the auxiliary z-loss (log of the softmax normaliser squared); 0 disables it."""
    log_every_n_steps: int = 10
    """Log metrics (loss, lr, grad norm, tokens/s, MFU) every this many steps."""
    val_every_n_steps: int = 50
    """Run validation every this many steps."""
    val_batches: int = 4
    """Validation batches per validation run."""
    checkpoint_every_n_steps: int = 50
    """Save a resumable checkpoint every this many steps."""


@dataclass
class PretrainConfig(TrainingLoopConfig):
    objective: Literal["span_corruption", "causal_lm", "prefix_lm"] = "span_corruption"
    """Pretraining objective: T5 span corruption (encoder-decoder) or causal/prefix LM (decoder-only)."""
    noise_density: float = 0.15
    """Span corruption: fraction of input tokens masked."""
    mean_noise_span_length: float = 3.0
    """Span corruption: mean length of a masked span."""
    input_length: int = 128
    """Tokens per packed input sequence (span corruption fills it exactly; targets are derived)."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-3))
    """Optimizer and schedule."""


@dataclass
class FinetuneConfig(TrainingLoopConfig):
    init: Literal["pretrained", "scratch", "checkpoint"] = "pretrained"
    """Start from the variant's pretrain output, from scratch, or from an original checkpoint of the family
    (`checkpoint_dir`; only families whose spec can load one, e.g. a `transformers` T5 directory)."""
    checkpoint_dir: str | None = None
    """For `init: checkpoint`: a local checkpoint directory in the family's original format."""
    tasks: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "listops": {"max_depth": 2, "max_args": 5, "min_chars": 0, "operators": ["MAX", "MIN"]},
            "sort": {},
        }
    )
    """Tasks to mix, by registry name, each with its options (see `pipeline/tasks.py`)."""
    mixing: Literal["examples_proportional", "temperature", "equal"] = "examples_proportional"
    """Task mixing strategy, as in the T5 paper (section 3.5.2)."""
    mixing_temperature: float = 2.0
    """Temperature T for `temperature` mixing (rates proportional to size^(1/T))."""
    mixing_cap: int = 100_000
    """Examples-proportional mixing limit K: a task's size counts as at most K examples."""
    input_length: int = 128
    """Maximum input tokens (longer inputs are truncated)."""
    target_length: int = 16
    """Maximum target tokens (longer targets are truncated)."""
    max_steps: int = 400
    """Optimizer steps."""
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=20)
    )
    """Optimizer and schedule."""


@dataclass
class EvaluateConfig:
    split: Literal["test", "validation"] = "test"
    """Split evaluated."""
    batch_size: int = 64
    """Sequences per evaluation batch."""
    max_loss_batches: int = 20
    """Batches of the pretraining objective used for loss and perplexity (None-like 0 means all)."""
    max_examples_per_task: int = 200
    """Examples per fine-tuning task scored by generation."""
    num_beams: list[int] = field(default_factory=lambda: [1])
    """Beam sizes evaluated (1 is greedy)."""
    max_new_tokens: int = 12
    """Generation length limit."""
    num_samples: int = 5
    """Examples per task written out with input, reference and generation."""


@dataclass
class BenchmarkConfig:
    seq_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    """Sequence lengths measured (batch `batch_size`); each family runs up to the longest it fits."""
    depths: list[int] = field(default_factory=lambda: [2, 4, 8])
    """Layer counts for the memory-versus-depth measurement."""
    depth_seq_length: int = 1024
    """Sequence length of the memory-versus-depth measurement."""
    batch_size: int = 1
    """Sequences per measured training step."""
    repeats: int = 2
    """Timed steps per measurement (after one warmup step)."""
    max_memory_gb: float = 8.0
    """Skip a measurement whose estimated peak memory exceeds this (protects the machine)."""
    time_budget_s: float = 75.0
    """Stop measuring longer lengths once the stage has used this much time."""


@dataclass
class DivergenceConfig:
    patience_steps: int = 50
    """Stop a run as diverged after this many optimizer steps in a row with the loss at the uniform-prediction
    level ln(vocab) or a gradient norm of 0 (the last good checkpoint is kept); 0 turns this check off
    (a non-finite loss or gradient norm always stops the run)."""
    uniform_tolerance: float = 0.01
    """Nats around ln(vocab) that count as the uniform-prediction loss."""


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Device type; `auto` picks GPUs when present."""
    devices: int | Literal["auto"] = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Nodes."""
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    """Distribution: `auto` (single device), DDP, or DeepSpeed ZeRO (configured in `deepspeed`)."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    """Numerical precision; 16-mixed uses dynamic loss scaling."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    num_workers: int = 0
    """DataLoader worker processes."""
    compile: bool = False
    """Wrap the model in `torch.compile`."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (T5; the Reformer's reversible layers already do)."""
    progress_bar: bool = True
    """Show a progress bar with loss and tokens/s."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """When a run counts as diverged besides non-finite values."""
    on_corrupt_checkpoint: Literal["stop", "previous", "scratch"] = "stop"
    """A resume checkpoint that cannot be read: `stop` with a message naming it; or move it aside (kept, renamed
    `*.corrupt-<time>`) and resume from the checkpoint before it (`previous`, else from scratch) or from `scratch`."""


@dataclass
class DeepSpeedConfig:
    stage: Literal[1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Offload optimizer states (and step) to CPU memory."""
    offload_parameters: bool = False
    """Offload parameters to CPU memory (ZeRO-3 only)."""
    allgather_bucket_size: int = 200_000_000
    """Elements per all-gather bucket."""
    reduce_bucket_size: int = 200_000_000
    """Elements per reduce bucket."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank instead of being sharded."""


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    """Tracking store; None means `sqlite:///<repo>/mlflow.db`. The MLFLOW_TRACKING_URI variable wins."""
    experiment: str = "t5-vs-reformer"
    """Experiment holding every run of the pipeline."""
    system_metrics: bool = True
    """Log CPU/GPU/memory system metrics alongside training metrics."""
    log_models: bool = True
    """Log the final consolidated weights, config and tokenizer as run artifacts."""
    connect_timeout_s: float = 10.0
    """How long to wait for a tracking server before failing (checked before training starts)."""


@dataclass
class SlurmConfig:
    partition: str | None = None
    """Partition (`--partition`)."""
    account: str | None = None
    """Account (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    time: str = "04:00:00"
    """Wall-clock limit (`--time`)."""
    gpus_per_node: int = 1
    """GPUs per node (`--gres=gpu:N`); also the tasks per node. 0: a CPU partition, no `--gres`, and
    `launcher.nproc_per_node` tasks per node."""
    cpus_per_task: int = 8
    """CPUs per task (`--cpus-per-task`)."""
    mem: str | None = None
    """Memory per node (`--mem`), e.g. `256G`."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before `srun` (module loads, `source .venv/bin/activate`, ...)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options, e.g. `--constraint=a100`."""
    poll_interval_s: float = 30.0
    """How often to poll the job state while waiting for it."""


@dataclass
class LauncherConfig:
    kind: Literal["local", "torchrun", "slurm"] = "local"
    """How training processes start: Lightning locally, under torchrun, or as a SLURM job (waited for)."""
    nproc_per_node: int = 1
    """torchrun: processes per node."""
    nnodes: int = 1
    """torchrun and slurm: nodes."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """torchrun: rendezvous endpoint host:port."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM job options."""


@dataclass
class ModelSection:
    """A model variant: a family, a preset of it, and the fields that differ from the preset (non-null ones)."""

    family: str
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    seed: int = 1234
    """Data seed: the train/validation/test split, tokenizer sampling and the fine-tuning tasks' examples."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training/evaluation repetitions: each seed re-runs every variant with its own initialisation, data order
    and LSH rotations (the `pretrain@<variant>-<seed>` stages); `compare` aggregates over them."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    models: dict[str, ModelSection] = field(default_factory=dict)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    source: str = field(default=DEFAULT_PARAMS, repr=False, metadata={"internal": True})
    """Path the config was loaded from (not a params key)."""

    def model_config(self, variant: str, vocab_size: int | None = None) -> Any:
        """The variant's model config dataclass (of its family) built from its preset and non-null fields.

        `vocab_size` (from the tokenizer, rounded up to a multiple of 128) wins over the preset's unless the
        params set `vocab_size` explicitly.
        """
        from models import config_class

        section = self.models[variant]
        overrides = dict(section.overrides)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return config_class(section.family).from_preset(section.preset, **overrides)

    def family(self, variant: str) -> str:
        """The model family of `variant`."""
        return self.models[variant].family

    def to_dict(self) -> dict[str, Any]:
        """The params as plain data (models flattened back to `preset` + fields), e.g. for logging."""
        out = {
            f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("internal")
        }
        out["models"] = {k: {"family": v.family, "preset": v.preset, **v.overrides} for k, v in self.models.items()}
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------- generic checking


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending a problem (and returning None) when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = _check(value, arg, path, trial)
            if not trial:
                return converted
        problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        problems.append(f"{path}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None
        (item_tp,) = typing.get_args(tp)
        return [_check(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        _, item_tp = typing.get_args(tp)
        return {k: _check(v, item_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    problems.append(f"{path}: expected {_describe(tp)}, got {value!r}")
    return None


def _unknown(key: str, known: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{path}: unknown key{hint}; allowed: {', '.join(known)}"


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, reporting unknown keys and wrong types under `path`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or '<top>'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(_unknown(str(key), names, sub))
            continue
        converted = _check(value, hints[key], sub, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a field's own __post_init__ check
        problems.append(f"{path or '<top>'}: {exc}")
        return cls()


def _build_models(raw: Any, problems: list[str]) -> dict[str, ModelSection]:
    """`models.<variant>`: `family`, `preset` and any field of the family's config dataclass (null: preset's)."""
    from models import FAMILIES, config_class, presets

    sections: dict[str, ModelSection] = {}
    if not isinstance(raw, dict) or not raw:
        problems.append(f"models: expected a mapping of variant names to {{family, preset, ...}}, got {raw!r}")
        return sections
    for variant, body in raw.items():
        path = f"models.{variant}"
        if not isinstance(variant, str) or not VARIANT_NAME.match(variant):
            problems.append(f"{path}: variant names are letters, digits and '_' (used in stage names and paths)")
            continue
        if not isinstance(body, dict):
            problems.append(f"{path}: expected a mapping with `family` and `preset`, got {body!r}")
            continue
        body = dict(body)
        family = body.pop("family", variant if variant in FAMILIES else None)  # `t5: {preset: tiny}` is a t5
        if family not in FAMILIES:
            problems.append(f"{path}.family: expected one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
            continue
        preset = body.pop("preset", None) or "tiny"
        cls = config_class(family)
        known = list(presets(family))
        if preset not in known:
            problems.append(f"{path}.preset: unknown preset {preset!r}; allowed: {', '.join(known)}")
            continue
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        overrides, bad = {}, False
        for key, value in body.items():
            sub = f"{path}.{key}"
            if key not in names:
                problems.append(_unknown(str(key), ["family", "preset", *names], sub))
                bad = True
                continue
            if value is None:  # null: the preset's value
                continue
            before = len(problems)
            converted = _check(value, hints[key], sub, problems)
            bad |= len(problems) > before
            overrides[key] = converted
        if not bad:
            try:
                cls.from_preset(preset, **overrides)
            except (TypeError, ValueError) as exc:
                problems.append(f"{path}: {exc}")
                continue
        sections[variant] = ModelSection(family=family, preset=preset, overrides=overrides)
    return sections


# ------------------------------------------------------------------------------ cross-section checks


def _cross_checks(cfg: Config, problems: list[str]) -> None:
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or any(s is not None and s < 0 for s in cfg.seeds):
        problems.append(f"seeds: must be a non-empty list of distinct integers >= 0, got {cfg.seeds}")
    d, t = cfg.data, cfg.tokenizer
    for name in ("validation_fraction", "test_fraction"):
        value = getattr(d, name)
        if not 0.0 < value < 0.5:
            problems.append(f"data.{name}: must be in (0, 0.5), got {value}")
    if d.min_chars < 0:
        problems.append(f"data.min_chars: must be >= 0, got {d.min_chars}")
    if d.max_documents is not None and d.max_documents < 3:
        problems.append(f"data.max_documents: must be >= 3 (one document per split at least), got {d.max_documents}")
    if t.num_sentinels < 0:
        problems.append(f"tokenizer.num_sentinels: must be >= 0, got {t.num_sentinels}")
    if t.vocab_size - t.num_sentinels < 16:
        problems.append(
            f"tokenizer.vocab_size: {t.vocab_size} leaves {t.vocab_size - t.num_sentinels} SentencePiece pieces "
            f"after {t.num_sentinels} sentinels; need at least 16"
        )
    if not 0.0 < t.character_coverage <= 1.0:
        problems.append(f"tokenizer.character_coverage: must be in (0, 1], got {t.character_coverage}")
    for name in ("num_proc", "batch_size"):
        if getattr(t, name) < 1:
            problems.append(f"tokenizer.{name}: must be >= 1, got {getattr(t, name)}")

    for stage in ("pretrain", "finetune"):
        s = getattr(cfg, stage)
        for name in ("batch_size", "max_steps", "log_every_n_steps", "val_every_n_steps", "checkpoint_every_n_steps"):
            if getattr(s, name) < 1:
                problems.append(f"{stage}.{name}: must be >= 1, got {getattr(s, name)}")
        if s.val_batches < 0:
            problems.append(f"{stage}.val_batches: must be >= 0, got {s.val_batches}")
        o = s.optimizer
        if o.lr <= 0:
            problems.append(f"{stage}.optimizer.lr: must be > 0, got {o.lr}")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas if b is not None):
            problems.append(f"{stage}.optimizer.betas: must be two numbers in [0, 1), got {o.betas}")
        if o.warmup_steps < 0 or o.warmup_steps > s.max_steps:
            problems.append(f"{stage}.optimizer.warmup_steps: must be in [0, {stage}.max_steps], got {o.warmup_steps}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            problems.append(f"{stage}.optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
        if s.z_loss < 0:
            problems.append(f"{stage}.z_loss: must be >= 0, got {s.z_loss}")

    p = cfg.pretrain
    if not 0.0 < p.noise_density < 1.0:
        problems.append(f"pretrain.noise_density: must be in (0, 1), got {p.noise_density}")
    if p.mean_noise_span_length < 1.0:
        problems.append(f"pretrain.mean_noise_span_length: must be >= 1, got {p.mean_noise_span_length}")
    if p.input_length < 8:
        problems.append(f"pretrain.input_length: must be >= 8, got {p.input_length}")
    elif p.objective == "span_corruption":
        spans = round(p.input_length * p.noise_density / p.mean_noise_span_length)
        if spans > t.num_sentinels:
            problems.append(
                f"pretrain.input_length: {p.input_length} tokens at noise density {p.noise_density} make about "
                f"{spans} noise spans but tokenizer.num_sentinels is {t.num_sentinels}"
            )

    f = cfg.finetune
    if f.init == "checkpoint" and not f.checkpoint_dir:
        problems.append("finetune.checkpoint_dir: required when finetune.init is 'checkpoint'")
    if f.checkpoint_dir and f.init != "checkpoint":
        problems.append("finetune.checkpoint_dir: only used with finetune.init: checkpoint")
    if f.init == "checkpoint":
        from models import spec

        for variant, section in cfg.models.items():
            if spec(section.family).load_checkpoint is None:
                problems.append(
                    f"finetune.init: 'checkpoint' needs a family that loads original checkpoints; "
                    f"models.{variant} is a {section.family} model, which cannot"
                )
    if not f.tasks:
        problems.append("finetune.tasks: list at least one task")
    if f.mixing_temperature <= 0:
        problems.append(f"finetune.mixing_temperature: must be > 0, got {f.mixing_temperature}")
    for name in ("input_length", "target_length", "mixing_cap"):
        if getattr(f, name) < 1:
            problems.append(f"finetune.{name}: must be >= 1, got {getattr(f, name)}")
    try:
        from pipeline.tasks import validate_tasks
    except ImportError:
        pass
    else:
        problems.extend(validate_tasks(f.tasks, path="finetune.tasks"))

    e = cfg.evaluate
    if not e.num_beams or any(b is not None and b < 1 for b in e.num_beams):
        problems.append(f"evaluate.num_beams: must be a non-empty list of integers >= 1, got {e.num_beams}")
    for name in ("batch_size", "max_examples_per_task", "max_new_tokens"):
        if getattr(e, name) < 1:
            problems.append(f"evaluate.{name}: must be >= 1, got {getattr(e, name)}")

    b = cfg.benchmark
    if not b.seq_lengths or any(n is not None and n < 16 for n in b.seq_lengths):
        problems.append(f"benchmark.seq_lengths: must be a non-empty list of lengths >= 16, got {b.seq_lengths}")
    if not b.depths or any(n is not None and n < 1 for n in b.depths):
        problems.append(f"benchmark.depths: must be a non-empty list of layer counts >= 1, got {b.depths}")
    for name in ("batch_size", "repeats"):
        if getattr(b, name) < 1:
            problems.append(f"benchmark.{name}: must be >= 1, got {getattr(b, name)}")

    tr, ds = cfg.trainer, cfg.deepspeed
    if isinstance(tr.devices, int) and tr.devices < 1:
        problems.append(f"trainer.devices: must be >= 1 or 'auto', got {tr.devices}")
    if tr.num_nodes < 1:
        problems.append(f"trainer.num_nodes: must be >= 1, got {tr.num_nodes}")
    if tr.accumulate_grad_batches < 1:
        problems.append(f"trainer.accumulate_grad_batches: must be >= 1, got {tr.accumulate_grad_batches}")
    if tr.gradient_clip_val < 0:
        problems.append(f"trainer.gradient_clip_val: must be >= 0, got {tr.gradient_clip_val}")
    if tr.accelerator == "cpu" and tr.precision == "16-mixed":
        problems.append("trainer.precision: '16-mixed' needs a GPU; use '32-true' or 'bf16-mixed' on CPU")
    if ds.offload_parameters and ds.stage != 3:
        problems.append(f"deepspeed.offload_parameters: needs deepspeed.stage 3, got stage {ds.stage}")
    if tr.strategy != "deepspeed" and (ds.offload_parameters or ds.offload_optimizer):
        problems.append("deepspeed.offload_*: only used with trainer.strategy: deepspeed")
    if tr.compile and tr.strategy == "deepspeed":
        problems.append("trainer.compile: not supported together with trainer.strategy: deepspeed")

    m = cfg.mlflow
    if m.connect_timeout_s <= 0:
        problems.append(f"mlflow.connect_timeout_s: must be > 0, got {m.connect_timeout_s}")
    if m.tracking_uri is not None and m.tracking_uri.startswith("file:"):
        problems.append("mlflow.tracking_uri: MLflow 3 no longer accepts file stores; use sqlite:///... or http(s)://")

    la = cfg.launcher
    if la.kind == "torchrun" and la.nproc_per_node < 1:
        problems.append(f"launcher.nproc_per_node: must be >= 1, got {la.nproc_per_node}")
    if la.nnodes < 1:
        problems.append(f"launcher.nnodes: must be >= 1, got {la.nnodes}")
    if la.kind == "slurm" and la.slurm.gpus_per_node < 0:
        problems.append(f"launcher.slurm.gpus_per_node: must be >= 0 (0: CPU tasks), got {la.slurm.gpus_per_node}")
    if la.kind == "slurm" and la.slurm.gpus_per_node == 0 and la.nproc_per_node < 1:
        problems.append(f"launcher.nproc_per_node: must be >= 1 (CPU tasks per node), got {la.nproc_per_node}")
    if tr.divergence.patience_steps < 0:
        problems.append(f"trainer.divergence.patience_steps: must be >= 0, got {tr.divergence.patience_steps}")
    if tr.divergence.uniform_tolerance <= 0:
        problems.append(f"trainer.divergence.uniform_tolerance: must be > 0, got {tr.divergence.uniform_tolerance}")
    if la.kind != "local":  # the launcher starts the processes; Lightning must expect the same counts
        per_node = la.nproc_per_node if la.kind == "torchrun" else la.slurm.gpus_per_node or la.nproc_per_node
        if tr.devices not in ("auto", per_node):
            problems.append(f"trainer.devices: {tr.devices} but launcher.kind {la.kind} starts {per_node} per node")
        if tr.num_nodes != la.nnodes:
            problems.append(f"trainer.num_nodes: {tr.num_nodes} but launcher.nnodes is {la.nnodes}")
    if ds.param_persistence_threshold < 0:
        problems.append(f"deepspeed.param_persistence_threshold: must be >= 0, got {ds.param_persistence_threshold}")

    _check_model_lengths(cfg, problems)


def _check_model_lengths(cfg: Config, problems: list[str]) -> None:
    """Layout/objective agreement, and sequence lengths each model can take (e.g. axial positions)."""
    decoder_only = {"causal_lm", "prefix_lm"}
    for family in cfg.models:
        try:
            mcfg = cfg.model_config(family)
        except Exception:  # already reported by _build_models
            continue
        layout = getattr(mcfg, "layout", "encoder_decoder")
        objective = cfg.pretrain.objective
        if objective == "span_corruption" and layout != "encoder_decoder":
            problems.append(
                f"models.{family}.layout: pretrain.objective 'span_corruption' needs 'encoder_decoder', got {layout!r}"
            )
        if objective in decoder_only and layout not in decoder_only:
            problems.append(
                f"models.{family}.layout: pretrain.objective {objective!r} needs a decoder-only layout, got {layout!r}"
            )
        limit = getattr(mcfg, "max_position_embeddings", None)
        if limit:
            longest = max(cfg.pretrain.input_length, cfg.finetune.input_length)
            if longest > limit:
                problems.append(
                    f"models.{family}: sequences of {longest} tokens (pretrain/finetune input_length) exceed the "
                    f"model's {limit} positions; raise its max_position_embeddings/axial_pos_shape"
                )


# -------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path = DEFAULT_PARAMS) -> Config:
    """Load and validate a params file; raises `ConfigError` listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError([f"file not found ({path.resolve()})"], source)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source) from None
    return config_from_dict(raw, source)


def config_from_dict(raw: Any, source: str = DEFAULT_PARAMS) -> Config:
    """Validate an already-parsed params mapping (see `load_config`)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of sections at the top level, got {raw!r}"], source)
    raw = dict(raw)
    models_raw = raw.pop("models", None)
    cfg = _build(Config, raw, "", problems)
    cfg.models = _build_models(models_raw, problems)
    cfg.source = source
    _cross_checks(cfg, problems)  # fields with bad values kept their defaults, so this stays meaningful
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config_or_exit(path: str | Path = DEFAULT_PARAMS) -> Config:
    """`load_config` for stage entry points: on problems print them to stderr and exit with status 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else DEFAULT_PARAMS
    cfg = load_config_or_exit(path)
    variants = ", ".join(f"{k}={v.family}/{v.preset}" for k, v in cfg.models.items())
    print(f"{path}: ok (variants {variants}; seeds {cfg.seeds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
