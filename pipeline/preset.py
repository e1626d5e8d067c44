"""Run a params preset (`configs/<name>.yaml`) as a DVC experiment: `dvc exp run -S ...` with the preset's values.

    python -m pipeline.preset long_range --temp          # in a temporary copy: the workspace is not touched
    python -m pipeline.preset table2 --queue -n table2   # queued (`dvc queue start` runs it)
    python -m pipeline.preset long_range --dry-run       # print the `dvc exp run` command, run nothing

A preset is a YAML mapping laid out like params.yaml, holding only what it changes. Its mappings merge into the
params key by key; the paths in `REPLACED` (and any the preset lists under `replace:`) are replaced whole, so a
preset's task list or variant list is the whole list. The merged params are validated first (every problem
listed, exit 2, nothing run). Then DVC itself applies the values, through its own `-S` overrides (Hydra's override
grammar: `key=value`, `+key=value` for a new key, `~key` to remove one): `params.yaml` is never rewritten by us, it
keeps its comments (DVC edits a copy in `--temp`/`--queue` experiments, or the workspace file in place, keeping
comments), and DVC records every value the preset set (`dvc exp show`, `dvc params diff`). The preset's name is
set as the `preset` param, which every MLflow run of the experiment is tagged with.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_PARAMS, ConfigError, config_from_dict

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
REPLACED = {("finetune", "tasks"), ("lengths", "task_options")}
"""Mappings a preset replaces whole (a preset's task list is the whole task list; its task options are its task's)."""


def preset_path(name: str) -> Path:
    """`configs/<name>.yaml` (a path to a YAML file is taken as it is)."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else PRESETS_DIR / f"{name}.yaml"


def load_preset(name: str) -> tuple[dict[str, Any], set[tuple[str, ...]]]:
    """The preset's values (without `replace:`) and the paths it replaces whole."""
    path = preset_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError([f"no preset {name!r} ({path} not found); presets: {known}"], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping at the top level, got {raw!r}"], str(path))
    replaced = set(REPLACED) | {tuple(p.split(".")) for p in raw.pop("replace", None) or []}
    return raw, replaced


def merge(
    base: dict[str, Any], overlay: dict[str, Any], replaced: set[tuple[str, ...]], path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`base` updated with `overlay`: mappings merge key by key, except those at `replaced` paths."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in replaced:
            out[key] = merge(out[key], value, replaced, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (what `dvc exp run -S` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in ("null", "true", "false", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as an override")


def overrides(
    params: dict[str, Any], overlay: dict[str, Any], replaced: set[tuple[str, ...]], path: tuple[str, ...] = ()
) -> list[str]:
    """The `-S` values that turn `params` into `merge(params, overlay)`: `key=value` for a key params has,
    `+key=value` for a new one, `~key` then `+key=value` for a path replaced whole."""
    out: list[str] = []
    for key, value in overlay.items():
        here = (*path, key)
        dotted = ".".join(here)
        has = isinstance(params, dict) and key in params
        if here in replaced:
            out += ([f"~{dotted}"] if has else []) + [f"+{dotted}={hydra_value(value)}"]
        elif isinstance(value, dict) and has and isinstance(params[key], dict):
            out += overrides(params[key], value, replaced, here)
        else:
            out.append(f"{'' if has else '+'}{dotted}={hydra_value(value)}")
    return out


def resolve(name: str, params_file: Path) -> tuple[dict[str, Any], list[str]]:
    """(the params with preset `name` applied, validated; the `-S` values that apply it with DVC)."""
    overlay, replaced = load_preset(name)
    overlay = {**overlay, "preset": preset_path(name).stem}
    if not params_file.is_file():
        raise ConfigError([f"file not found ({params_file.resolve()})"], str(params_file))
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    merged = merge(params, overlay, replaced)
    config_from_dict(merged, f"{params_file} + {preset_path(name)}")
    return merged, overrides(params, overlay, replaced)


def command(name: str, params_file: Path, dvc_args: list[str]) -> list[str]:
    """`dvc exp run <dvc_args> -S ...` for preset `name` over `params_file`, after validating the merge."""
    _, values = resolve(name, params_file)
    return ["dvc", "exp", "run", *dvc_args, *[arg for value in values for arg in ("-S", value)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a params preset (configs/<name>.yaml) as a DVC experiment.")
    parser.add_argument("preset", help="a preset name (configs/<name>.yaml) or a path to one")
    parser.add_argument("--params", type=Path, default=Path(DEFAULT_PARAMS), help="params file (default: %(default)s)")
    parser.add_argument("--temp", action="store_true", help="run in a temporary copy (dvc exp run --temp)")
    parser.add_argument("--queue", action="store_true", help="queue it (dvc exp run --queue; dvc queue start)")
    parser.add_argument("-n", "--name", help="the experiment's name (dvc exp run -n)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc command instead of running it")
    args, extra = parser.parse_known_args(argv)
    dvc_args = [*(["--temp"] if args.temp else []), *(["--queue"] if args.queue else [])]
    dvc_args += [*(["-n", args.name] if args.name else []), *extra]
    try:
        cmd = command(args.preset, args.params, dvc_args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
