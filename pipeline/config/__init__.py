"""Typed, validated configuration: `params.yaml` is the single source of truth for every knob.

- `sections.py`: one pydantic model per `params.yaml` section, each field with its docstring;
- `params.py`: `Params` (the sections, the model variants, the checks across sections), `Config` (what the stages
  read) and loading: every problem of a file reported at once with its YAML path (`ConfigError`, exit 2);
- `validation.py`: the field types and the wording of problems;
- `paths.py`: where every stage reads and writes.

`python -m pipeline.config [params.yaml]` validates a file. The names below are what the stages import.
"""

import importlib
from typing import Any

# name -> the module defining it; loaded on first use (PEP 562), so importing `pipeline.config.validation` (as the
# tasks do, which the params' sections import in turn) does not import the params first
_EXPORTS = {
    **dict.fromkeys(
        ("DEFAULT_PARAMS", "VARIANT_NAME", "Config", "ConfigError", "ModelSection", "Params", "config_from_dict",
         "load_config", "load_config_or_exit", "model_config_of"),
        "pipeline.config.params",
    ),
    **dict.fromkeys(("LENGTH_TASKS", "LengthsConfig", "TokenizerConfig"), "pipeline.config.sections"),
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.config' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
