"""Model families compared by the pipeline: our own T5 and our own Reformer, in plain PyTorch.

Everything in `pipeline/` reaches the models through this registry, never through a family's module
directly. Each family has one `SPEC = FamilySpec(...)` (`models/spec.py`): config class, model class, presets,
benchmark sizing, activation-checkpointing hook, and optional capabilities; ours sit in `models/t5_family.py` and
`models/reformer_family.py`, beside the model files they describe. Adding a family is one module ending with its
`SPEC` plus one line in `SPECS` below.

Which code computes the numbers is one process-wide setting (`models/settings.py`, re-exported here):
`set_cpu_kernels(matmul, decoding, paths)`, `cpu_kernels()`; a process that sets nothing computes with the reference
path, the model files as written. `processor_vendor()` and `onednn_available()` tell what `auto` resolves from.

The family's config dataclass has `from_preset(name, **overrides)`, `to_dict()` and `from_dict(d)`; the model
class has the shared interface described in `docs/interfaces.md` (`forward` returns logits, `generate`
decodes, `num_parameters`, `training_flops`).

This package imports only torch (and safetensors for the weights file format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models import reformer_family, t5_family
from models.fast.private import onednn_available as onednn_available  # the settings, re-exported
from models.settings import CpuKernels as CpuKernels
from models.settings import cpu_kernels as cpu_kernels
from models.settings import processor_vendor as processor_vendor
from models.settings import set_cpu_kernels as set_cpu_kernels
from models.spec import FamilySpec

SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in (t5_family.SPEC, reformer_family.SPEC)}
FAMILIES: tuple[str, ...] = tuple(SPECS)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def spec(family: str) -> FamilySpec:
    """The `FamilySpec` of a registered family; `ValueError` naming the known ones otherwise."""
    if family not in SPECS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[family]


def config_class(family: str) -> type:
    """The config dataclass of a model family."""
    return spec(family).config_class


def model_class(family: str) -> type:
    """The model class (an `nn.Module`) of a model family."""
    return spec(family).model_class


def presets(family: str) -> dict[str, dict[str, Any]]:
    """The named presets of a model family."""
    return spec(family).presets


def build_model(family: str, config: Any) -> torch.nn.Module:
    """Instantiate a freshly initialised model of `family` from its config (dataclass or dict)."""
    if isinstance(config, dict):
        config = config_class(family).from_dict(config)
    return model_class(family)(config)


def save_pretrained(model: torch.nn.Module, family: str, directory: str | Path) -> None:
    """Write `model.safetensors` + `config.json` (with the family name) into `directory`.

    Tied weights are stored once (safetensors refuses shared storage), and restored on load.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_NAME))
    payload = {"family": family, "config": model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[str, torch.nn.Module]:
    """Load a directory written by `save_pretrained`; returns `(family, model)` in eval mode.

    Needs neither DeepSpeed nor pickle: the config is JSON, the weights safetensors.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: not a model directory written by save_pretrained")
    payload = json.loads(config_path.read_text())
    family = payload["family"]
    model = build_model(family, payload["config"])
    load_model(model, str(weights_path), device=str(map_location))
    model.eval()
    return family, model
