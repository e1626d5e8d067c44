"""One pydantic model per `params.yaml` section (`pipeline/config/params.py` assembles them into `Params`).

Each field carries its docstring right below it (it becomes the field's description). Types and ranges are
field constraints; a check that involves several fields of one section is a validator on that section, and checks
across sections live on `Params`. The field types and the wording of problems are `pipeline/config/validation.py`'s.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config.validation import (
    Float,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Problems,
    Section,
    between,
    describe,
    nest,
    yaml_float,
)
from pipeline.data.tasks import TASKS, TaskMixture, split_shortfall


class BuiltinSource(Section):
    topics: bool = True
    """Include the language-reference topics shipped in `pydoc_data` (about 0.5 MB of prose)."""
    docstrings: bool = True
    """Include the docstrings of the standard library, read by parsing its source files (never importing)."""


class HubSource(Section):
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


class FilesSource(Section):
    glob: str = "corpus/**/*.txt"
    """Glob (relative to the repo root, `**` allowed): one big file or a directory of shards, one format."""
    format: Literal["auto", "text", "json", "parquet", "csv"] = "auto"
    """`datasets` loader; `auto` picks it from the suffix (.txt/.md text, .json/.jsonl json, .parquet, .csv)."""
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    """The document unit of text files: a line, a blank-line separated paragraph, or the whole file."""
    text_field: str = "text"
    """Field holding the text in json, parquet and csv files (text files: the `text` of each `sample_by` unit)."""


class DataConfig(Section):
    source: Literal["builtin", "hub", "files", "preset"] = "builtin"
    """Where documents come from: `builtin` (offline, the Python installation's own prose), `hub`, `files`, or
    the named corpus `preset`."""
    preset: Literal["wikitext-103", "c4-en"] | None = None
    """For `source: preset`: a named corpus with the T5 paper's sizes (docs/data.md)."""
    preset_dir: str | None = None
    """For `source: preset`: a local copy of the preset's dataset in the hub layout; None streams the hub."""
    builtin: BuiltinSource = Field(default_factory=BuiltinSource)
    """Options of the `builtin` source."""
    hub: HubSource = Field(default_factory=HubSource)
    """Options of the `hub` source."""
    files: FilesSource = Field(default_factory=FilesSource)
    """Options of the `files` source."""
    max_documents: Annotated[int, Field(ge=3)] | None = None
    """Keep at most this many documents (after filtering), None for all; caps streamed hub corpora."""
    min_chars: NonNegInt = 64
    """Drop documents shorter than this many characters (after whitespace normalisation)."""
    normalize_whitespace: bool = True
    """Collapse runs of spaces/tabs, strip lines, and collapse 3+ newlines into a paragraph break."""
    dedup: bool = True
    """Remove exact duplicate documents (after normalisation)."""
    validation_fraction: Annotated[Float, between(0, 0.5, "()")] = 0.05
    """Fraction of documents in the validation split."""
    test_fraction: Annotated[Float, between(0, 0.5, "()")] = 0.05
    """Fraction of documents in the test split."""
    on_invalid_utf8: Literal["skip", "error"] = "skip"
    """For `files`: skip (and count) files that are not valid UTF-8, or stop with an error."""

    @model_validator(mode="after")
    def _preset_named(self) -> DataConfig:
        if self.source == "preset" and self.preset is None:
            raise Problems(["preset: `source: preset` needs a preset name (wikitext-103 or c4-en)"])
        return self


class TokenizerConfig(Section):
    model_file: str | None = None
    """Existing SentencePiece model to load instead of training one (e.g. T5's original `spiece.model`)."""
    vocab_size: PosInt = 8000
    """Total vocabulary size, sentinels included (SentencePiece pieces = vocab_size - num_sentinels)."""
    num_sentinels: NonNegInt = 100
    """Number of `<extra_id_N>` sentinel tokens appended at the top of the vocabulary (T5 uses 100)."""
    model_type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm; T5 uses unigram."""
    character_coverage: Annotated[Float, between(0, 1, "(]")] = 0.9995
    """Fraction of characters covered by the vocabulary; the rest map to unk."""
    input_sentence_size: PosInt = 2_000_000
    """Maximum number of sentences SentencePiece samples for training (deterministically)."""
    num_proc: PosInt = 2
    """Worker processes encoding shards in parallel (one SentencePiece thread each)."""
    batch_size: PosInt = 1000
    """Documents read and encoded per batch."""
    train_sample_mb: PosFloat = 32.0
    """Train SentencePiece on a seeded sample of train documents of at most this many MB of text."""
    shard_mb: PosFloat = 4.0
    """MB of text per tokenization shard: the unit of parallel work and of resuming a killed run."""
    user_defined_symbols: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Pieces SentencePiece keeps whole wherever they occur (its `user_defined_symbols`), counted in the pieces;
    `▁` stands for a leading space. E.g. `▁a`..`▁z` keep a small vocabulary's letter symbols one token each."""

    @model_validator(mode="after")
    def _room_for_pieces(self) -> TokenizerConfig:
        pieces = self.vocab_size - self.num_sentinels
        problems = []
        if pieces < 16:
            problems.append(f"vocab_size: {self.vocab_size} leaves {pieces} SentencePiece pieces after "
                            f"{self.num_sentinels} sentinels; need at least 16")  # fmt: skip
        if self.user_defined_symbols and self.model_file:
            problems.append("user_defined_symbols: a model_file is loaded, not trained: its pieces are fixed; drop one")
        elif len(set(self.user_defined_symbols)) != len(self.user_defined_symbols):
            problems.append(f"user_defined_symbols: must be distinct, got {self.user_defined_symbols}")
        elif pieces - len(self.user_defined_symbols) < 16:
            left = pieces - len(self.user_defined_symbols)
            problems.append(
                f"user_defined_symbols: {len(self.user_defined_symbols)} symbols leave {left} of the {pieces} "
                "SentencePiece pieces to learn; need at least 16 (raise vocab_size)"
            )
        if problems:
            raise Problems(problems)
        return self


class OptimizerConfig(Section):
    name: Literal["adamw", "adafactor"] = "adamw"
    """Optimizer: AdamW, or Adafactor (T5's original choice, factored second moments)."""
    lr: PosFloat = 1e-3
    """Peak learning rate."""
    weight_decay: NonNegFloat = 0.0
    """Decoupled weight decay (AdamW); not applied to norms and biases."""
    betas: Annotated[list[Annotated[Float, between(0, 1, "[)")]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.999]
    )
    """AdamW betas."""
    eps: PosFloat = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "inverse_sqrt", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup (T5 pretraining uses inverse square root)."""
    warmup_steps: NonNegInt = 20
    """Linear warmup steps."""
    min_lr_ratio: Annotated[Float, between(0, 1, "[]")] = 0.1
    """Final learning rate of the cosine and linear schedules, as a fraction of `lr`."""


class TrainingLoopConfig(Section):
    """The knobs every training stage shares; `pretrain` and `finetune` set their own defaults."""

    batch_size: PosInt = 16
    """Sequences per optimizer step per device (before gradient accumulation)."""
    max_steps: PosInt = 200
    """Optimizer steps; with batch size and length this fixes the token budget shared by both families."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    z_loss: NonNegFloat = 0.0
    """Weight of the auxiliary z-loss (log of the softmax normaliser squared); 0 disables it."""
    log_every_n_steps: PosInt = 10
    """Log metrics (loss, lr, grad norm, tokens/s, MFU) every this many steps."""
    val_every_n_steps: PosInt = 50
    """Run validation every this many steps."""
    val_batches: NonNegInt = 4
    """Validation batches per validation run."""
    checkpoint_every_n_steps: PosInt = 50
    """Save a resumable checkpoint every this many steps."""


class PretrainConfig(TrainingLoopConfig):
    objective: Literal["span_corruption", "causal_lm", "prefix_lm"] = "span_corruption"
    """Pretraining objective: T5 span corruption (encoder-decoder) or causal/prefix LM (decoder-only)."""
    noise_density: Annotated[Float, between(0, 1, "()")] = 0.15
    """Span corruption: fraction of input tokens masked."""
    mean_noise_span_length: Annotated[Float, Field(ge=1)] = 3.0
    """Span corruption: mean length of a masked span."""
    input_length: Annotated[int, Field(ge=8)] = 128
    """Tokens per packed input sequence (span corruption fills it exactly; targets are derived)."""
    max_steps: PosInt = 100
    """Optimizer steps; with batch size and length this fixes the token budget shared by both families."""
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-3))
    """Optimizer and schedule."""


class FinetuneConfig(TrainingLoopConfig):
    init: Literal["pretrained", "scratch", "checkpoint"] = "scratch"
    """Start from the variant's pretrain output, from scratch, or from an original checkpoint of the family
    (`checkpoint_dir`; only families whose spec can load one, e.g. a `transformers` T5 directory). The tiny CPU
    default trains from scratch: its 100 pretraining steps teach nothing the digit tasks use (README, results)."""
    checkpoint_dir: str | None = None
    """For `init: checkpoint`: a local checkpoint directory in the family's original format."""
    tasks: TaskMixture = Field(
        default_factory=lambda: {
            "listops": {"max_depth": 2, "max_args": 5, "min_chars": 0, "operators": ["MAX", "MIN"]},
            "sort": {},
        }
    )
    """Tasks to mix, by registry name, each with its options (see `pipeline/tasks.py`)."""
    mixing: Literal["examples_proportional", "temperature", "equal"] = "examples_proportional"
    """Task mixing strategy, as in the T5 paper (section 3.5.2)."""
    mixing_temperature: PosFloat = 2.0
    """Temperature T for `temperature` mixing (rates proportional to size^(1/T))."""
    mixing_cap: PosInt = 100_000
    """Examples-proportional mixing limit K: a task's size counts as at most K examples."""
    input_length: PosInt = 128
    """Maximum input tokens (longer inputs are truncated)."""
    target_length: PosInt = 16
    """Maximum target tokens (longer targets are truncated)."""
    batch_size: PosInt = 32
    """Sequences per optimizer step per device (before gradient accumulation)."""
    max_steps: PosInt = 150
    """Optimizer steps."""
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=20)
    )
    """Optimizer and schedule."""

    @model_validator(mode="after")
    def _checkpoint_dir_with_init(self) -> FinetuneConfig:
        if self.init == "checkpoint" and not self.checkpoint_dir:
            raise Problems(["checkpoint_dir: required when finetune.init is 'checkpoint'"])
        if self.checkpoint_dir and self.init != "checkpoint":
            raise Problems(["checkpoint_dir: only used with finetune.init: checkpoint"])
        return self


class EvaluateConfig(Section):
    split: Literal["test", "validation"] = "test"
    """Split evaluated."""
    batch_size: PosInt = 64
    """Sequences per evaluation batch."""
    max_loss_batches: NonNegInt = 20
    """Batches of the pretraining objective used for loss and perplexity (None-like 0 means all)."""
    max_examples_per_task: PosInt = 200
    """Examples per fine-tuning task scored by generation."""
    num_beams: Annotated[list[PosInt], Field(min_length=1)] = Field(default_factory=lambda: [1])
    """Beam sizes evaluated (1 is greedy)."""
    max_new_tokens: PosInt = 12
    """Generation length limit."""
    num_samples: NonNegInt = 5
    """Examples per task written out with input, reference and generation."""
    attention: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Evaluation-time attention settings: name -> model config fields to change after training (only fields a
    family lists as changeable without retraining, e.g. `n_hashes`, `use_full_attention`). Every trained model is
    also scored under each setting its family supports (greedy, the same test examples), without retraining: the
    report shows the train x evaluation table. Example: {full: {use_full_attention: true}, lsh1: {n_hashes: 1}}."""

    @field_validator("attention")
    @classmethod
    def _settings_change_what_evaluation_may(cls, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import models

        changeable = {f for family in models.FAMILIES for f in models.spec(family).eval_time_fields}
        problems = []
        for name, fields in settings.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                problems.append(f"{name!r}: a setting's name is letters, digits and '_'")
            if not isinstance(fields, dict) or not fields:
                problems.append(f"{name}: give the model fields to change, e.g. {{n_hashes: 1}}")
                continue
            for field in fields:
                if field not in changeable:
                    allowed = ", ".join(sorted(changeable)) or "none"
                    problems.append(f"{name}.{field}: not a field evaluation may change (allowed: {allowed})")
        if problems:
            raise ValueError("; ".join(problems))
        return settings


class BenchmarkConfig(Section):
    seq_lengths: Annotated[list[Annotated[int, Field(ge=16)]], Field(min_length=1)] = Field(
        default_factory=lambda: [512, 1024, 2048]
    )
    """Sequence lengths measured (batch `batch_size`); each family runs up to the longest it fits."""
    depths: Annotated[list[PosInt], Field(min_length=1)] = Field(default_factory=lambda: [2, 4, 8])
    """Layer counts for the memory-versus-depth measurement."""
    depth_seq_length: Annotated[int, Field(ge=16)] = 1024
    """Sequence length of the memory-versus-depth measurement."""
    batch_size: PosInt = 1
    """Sequences per measured training step."""
    repeats: PosInt = 2
    """Timed steps per measurement (after one warmup step)."""
    max_memory_gb: PosFloat = 8.0
    """Skip a measurement whose estimated peak memory exceeds this (protects the machine)."""
    time_budget_s: PosFloat = 75.0
    """Stop measuring longer lengths once the stage has used this much time."""


LENGTH_TASKS = {
    "needle": ("min_items", "max_items"),
    "listops": ("min_chars", "max_chars"),
    "lra_listops": ("min_tokens", "max_tokens"),
}
"""Tasks the `lengths` stage scales to each length: name -> its (shortest, longest) expression options."""


class BudgetReference(Section):
    family: str
    """Family of the reference model (a registered family)."""
    preset: str
    """Its preset (one of the family's named sizes)."""

    @model_validator(mode="after")
    def _known(self) -> BudgetReference:
        import models

        if self.family not in models.FAMILIES:
            raise Problems([f"family: {self.family!r} is not a registered family ({', '.join(models.FAMILIES)})"])
        if self.preset not in models.presets(self.family):
            known = ", ".join(models.presets(self.family))
            raise Problems([f"preset: {self.preset!r} is not a {self.family} preset ({known})"])
        return self


def _smallest_reference() -> BudgetReference:
    import models

    family = models.FAMILIES[0]
    return BudgetReference(family=family, preset=next(iter(models.presets(family))))


class LengthsBudgetConfig(Section):
    kind: Literal["flops", "seconds"] = "flops"
    """`flops`: every variant trains until it has spent the budget in training FLOPs at a length, by its own FLOPs
    accounting (`training_flops`), so the step count differs between variants (deterministic); `seconds`: until
    `value` seconds of training wall-clock (machine-dependent, not reproducible)."""
    steps: PosInt | Annotated[list[PosInt], Field(min_length=1)] | None = Field(default_factory=lambda: [600, 200])
    """`flops`: the budget at each length is the training FLOPs of this many optimizer steps of the reference model
    (`reference`) at that length, so it grows with the length as a model's cost does and does not depend on which
    variants run (pipeline/budget.py); one number for every length, or one per length. Null: give `value`."""
    reference: BudgetReference = Field(default_factory=lambda: _smallest_reference())
    """The model whose steps define the FLOPs budget: a family and a preset, with the run's vocabulary (default:
    the first registered family's first, smallest, preset)."""
    value: Annotated[PosFloat | Annotated[list[PosFloat], Field(min_length=1)] | None, BeforeValidator(yaml_float)] = (
        None
    )
    """The budget itself per run and length, instead of `steps`: FLOPs (`flops`) or seconds (`seconds`); one number
    for every length, or a list, one per `seq_lengths` entry."""
    min_steps: PosInt = 1
    """Every variant must get at least this many optimizer steps at every length (checked with the params)."""

    @model_validator(mode="after")
    def _one_budget(self) -> LengthsBudgetConfig:
        if self.kind == "seconds" and self.value is None:
            raise Problems(["value: a seconds budget needs `value` (seconds per run and length)"])
        if self.value is not None and "steps" not in self.model_fields_set:
            self.steps = None  # `value` given, `steps` left at its default: the value is the budget
        if self.kind == "flops" and self.steps is not None and self.value is not None:
            raise Problems(["steps: give either `steps` (of the reference model) or `value` (FLOPs), not both"])
        if self.kind == "flops" and self.steps is None and self.value is None:
            raise Problems(["steps: give `steps` (of the reference model) or `value` (FLOPs)"])
        return self


class LengthsConfig(Section):
    task: Literal["needle", "listops", "lra_listops"] = "needle"
    """A long-range task of `pipeline/tasks.py` whose inputs are scaled to fill each length."""
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = Field(default_factory=lambda: [0])
    """The seeds of this stage (`lengths@<variant>-<seed>`), its own list: a shorter one than `seeds` keeps the
    default run within its time; with one seed the intervals are over test examples only (the report says so).
    With `init: pretrained` each must be one of `seeds` (its pretrained weights)."""
    task_options: dict[str, Any] = Field(
        default_factory=lambda: {"filler": 1, "num_examples": 3000, "num_eval_examples": 200}
    )
    """The task's options (`pipeline/tasks.py`), except the expression-length ones, which `fill` sets per length."""
    seq_lengths: Annotated[list[Annotated[int, Field(ge=16)]], Field(min_length=1)] = Field(
        default_factory=lambda: [128, 512]
    )
    """Input lengths (tokens), increasing; each length fine-tunes a fresh copy of the starting model."""
    fill: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.9, 0.97]
    )
    """Shortest and longest expression as fractions of the length, in the task's own unit (listops: characters,
    lra_listops: LRA tokens); examples that tokenize longer than the length are dropped and counted."""
    init: Literal["pretrained", "scratch"] = "scratch"
    """Start each length from the variant's pretrained weights (same seed), or from a fresh initialisation."""
    budget: LengthsBudgetConfig = Field(default_factory=LengthsBudgetConfig)
    """The compute every variant gets at each length."""
    batch_size: PosInt = 8
    """Sequences per optimizer step."""
    dropout: Annotated[Float, between(0, 1, "[)")] | None = None
    """Dropout rate of every variant while it trains at a length, set as each model's `dropout_rate` (T5: every
    dropout, on attention probabilities too; the Reformer: all but its separate `attention_dropout_rate`); null:
    each model's own. The models' other stages keep their own rate."""
    target_length: PosInt = 2
    """Target tokens (the answer and its end-of-sequence token)."""
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=3e-3, schedule="constant", warmup_steps=20)
    )
    """Optimizer and schedule; `cosine`/`linear` decay over the budget's step count (FLOPs budgets only)."""
    log_every_n_steps: PosInt = 20
    """Training loss logged every this many steps (MLflow, `artifacts/lengths/`)."""
    eval_examples: PosInt = 200
    """Test examples scored per length (the same for every run; at most the task's `num_eval_examples`)."""
    eval_batch_size: PosInt = 50
    """Sequences per generation batch."""
    max_new_tokens: PosInt = 2
    """Generation length limit (the answer is one class and its end-of-sequence token)."""

    def task_options_at(self, length: int) -> dict[str, Any]:
        """The task's options at `length`: `task_options` plus the expression-length bounds from `fill`."""
        low_key, high_key = LENGTH_TASKS[self.task]
        low = max(0, round(self.fill[0] * length))
        high = max(low + 1, 5, round(self.fill[1] * length))
        return {**self.task_options, low_key: low, high_key: high}

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"must be distinct, got {seeds}")
        return seeds

    @field_validator("seq_lengths")
    @classmethod
    def _increasing(cls, lengths: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(lengths, lengths[1:], strict=False)):
            raise ValueError(f"must be strictly increasing, got {lengths}")
        return lengths

    @model_validator(mode="after")
    def _consistent(self) -> LengthsConfig:
        problems = []
        if self.fill[0] >= self.fill[1]:
            problems.append(f"fill: the shortest fraction must be below the longest, got {self.fill}")
        set_per_length = [k for k in LENGTH_TASKS[self.task] if k in self.task_options]
        problems += [f"task_options.{k}: set per length from lengths.fill; remove it" for k in set_per_length]
        options = TASKS[self.task].options
        try:
            options.model_validate({k: v for k, v in self.task_options.items() if k not in set_per_length})
        except ValidationError as exc:
            problems += nest("task_options", describe(exc, options))
        else:
            for length in self.seq_lengths if not set_per_length else []:
                if (shortfall := split_shortfall(self.task, self.task_options_at(length))) is not None:
                    problems.append(f"task_options at length {length} (fill {self.fill}): {shortfall}")
        for name in ("value", "steps"):
            given = getattr(self.budget, name)
            if isinstance(given, list) and len(given) != len(self.seq_lengths):
                problems.append(f"budget.{name}: {len(given)} values for {len(self.seq_lengths)} seq_lengths; "
                                "give one number, or one per length")  # fmt: skip
        if self.budget.kind == "seconds" and self.optimizer.schedule in ("cosine", "linear"):
            problems.append(f"optimizer.schedule: {self.optimizer.schedule!r} decays over a known step count, which "
                            "a seconds budget does not have; use constant or inverse_sqrt")  # fmt: skip
        if problems:
            raise Problems(problems)
        return self


class DivergenceConfig(Section):
    patience_steps: NonNegInt = 50
    """Stop a run as diverged after this many optimizer steps in a row with the loss at the uniform-prediction
    level ln(vocab) or a gradient norm of 0 (the last good checkpoint is kept); 0 turns this check off
    (a non-finite loss or gradient norm always stops the run). At most `pretrain.max_steps` and
    `finetune.max_steps`: a longer patience could never stop a run. A run that ends inside such a streak of 3 steps
    (or this many, if fewer) counts as diverged too, and publishes nothing."""
    uniform_tolerance: PosFloat = 0.01
    """Nats around ln(vocab) that count as the uniform-prediction loss."""


class TrainerConfig(Section):
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Device type; `auto` picks GPUs when present."""
    devices: PosInt | Literal["auto"] = 1
    """Devices (processes) per node."""
    num_nodes: PosInt = 1
    """Nodes."""
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    """Distribution: `auto` (single device), DDP, or DeepSpeed ZeRO (configured in `deepspeed`)."""
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    """Numerical precision; 16-mixed uses dynamic loss scaling."""
    accumulate_grad_batches: PosInt = 1
    """Micro-batches per optimizer step."""
    gradient_clip_val: NonNegFloat = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    num_workers: NonNegInt = 0
    """DataLoader worker processes."""
    compile: bool = False
    """Wrap the model in `torch.compile`."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (T5; the Reformer's reversible layers already do)."""
    progress_bar: bool = True
    """Show a progress bar with loss and tokens/s."""
    threads: PosInt | None = None
    """Intra-op threads of each process (torch, OpenMP), set by every stage before it works; None: the cores this
    process may use divided by the processes on this node (two busy processes on two cores with the default
    thread count ran a training stage about 5x slower than with one thread each)."""
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    """When a run counts as diverged besides non-finite values."""
    on_corrupt_checkpoint: Literal["stop", "previous", "scratch"] = "stop"
    """A resume checkpoint that cannot be read: `stop` with a message naming it; or move it aside (kept, renamed
    `*.corrupt-<time>`) and resume from the checkpoint before it (`previous`, else from scratch) or from `scratch`."""

    @model_validator(mode="after")
    def _precision_fits_the_accelerator_and_strategy(self) -> TrainerConfig:
        if self.accelerator == "cpu" and self.precision == "16-mixed":
            raise Problems(["precision: '16-mixed' needs a GPU; use '32-true' or 'bf16-mixed' on CPU"])
        if self.strategy == "deepspeed" and self.precision == "bf16-true":
            # DeepSpeed's bf16 mode keeps fp32 master weights itself: that is bf16-mixed; say so instead of guessing
            raise Problems(["precision: 'bf16-true' with DeepSpeed: use 'bf16-mixed' (DeepSpeed's bf16 mode)"])
        return self


class KernelsConfig(Section):
    paths: Literal["fast", "reference"] = "fast"
    """Which code computes the models: `fast`, the speed paths of `models/fast/` where they apply (fused projections,
    attention differentiated by hand, decoding shortcuts; each tested equal to the reference within rounding), or
    `reference`, the model files as written (plain PyTorch; then `matmul` is `auto` or `blas` and `decoding` `plain`).
    The two differ in the last bits."""
    matmul: Literal["auto", "blas", "onednn"] = "auto"
    """Which kernel computes every CPU fp32 matrix product of the fast paths, training and inference: `blas` (torch's
    default, MKL in its x86 wheels), `onednn` (torch's oneDNN linear), or `auto`: oneDNN on AMD processors, the BLAS
    elsewhere (a fixed rule of the machine, logged resolved in MLflow). Each choice gives the same bytes run after run
    on one machine; two choices differ in the last bits. `python benchmarks/bench_kernels.py` measures them."""
    decoding: Literal["plain", "shaped"] = "shaped"
    """How the fast decoding steps compute their few-row products: `plain` (like every other product) or `shaped` (a
    fixed rule of each product's shape: the vocabulary projection from a transposed copy or prepacked for oneDNN,
    large weights prepacked from 4 rows; faster on CPU, different rounding)."""

    @model_validator(mode="after")
    def _kernel_built_in(self) -> KernelsConfig:
        import models

        problems = []
        if self.matmul == "onednn" and not models.onednn_available():
            problems.append("matmul: 'onednn' but this torch build has no oneDNN linear; use 'blas' or 'auto'")
        speed = {"matmul": ("onednn", "'auto' or 'blas'"), "decoding": ("shaped", "'plain'")}
        for key, (value, use) in speed.items():
            if self.paths == "reference" and getattr(self, key) == value:
                problems.append(
                    f"{key}: {value!r} is a speed path, taken with paths 'fast' only; with 'reference' use {use}"
                )
        if problems:
            raise Problems(problems)
        return self


class DeepSpeedConfig(Section):
    stage: Literal[1, 2, 3] = 2
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Offload optimizer states (and step) to CPU memory."""
    offload_parameters: bool = False
    """Offload parameters to CPU memory (ZeRO-3 only)."""
    allgather_bucket_size: PosInt = 200_000_000
    """Elements per all-gather bucket."""
    reduce_bucket_size: PosInt = 200_000_000
    """Elements per reduce bucket."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    param_persistence_threshold: NonNegInt = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank instead of being sharded."""

    @model_validator(mode="after")
    def _offload_parameters_needs_stage_3(self) -> DeepSpeedConfig:
        if self.offload_parameters and self.stage != 3:
            raise Problems([f"offload_parameters: needs deepspeed.stage 3, got stage {self.stage}"])
        return self


class MlflowConfig(Section):
    tracking_uri: str | None = None
    """Tracking store; None means `sqlite:///<repo>/mlflow.db`. The MLFLOW_TRACKING_URI variable wins."""
    experiment: str = "t5-vs-reformer"
    """Experiment holding every run of the pipeline."""
    system_metrics: bool = True
    """Log CPU/GPU/memory system metrics alongside training metrics."""
    log_models: bool = True
    """Log the final consolidated weights, config and tokenizer as run artifacts."""
    connect_timeout_s: PosFloat = 10.0
    """How long to wait for a tracking server before failing (checked before training starts)."""

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, uri: str | None) -> str | None:
        if uri is not None and uri.startswith("file:"):
            raise ValueError("MLflow 3 no longer accepts file stores; use sqlite:///... or http(s)://")
        return uri


class SlurmConfig(Section):
    partition: str | None = None
    """Partition (`--partition`)."""
    account: str | None = None
    """Account (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    time: str = "04:00:00"
    """Wall-clock limit (`--time`)."""
    gpus_per_node: NonNegInt = 1
    """GPUs per node (`--gres=gpu:N`); also the tasks per node. 0: a CPU partition, no `--gres`, and
    `launcher.nproc_per_node` tasks per node."""
    cpus_per_task: PosInt = 8
    """CPUs per task (`--cpus-per-task`)."""
    mem: str | None = None
    """Memory per node (`--mem`), e.g. `256G`."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before `srun` (module loads, `source .venv/bin/activate`, ...)."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """Extra `#SBATCH` options, e.g. `--constraint=a100`."""
    poll_interval_s: NonNegFloat = 30.0
    """How often to poll the job state while waiting for it."""


class LauncherConfig(Section):
    kind: Literal["local", "torchrun", "slurm"] = "local"
    """How training processes start: Lightning locally, under torchrun, or as a SLURM job (waited for)."""
    nproc_per_node: PosInt = 1
    """torchrun: processes per node."""
    nnodes: PosInt = 1
    """torchrun and slurm: nodes."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """torchrun: rendezvous endpoint host:port."""
    heartbeat_interval_s: PosFloat = 5.0
    """Several processes: how often each one tells a peer it is alive (through the job's rendezvous store)."""
    heartbeat_timeout_s: PosFloat = 60.0
    """Several processes: a process (or the node holding the rendezvous store) silent this long is lost, and every
    other one stops with a message naming it (`pipeline/liveness.py`): a dead node ends the job within about this
    long plus one interval. Busy processes keep beating; keep it at least 3 intervals."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    """SLURM job options."""

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> LauncherConfig:
        if self.heartbeat_timeout_s < 3 * self.heartbeat_interval_s:
            raise Problems(
                [
                    f"heartbeat_timeout_s: {self.heartbeat_timeout_s:g} s is under 3 heartbeats of "
                    f"heartbeat_interval_s {self.heartbeat_interval_s:g} s; raise it or beat more often"
                ]
            )
        return self
