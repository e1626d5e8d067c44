"""The whole params file: `Params` (the sections of `pipeline/config/sections.py`, the model variants and the checks
across sections), `Config` (what stages read) and loading.

`load_config` validates the whole file at once and raises one `ConfigError` that lists every problem with its YAML
path (unknown keys with a close match, wrong types, values out of range, impossible combinations). Stage entry
points call `load_config_or_exit`, which prints those problems and exits with status 2 before any output is
touched. `python -m pipeline.config [params.yaml]` validates a file and prints the result.

`models:` maps variant names to a family, a preset and every field of the family's config dataclass (null: the
preset's value); each family's fields are checked by a model generated from its dataclass. YAML 1.1 reads
`1e-4` as a string: float fields accept such strings as numbers.

DVC's `-S key=value` (for `dvc exp run`) edits `params.yaml` itself, so there is no second override system
(`python -m pipeline.preset` hands a preset's values to it).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.config.sections import (
    BenchmarkConfig,
    DataConfig,
    DeepSpeedConfig,
    EvaluateConfig,
    FinetuneConfig,
    KernelsConfig,
    LauncherConfig,
    LengthsConfig,
    MlflowConfig,
    PretrainConfig,
    TokenizerConfig,
    TrainerConfig,
)
from pipeline.config.validation import (
    NonNegInt,
    Problems,
    Section,
    describe,
    nest,
    with_yaml_floats,
)

DEFAULT_PARAMS = "params.yaml"


VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a DVC stage suffix and a folder name: no '-', '@', '/'


class ConfigError(ValueError):
    """Every problem found in a params file, each as 'yaml.path: what is wrong'."""

    def __init__(self, problems: list[str], source: str = DEFAULT_PARAMS):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class ModelSection(BaseModel):
    """A model variant: its family, a preset of it, and the fields that differ from the preset (non-null ones)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    family: str
    """Model family (a registry name of `models/__init__.py`)."""
    preset: str = "tiny"
    """Named size of the family."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """The variant's non-null config fields."""


@cache
def variant_model(family: str) -> type[BaseModel]:
    """The pydantic model of `models.<variant>` for `family`: `family`, `preset`, then every field of the family's
    config dataclass as optional (null: the preset's value), typed as the dataclass declares it."""
    import models

    spec = models.spec(family)
    hints = typing.get_type_hints(spec.config_class)
    fields: dict[str, Any] = {"family": (Literal[family], ...), "preset": (str | None, None)}
    for f in dataclasses.fields(spec.config_class):
        fields[f.name] = (with_yaml_floats(hints[f.name]) | None, None)

    def build(self: BaseModel) -> BaseModel:
        preset = self.preset or "tiny"
        if preset not in spec.presets:
            raise Problems([f"preset: unknown preset {preset!r}; allowed: {', '.join(spec.presets)}"])
        try:
            spec.from_preset(preset, **_overrides(self))
        except (TypeError, ValueError) as exc:  # the config's own __post_init__ checks
            raise Problems([f"<here>: {exc}"]) from None
        return self

    return create_model(
        f"{family}_variant",
        __base__=Section,
        __validators__={"_builds": model_validator(mode="after")(build)},
        **fields,
    )


def _overrides(variant: BaseModel) -> dict[str, Any]:
    return {k: v for k, v in variant.model_dump().items() if k not in ("family", "preset") and v is not None}


def _validate_models(raw: Any) -> dict[str, ModelSection]:
    """`models:` -> variant name -> `ModelSection`; every problem of every variant raised together."""
    from models import FAMILIES

    if not isinstance(raw, dict) or not raw:
        raise Problems([f"<here>: expected a mapping of variant names to {{family, preset, ...}}, got {raw!r}"])
    problems: list[str] = []
    sections: dict[str, ModelSection] = {}
    for variant, body in raw.items():
        if isinstance(body, ModelSection):
            sections[variant] = body
            continue
        if not isinstance(variant, str) or not VARIANT_NAME.match(variant):
            problems.append(f"{variant}: variant names are letters, digits and '_' (used in stage names and paths)")
            continue
        if not isinstance(body, dict):
            problems.append(f"{variant}: expected a mapping with `family` and `preset`, got {body!r}")
            continue
        family = body.get("family", variant if variant in FAMILIES else None)  # `t5: {preset: tiny}` is a t5
        if family not in FAMILIES:
            problems.append(f"{variant}.family: expected one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
            continue
        model = variant_model(family)
        try:
            checked = model.model_validate({**body, "family": family})
        except ValidationError as exc:
            problems += nest(str(variant), describe(exc, model))
            continue
        sections[variant] = ModelSection(family=family, preset=checked.preset or "tiny", overrides=_overrides(checked))
    if problems:
        raise Problems(problems)
    return sections


class Params(Section):
    """The whole params file."""

    preset: str = "none"
    """The params preset this experiment ran (`python -m pipeline.preset <name>` sets it; a label: MLflow tags every
    run with it and the report names it)."""
    seed: int = 1234
    """Data seed: the train/validation/test split, tokenizer sampling and the fine-tuning tasks' examples."""
    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])
    """Training/evaluation repetitions: each seed re-runs every variant with its own initialisation, data order
    and LSH rotations (the `pretrain@<variant>-<seed>` stages); `compare` aggregates over them."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Where the corpus comes from and how it is cleaned and split."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """The SentencePiece tokenizer."""
    models: Annotated[dict[str, ModelSection], BeforeValidator(_validate_models)] = Field(default_factory=dict)
    """Model variants: name -> family, preset and config fields."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """The pretraining stage."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """The fine-tuning stage."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """The evaluation stage."""
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    """The speed and memory benchmark."""
    lengths: LengthsConfig = Field(default_factory=LengthsConfig)
    """Quality versus sequence length at matched compute (the `lengths` stage)."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Devices, distribution and precision of the training stages."""
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    """Which CPU kernels compute the matrix products (an explicit setting: nothing is chosen by a timing)."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO options (with `trainer.strategy: deepspeed`)."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """Experiment tracking."""
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    """How training processes are started."""

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"must be a non-empty list of distinct integers >= 0, got {seeds}")
        return seeds

    @model_validator(mode="after")
    def _across_sections(self) -> Params:
        """Checks that need more than one section."""
        problems: list[str] = []
        t, p, f = self.tokenizer, self.pretrain, self.finetune
        for stage in ("pretrain", "finetune"):
            s = getattr(self, stage)
            if s.optimizer.warmup_steps > s.max_steps:
                problems.append(f"{stage}.optimizer.warmup_steps: must be in [0, {stage}.max_steps], "
                                f"got {s.optimizer.warmup_steps}")  # fmt: skip
        if p.objective == "span_corruption":
            spans = round(p.input_length * p.noise_density / p.mean_noise_span_length)
            if spans > t.num_sentinels:
                problems.append(
                    f"pretrain.input_length: {p.input_length} tokens at noise density {p.noise_density} make about "
                    f"{spans} noise spans but tokenizer.num_sentinels is {t.num_sentinels}"
                )
        patience = self.trainer.divergence.patience_steps
        shortest = min(("pretrain", "finetune"), key=lambda stage: getattr(self, stage).max_steps)
        if patience > getattr(self, shortest).max_steps:
            steps = getattr(self, shortest).max_steps
            problems.append(
                f"trainer.divergence.patience_steps: {patience} steps is longer than {shortest}.max_steps ({steps}): "
                f"the guard could never stop a run stuck at the uniform-prediction loss; set it to at most {steps}, "
                "or 0 to turn it off"
            )
        problems += self._training_layout()
        problems += self._variants_fit()
        problems += self._lengths_budget()
        if self.lengths.init == "pretrained" and not set(self.lengths.seeds) <= set(self.seeds):
            extra = sorted(set(self.lengths.seeds) - set(self.seeds))
            problems.append(f"lengths.seeds: {extra} not in seeds {self.seeds}: `lengths.init: pretrained` starts from "
                            "the pretrained weights of the same seed")  # fmt: skip
        if f.init == "checkpoint":
            import models

            for variant, section in self.models.items():
                if models.spec(section.family).load_checkpoint is None:
                    problems.append(f"finetune.init: 'checkpoint' needs a family that loads original checkpoints; "
                                    f"models.{variant} is a {section.family} model, which cannot")  # fmt: skip
        if problems:
            raise Problems(problems)
        return self

    def _training_layout(self) -> list[str]:
        """Trainer, DeepSpeed and launcher agree on the processes and the strategy."""
        tr, ds, la = self.trainer, self.deepspeed, self.launcher
        problems = []
        if tr.strategy != "deepspeed" and (ds.offload_parameters or ds.offload_optimizer):
            problems.append("deepspeed.offload_*: only used with trainer.strategy: deepspeed")
        if tr.compile and tr.strategy == "deepspeed":
            problems.append("trainer.compile: not supported together with trainer.strategy: deepspeed")
        if la.kind != "local":  # the launcher starts the processes; Lightning must expect the same counts
            per_node = la.nproc_per_node if la.kind == "torchrun" else la.slurm.gpus_per_node or la.nproc_per_node
            if tr.devices not in ("auto", per_node):
                problems.append(f"trainer.devices: {tr.devices} but launcher.kind {la.kind} starts {per_node} per node")
            if tr.num_nodes != la.nnodes:
                problems.append(f"trainer.num_nodes: {tr.num_nodes} but launcher.nnodes is {la.nnodes}")
        return problems

    def _variants_fit(self) -> list[str]:
        """Each variant's layout suits the pretraining objective, and its positions hold the sequences."""
        problems = []
        objective = self.pretrain.objective
        for variant in self.models:
            mcfg = model_config_of(self.models[variant])
            layout = getattr(mcfg, "layout", "encoder_decoder")
            if objective == "span_corruption" and layout != "encoder_decoder":
                problems.append(f"models.{variant}.layout: pretrain.objective 'span_corruption' needs "
                                f"'encoder_decoder', got {layout!r}")  # fmt: skip
            if objective in ("causal_lm", "prefix_lm") and layout not in ("causal_lm", "prefix_lm"):
                problems.append(f"models.{variant}.layout: pretrain.objective {objective!r} needs a decoder-only "
                                f"layout, got {layout!r}")  # fmt: skip
            limit = getattr(mcfg, "max_positions", None) or getattr(mcfg, "max_position_embeddings", None)
            longest = max(self.pretrain.input_length, self.finetune.input_length)
            if limit and longest > limit:
                problems.append(
                    f"models.{variant}: sequences of {longest} tokens (pretrain/finetune input_length) exceed the "
                    f"model's {limit} positions; raise its max_position_embeddings/axial_pos_shape"
                )
        return problems

    def _lengths_budget(self) -> list[str]:
        """The `lengths` stage can run every variant at every length: the positions hold the length, and the FLOPs
        budget buys each variant at least `min_steps` steps, by the accounting the stage uses (pipeline/budget.py)."""
        from pipeline.training.budget import padded_vocab_size, plan

        s = self.lengths
        vocab = padded_vocab_size(self.tokenizer.vocab_size)
        problems, configs = [], {}
        for variant, section in self.models.items():
            mcfg = model_config_of(section, vocab)
            limit = getattr(mcfg, "max_positions", None) or getattr(mcfg, "max_position_embeddings", None)
            longest = s.seq_lengths[-1] + (s.target_length if getattr(mcfg, "layout", "") != "encoder_decoder" else 0)
            if limit and longest > limit:
                problems.append(
                    f"lengths.seq_lengths: {s.seq_lengths[-1]} tokens exceed the {limit} positions of models.{variant}"
                    "; raise its max_position_embeddings/axial_pos_shape or drop the length"
                )
            configs[variant] = (section.family, mcfg)
        if s.budget.kind != "flops" or problems:
            return problems
        budget = plan(s, configs, vocab)
        for variant, rows in budget["variants"].items():
            for row, flops in zip(rows, budget["budgets"], strict=True):
                if row["steps"] < s.budget.min_steps:
                    problems.append(
                        f"lengths.budget: models.{variant} gets {row['steps']} step(s) at length {row['length']} "
                        f"(budget {flops:.3g} FLOPs, one step {row['flops_per_step']:.3g}), fewer than "
                        f"lengths.budget.min_steps {s.budget.min_steps}; raise lengths.budget.steps (or value)"
                    )
        return problems


def model_config_of(section: ModelSection, vocab_size: int | None = None) -> Any:
    """The family config dataclass of a variant: its preset, its non-null fields, and `vocab_size` (from the
    tokenizer, rounded up to a multiple of 128) unless the variant sets `vocab_size` itself."""
    from models import config_class

    overrides = dict(section.overrides)
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    return config_class(section.family).from_preset(section.preset, **overrides)


class Config:
    """The validated params (one attribute per section, as in `Params`), plus where they came from."""

    preset: str
    seed: int
    seeds: list[int]
    data: DataConfig
    tokenizer: TokenizerConfig
    models: dict[str, ModelSection]
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    benchmark: BenchmarkConfig
    lengths: LengthsConfig
    trainer: TrainerConfig
    kernels: KernelsConfig
    deepspeed: DeepSpeedConfig
    mlflow: MlflowConfig
    launcher: LauncherConfig

    def __init__(self, params: Params | None = None, source: str = DEFAULT_PARAMS):
        params = Params() if params is None else params
        for name in Params.model_fields:
            setattr(self, name, getattr(params, name))
        self.params = params
        self.source = source
        """Path the config was loaded from (not a params key)."""

    def model_config(self, variant: str, vocab_size: int | None = None) -> Any:
        """The variant's model config dataclass (of its family) built from its preset and non-null fields.

        `vocab_size` (from the tokenizer, rounded up to a multiple of 128) wins over the preset's unless the
        params set `vocab_size` explicitly.
        """
        return model_config_of(self.models[variant], vocab_size)

    def family(self, variant: str) -> str:
        """The model family of `variant`."""
        return self.models[variant].family

    def to_dict(self) -> dict[str, Any]:
        """The params as plain data (variants flattened back to `family`, `preset` + set fields), e.g. for logging."""
        out = self.params.model_dump(mode="json")
        out["models"] = {k: {"family": v.family, "preset": v.preset, **v.overrides} for k, v in self.models.items()}
        return out


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
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of sections at the top level, got {raw!r}"], source)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe(exc, Params), source) from None
    return Config(params, source)


def load_config_or_exit(path: str | Path = DEFAULT_PARAMS) -> Config:
    """`load_config` for stage entry points: on problems print them to stderr and exit with status 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.config [params.yaml]`: validate and print a one-line summary (exit 2 on problems)."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else DEFAULT_PARAMS
    cfg = load_config_or_exit(path)
    variants = ", ".join(f"{k}={v.family}/{v.preset}" for k, v in cfg.models.items())
    print(f"{path}: ok (variants {variants}; seeds {cfg.seeds})")
    return 0
