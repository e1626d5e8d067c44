"""What a stage prints: its own log lines and progress bars, not the libraries' chatter.

`quiet_libraries()` silences what a user can do nothing about: Lightning's litlogger tip, accelerator banners and
`weights_only` note, the `srun` hint on machines that have SLURM installed, deprecation warnings raised inside
libraries, MLflow's schema-migration lines and artifact download bars. Real warnings (a user warning from our
code, a library error) still show. `progress(...)` is the bar for the evaluation and benchmark loops, shown only
on a terminal unless asked for. Nothing here imports Lightning (about 8 s of a stage's start-up on 2 cores): the
training bar is `pipeline.module.ProgressBar`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# (logger, level): library loggers whose INFO lines are noise for a stage's user
QUIET_LOGGERS = [
    ("lightning.pytorch.utilities.rank_zero", logging.WARNING),  # "GPU available: ...", the litlogger tip
    ("lightning.fabric.utilities.rank_zero", logging.WARNING),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", logging.WARNING),  # "`weights_only` was not set"
    ("lightning.pytorch.accelerators.cuda", logging.WARNING),
    ("mlflow.store.db.utils", logging.WARNING),  # "Creating initial MLflow database tables..."
    ("alembic.runtime.migration", logging.WARNING),
]

# warning messages (regular expressions) raised inside libraries that a user cannot act on
QUIET_WARNINGS = [
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"The `srun` command is available on your system but is not used.*",
    r".*does not have many workers which may be a bottleneck.*",  # num_workers is a params choice, documented
    r".*Any type hint is inferred as AnyType.*",
]


def quiet_libraries() -> None:
    """Silence library chatter for this process (idempotent); our own `pipeline` logger is left as it is."""
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lightning|torch|mlflow|deepspeed|datasets)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def progress_bar(total: int, desc: str, enabled: bool | None = None) -> Any:
    """A tqdm bar to `update()` by hand (by default shown only when stderr is a terminal); `close()` it."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """`iterable` with a tqdm bar on stderr (by default only when stderr is a terminal, so logs stay clean)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    yield from tqdm(iterable, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)
