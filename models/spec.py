"""`FamilySpec`: everything the pipeline needs to know about a model family, in one small object.

Each family module (`models/t5.py`, `models/reformer.py`) ends with `SPEC = FamilySpec(...)`, and
`models/__init__.py` lists the specs. Nothing outside `models/` branches on a family's name: what differs
between families is a field here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class FamilySpec:
    """A model family: config class, model class, presets, and the hooks the pipeline calls."""

    name: str
    """Registry name, as written in `params.yaml` (`models.<variant>.family`)."""
    config_class: type
    """The config dataclass (`from_preset`, `from_dict`, `to_dict`)."""
    model_class: type[nn.Module]
    """The model, built from a config; interface in `docs/interfaces.md`."""
    presets: dict[str, dict[str, Any]]
    """Named sizes: field values over the config class defaults."""
    benchmark_config: Callable[[Any, int | None, int], Any]
    """`(config, num_layers, length) -> config` with `num_layers` layers per stack (None: unchanged) and
    position tables able to hold `length` tokens: how the benchmark scales a model in depth and length."""
    training_flops: Callable[[Any, int, int, int], float]
    """`(config, batch_size, input_len, target_len) -> FLOPs` of one training step, from the config alone (the
    model's `training_flops` method calls it): the budget of matched-compute comparisons and MFU use it."""
    activation_checkpointing: Callable[[Any, bool], None] | None = None
    """`(config, enabled)`: switch recomputation of activations in the backward pass on or off, in place;
    None when the family has nothing to switch (e.g. reversible layers recompute anyway)."""
    seeded: Callable[[Any, int], Any] | None = None
    """`(config, seed) -> config` for randomness the config itself fixes (e.g. a fixed LSH hash seed); None
    when all of the family's randomness comes from torch's generator (seeded by the pipeline)."""
    load_checkpoint: Callable[[Path], nn.Module] | None = None
    """Load an original checkpoint directory of this family (`finetune.init: checkpoint`); None: unsupported."""
    efficient_attention: Callable[[Any], str | None] | None = None
    """`(config) -> text`: the sub-quadratic attention a config uses (e.g. "LSH and local attention"), which the
    report says short training sequences cannot show the benefit of; None, or a None result: full attention."""
    eval_time_fields: frozenset[str] = frozenset()
    """Config fields that may change after training without touching the weights (e.g. the Reformer's hash
    rounds): the pipeline's evaluation-time attention settings (`evaluate.attention`) may set only these."""
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    """Published results of the family's architecture, task -> {label: score in [0, 1]}, shown in the report beside
    ours (`lra_listops`: Long Range Arena, Tay et al. 2021, table 1)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a family wants to publish (free-form, unused by the pipeline)."""

    def from_preset(self, preset: str, **overrides: Any) -> Any:
        """`config_class.from_preset(preset, **overrides)`."""
        return self.config_class.from_preset(preset, **overrides)

    def field_names(self) -> list[str]:
        """Every field of the config dataclass, in declaration order (the keys a variant may set)."""
        return [f.name for f in dataclasses.fields(self.config_class)]
