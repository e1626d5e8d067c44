"""Typed, validated configuration: `params.yaml` is the single source of truth for every knob.

- `sections.py`: one pydantic model per `params.yaml` section, each field with its docstring;
- `params.py`: `Params` (the sections, the model variants, the checks across sections), `Config` (what the stages
  read) and loading: every problem of a file reported at once with its YAML path (`ConfigError`, exit 2);
- `validation.py`: the field types and the wording of problems;
- `paths.py`: where every stage reads and writes.

`python -m pipeline.config [params.yaml]` validates a file. The names below are what the stages import.
"""

from pipeline.config.params import (
    DEFAULT_PARAMS,
    VARIANT_NAME,
    Config,
    ConfigError,
    ModelSection,
    Params,
    config_from_dict,
    load_config,
    load_config_or_exit,
    model_config_of,
)
from pipeline.config.sections import LENGTH_TASKS, LengthsConfig, TokenizerConfig

__all__ = [
    "DEFAULT_PARAMS",
    "LENGTH_TASKS",
    "VARIANT_NAME",
    "Config",
    "ConfigError",
    "LengthsConfig",
    "ModelSection",
    "Params",
    "TokenizerConfig",
    "config_from_dict",
    "load_config",
    "load_config_or_exit",
    "model_config_of",
]
