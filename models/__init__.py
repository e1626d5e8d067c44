"""Model families compared by the pipeline: our own T5 and our own Reformer, in plain PyTorch.

Everything in `pipeline/` reaches the models through this registry, never through a family's module
directly, so a third family is one more entry in `FAMILIES`. Each family provides:

- a config dataclass with `from_preset(name, **overrides)`, `to_dict()` and `from_dict(d)`;
- a model class built from that config, with the shared interface described in `docs/interfaces.md`
  (`forward` returns logits, `generate` decodes, `num_parameters`, `training_flops`).

This package imports only torch (and safetensors for the weights file format).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

# family -> (module, config class, model class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "t5": ("models.t5", "T5Config", "T5Model"),
    "reformer": ("models.reformer", "ReformerConfig", "ReformerModel"),
}

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _lookup(family: str, index: int) -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    entry = FAMILIES[family]
    return getattr(importlib.import_module(entry[0]), entry[index])


def config_class(family: str) -> type:
    """The config dataclass of a model family."""
    return _lookup(family, 1)


def model_class(family: str) -> type:
    """The model class (an `nn.Module`) of a model family."""
    return _lookup(family, 2)


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
