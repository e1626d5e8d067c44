"""Matched compute for the `lengths` stage: the FLOPs budget at each length and the steps each variant gets in it.

One accounting, used where params are validated (`pipeline/config/`: an impossible budget is exit 2 in the first
seconds), by the stage that trains (`pipeline/lengths.py`) and by the report (`pipeline/compare.py`):

- the FLOPs of one training step of a model at a length are the model family's own `training_flops` at the padded
  shapes the collator builds (`step_flops`), a function of the config (no model is built);
- the budget at a length is either the FLOPs of `lengths.budget.steps` training steps of the *reference model*
  (`lengths.budget.reference`: a family and preset, fixed whatever variants run) at that length, so it grows with
  the length as a model's cost does, or `lengths.budget.value` FLOPs given outright (one number or one per length);
- a variant takes floor(budget / its FLOPs per step) steps: a cheaper model takes more steps for the same compute.

The budget never depends on which other variants run, so adding a variant changes no other variant's result (and
DVC re-runs nothing else); a larger variant gets fewer steps, and the report says how many.
"""

from __future__ import annotations

import math
from typing import Any

VOCAB_MULTIPLE = 128  # the tokenizer's vocabulary is padded to a multiple of this (pipeline/training/train.py)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Tokenizer vocabulary rounded up to a multiple of 128 (fast matmuls; the extra rows are never targets)."""
    return math.ceil(vocab_size / multiple) * multiple


def step_flops(family: str, config: Any, batch_size: int, length: int, target_length: int) -> float:
    """Training FLOPs of one optimizer step of a `family` model with `config` at the padded shapes, by the family's
    own accounting (`FamilySpec.training_flops`, a function of the config: no model is built): encoder-decoder
    inputs padded to `length` and targets to `target_length`; decoder-only layouts read inputs and targets as one
    sequence (padded to the batch's longest, so this is an upper bound for them)."""
    import models

    flops = models.spec(family).training_flops
    if getattr(config, "layout", "encoder_decoder") == "encoder_decoder":
        return float(flops(config, batch_size, length, target_length))
    return float(flops(config, batch_size, length + target_length, 0))


def budget_steps(budget_flops: float, flops_per_step: float) -> int:
    """Optimizer steps that fit in the budget: floor(budget / per step), the spent FLOPs never above it."""
    if flops_per_step <= 0:
        raise ValueError(f"FLOPs per step must be positive, got {flops_per_step}")
    return int(math.floor(budget_flops / flops_per_step * (1 + 1e-12)))


def reference_config(section: Any, vocab_size: int) -> tuple[str, Any]:
    """(family, config) of the reference model of `lengths.budget`: its family and preset, the run's vocabulary."""
    import models

    ref = section.budget.reference
    return ref.family, models.config_class(ref.family).from_preset(ref.preset, vocab_size=vocab_size)


def budget_at(section: Any, index: int, vocab_size: int) -> float:
    """The budget of the `index`-th length of `lengths.seq_lengths`: `value` (one number for all lengths, or one
    per length), or `steps` training steps of the reference model at that length (FLOPs)."""
    b = section.budget
    if b.value is not None:
        return float(b.value[index] if isinstance(b.value, list) else b.value)
    family, config = reference_config(section, vocab_size)
    length = section.seq_lengths[index]
    steps = b.steps[index] if isinstance(b.steps, list) else b.steps
    return steps * step_flops(family, config, section.batch_size, length, section.target_length)


def plan(section: Any, variants: dict[str, tuple[str, Any]], vocab_size: int) -> dict[str, Any]:
    """The FLOPs budget at every length and what each variant gets in it.

    `variants`: name -> (family, config with the run's vocabulary). Returns {"budgets": [FLOPs per length],
    "variants": {name: [{"length", "flops_per_step", "steps"}, ...]}}. Only for `kind: flops`."""
    budgets = [budget_at(section, i, vocab_size) for i in range(len(section.seq_lengths))]
    out: dict[str, Any] = {"budgets": budgets, "variants": {}}
    for name, (family, config) in variants.items():
        rows = []
        for length, budget in zip(section.seq_lengths, budgets, strict=True):
            per_step = step_flops(family, config, section.batch_size, length, section.target_length)
            rows.append({"length": length, "flops_per_step": per_step, "steps": budget_steps(budget, per_step)})
        out["variants"][name] = rows
    return out


def describe_budget(section: Any) -> str:
    """How compute is matched, in words, for the report and the logs."""
    b = section.budget
    if b.kind == "seconds":
        value = b.value if isinstance(b.value, list) else [b.value]
        return f"{', '.join(f'{v:g}' for v in value)} s of training wall-clock per run and length (machine-dependent)"
    if b.value is not None:
        value = b.value if isinstance(b.value, list) else [b.value]
        return f"{', '.join(f'{v:.3g}' for v in value)} training FLOPs per run and length"
    steps = ", ".join(map(str, b.steps)) if isinstance(b.steps, list) else str(b.steps)
    per = " (per length)" if isinstance(b.steps, list) else ""
    return (
        f"the training FLOPs of {steps}{per} steps of the reference model ({b.reference.family} "
        f"`{b.reference.preset}`, batch {section.batch_size}) at each length, the same for every variant"
    )
