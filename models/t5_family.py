"""Our T5 as a family of the registry (`models/__init__.py`): its `FamilySpec`, the hooks the pipeline calls.

Apart from the model file (`models/t5.py`) because one hook, loading an original T5 checkpoint, needs the
checkpoint layout of `models/hf/t5.py`, which itself imports the model: here both are imported one way only.
"""

from __future__ import annotations

import dataclasses

from models.flops import t5_training_flops
from models.spec import FamilySpec
from models.t5 import PRESETS, T5Config, T5Model


def benchmark_config(config: T5Config, num_layers: int | None, length: int) -> T5Config:
    """`num_layers` blocks in each stack; relative positions need no table growth for `length`."""
    if num_layers is None:
        return config
    return dataclasses.replace(config, num_layers=num_layers, num_decoder_layers=num_layers)


def activation_checkpointing(config: T5Config, enabled: bool) -> None:
    config.gradient_checkpointing = enabled  # each block is recomputed in the backward pass


def load_checkpoint(directory) -> T5Model:
    from models.hf.t5 import load_t5_checkpoint  # transformers' file layout, not transformers itself

    return load_t5_checkpoint(directory)


SPEC = FamilySpec(
    name="t5",
    config_class=T5Config,
    model_class=T5Model,
    presets=PRESETS,
    benchmark_config=benchmark_config,
    activation_checkpointing=activation_checkpointing,
    load_checkpoint=load_checkpoint,
    training_flops=t5_training_flops,
    # Long Range Arena (Tay et al. 2021), table 1, test accuracy of the vanilla Transformer: full attention, as T5
    published={"lra_listops": {"Transformer": 0.3637}},
)
