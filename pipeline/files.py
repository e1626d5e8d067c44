"""The user-facing error of every stage and the loaders of the plain files stages read (JSON metrics, CSV loss
histories), without the rest of `pipeline.common`: stages that only read these files (`pipeline.plots`) load
nothing else. `pipeline.common` re-exports them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A problem the user can fix (bad input, missing file, unreachable server): printed without a traceback."""


class CorruptFileError(StageError):
    """A file a stage reads exists but cannot be read back (truncated, not the expected format)."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{path} is corrupt or unreadable ({problem}); {fix}")


def read_json(path: str | Path, fix: str) -> Any:
    """Parse a JSON file a stage reads; missing, unreadable or corrupt -> `StageError` naming it and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path} not found: {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(path, f"not valid JSON: {exc}", fix) from None
    except OSError as exc:
        raise CorruptFileError(path, exc.strerror or str(exc), fix) from None


def read_numeric_csv(path: str | Path, fix: str) -> list[dict[str, float]]:
    """Rows of a numeric CSV a stage reads (a loss history), empty cells dropped; [] when the file does not exist.
    Not UTF-8, a cell that is not a number, or a row with missing or extra cells (a file cut off mid-row) ->
    `CorruptFileError` naming the file and `fix`: a truncated history must not quietly lose its last rows."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict[str, float]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row or None in row.values():  # DictReader's marks of extra and of missing cells
                    cells = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise ValueError(f"line {reader.line_num} has {cells} cells for {len(reader.fieldnames)} columns")
                rows.append({k: float(v) for k, v in row.items() if v != ""})
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise CorruptFileError(path, str(exc).splitlines()[0][:200], fix) from None
    except OSError as exc:
        raise CorruptFileError(path, exc.strerror or str(exc), fix) from None
    return rows
