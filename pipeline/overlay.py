"""Apply a params preset (`configs/*.yaml`) to `params.yaml`, validated before anything is written.

    python -m pipeline.overlay configs/lra_listops.yaml [--params params.yaml] [--dry-run]

A preset is an overlay: its mappings merge into the params key by key (a value replaces the one at the same
YAML path), except the mappings named in `REPLACED` (`finetune.tasks`, `lengths.task_options`), which a preset
replaces whole: a preset's task list is the whole task list, and its task options are those of its task. The
merged params are validated with `pipeline.config` (every problem listed, exit status 2) and only then written,
atomically; YAML comments of the params file are not kept. `--dry-run` prints the merged params instead of writing them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_PARAMS, ConfigError, config_from_dict

REPLACED = {("finetune", "tasks"), ("lengths", "task_options")}


def merge(base: dict[str, Any], overlay: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`base` updated with `overlay` (a new dict; see the module docstring for the merge rule)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in REPLACED:
            out[key] = merge(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overlay(params: Path, preset: Path) -> dict[str, Any]:
    """The validated merge of `preset` into `params` (raises `ConfigError` naming every problem)."""
    loaded = []
    for path in (params, preset):
        if not path.is_file():
            raise ConfigError([f"file not found ({path.resolve()})"], str(path))
        try:
            loaded.append(yaml.safe_load(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
        if not isinstance(loaded[-1], dict):
            raise ConfigError([f"expected a mapping at the top level, got {loaded[-1]!r}"], str(path))
    merged = merge(loaded[0], loaded[1])
    config_from_dict(merged, f"{params} + {preset}")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply a params preset (configs/*.yaml) to params.yaml.")
    parser.add_argument("preset", type=Path, help="the preset, e.g. configs/lra_listops.yaml")
    parser.add_argument("--params", type=Path, default=Path(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the merged params instead of writing them")
    args = parser.parse_args(argv)
    try:
        merged = apply_overlay(args.params, args.preset)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = yaml.safe_dump(merged, sort_keys=False, default_flow_style=None, width=120)
    if args.dry_run:
        print(text, end="")
        return 0
    from pipeline.common import atomic_output

    with atomic_output(args.params) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{args.params}: {args.preset} applied (validated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
