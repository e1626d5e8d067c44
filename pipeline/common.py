"""What every stage shares: its entry-point wrapper, user-facing errors and atomic output writing.

A stage never leaves half-written outputs and never destroys previous results on failure: it writes into a
temporary sibling of each output and swaps it into place only when the whole output is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS, Config, load_config_or_exit

log = logging.getLogger("pipeline")


class StageError(RuntimeError):
    """A problem the user can fix (bad input, missing file, unreachable server): printed without a traceback."""


def repo_root(start: str | Path | None = None) -> Path:
    """The directory holding `params.yaml` (the DVC project root), searched upwards from `start` or the cwd."""
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / DEFAULT_PARAMS).is_file() or (candidate / ".dvc").is_dir():
            return candidate
    return here


def stage_parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the `--params` option every stage takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    return parser


def run_stage(
    body: Callable[[Config, argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> int:
    """Parse arguments, load the validated config (exit 2 on config errors) and run `body`.

    A `StageError` (or a missing input file) is printed as one `error: ...` line with exit status 1;
    Ctrl-C exits with 130. Other exceptions keep their traceback: they are bugs.
    """
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), format="%(message)s")
    args = parser.parse_args(argv)
    cfg = load_config_or_exit(args.params)
    try:
        body(cfg, args)
    except (StageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or directory, the caller decides) that replaces `target` on success.

    On an exception the temporary path is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()  # the caller creates a file or a directory at this path
    try:
        yield tmp
        if not tmp.exists():
            raise StageError(f"internal error: nothing was written for {target}")
        backup = None
        if target.exists() or target.is_symlink():
            backup = target.with_name(f".{target.name}.old")
            _remove(backup)
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            _remove(backup)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as pretty JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
