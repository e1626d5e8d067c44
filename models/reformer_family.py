"""Our Reformer as a family of the registry (`models/__init__.py`): its `FamilySpec` and the hooks the pipeline
calls: how the benchmark scales a Reformer config, how a run's seed reaches its hashing, and the name of its
sub-quadratic attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from models.flops import reformer_training_flops
from models.reformer import PRESETS, ReformerConfig, ReformerModel
from models.spec import FamilySpec


def benchmark_config(config: Any, num_layers: int | None, length: int) -> Any:
    """The preset's attention pattern (local, lsh, ...) repeated to `num_layers` layers per stack, and position
    tables grown to hold `length` tokens (position embeddings do not count as non-embedding parameters)."""
    changes: dict[str, Any] = {}
    if num_layers is not None:
        pattern = list(config.attn_layers)
        changes.update(attn_layers=[pattern[i % len(pattern)] for i in range(num_layers)], encoder_attn_layers=None)
    if config.axial_pos_shape and math.prod(config.axial_pos_shape) < length:
        changes["axial_pos_shape"] = [-(-length // config.axial_pos_shape[1]), config.axial_pos_shape[1]]
    elif not config.axial_pos_shape and config.max_position_embeddings < length:
        changes["max_position_embeddings"] = length
    return dataclasses.replace(config, **changes)


def seeded(config: Any, seed: int) -> Any:
    """A fixed `hash_seed` is offset by the run's seed; None already draws rotations from the seeded torch RNG."""
    return config if config.hash_seed is None else dataclasses.replace(config, hash_seed=config.hash_seed + seed)


def efficient_attention(config: Any) -> str | None:
    """The kinds of attention this config's stacks use, e.g. "LSH and local attention"; None when every layer
    attends to the whole sequence."""
    kinds = set(config.attn_layers)
    if config.layout == "encoder_decoder":
        kinds |= set(config.encoder_attn_layers or config.attn_layers)
    if config.use_full_attention:
        kinds.discard("lsh")
    names = [{"lsh": "LSH", "local": "local"}[kind] for kind in ("lsh", "local") if kind in kinds]
    return " and ".join(names) + " attention" if names else None


SPEC = FamilySpec(
    name="reformer",
    config_class=ReformerConfig,
    model_class=ReformerModel,
    presets=PRESETS,
    benchmark_config=benchmark_config,
    activation_checkpointing=None,  # reversible layers recompute activations in the backward pass already
    seeded=seeded,
    efficient_attention=efficient_attention,
    training_flops=reformer_training_flops,
    # attention that is not a parameter: the same weights run with any of these (Reformer section 2.1, Table 2)
    eval_time_fields=frozenset(
        (
            "n_hashes",
            "use_full_attention",
            "n_buckets",
            "lsh_chunk_length",
            "lsh_num_chunks_before",
            "lsh_num_chunks_after",
            "local_chunk_length",
            "local_num_chunks_before",
            "local_num_chunks_after",
            "encoder_num_chunks_after",
            "hash_seed",
        )
    ),  # fmt: skip
    published={"lra_listops": {"Reformer": 0.3727}},  # Long Range Arena (Tay et al. 2021), table 1, test accuracy
)
