"""Corpus preparation: read documents from a source, clean them, split them, describe them.

Sources (`data.source` in params):
- `builtin`: English prose every Python installation carries, with no download: the language-reference
  topics of `pydoc_data/topics.py` and the docstrings of the standard library. Both are read by parsing the
  source files with `ast`, never by importing them (importing runs module code). Files are visited in sorted
  order, so the corpus is deterministic for a given Python version.
- `hub`: `datasets.load_dataset(name, config, split=..., streaming=..., revision=...)`, reading one text
  column; `data.max_documents` stops a streamed corpus early.
- `files`: local `.txt` (one document per file), `.jsonl` (one record per line) or `.parquet` files matched
  by a glob, with the text field named in params. Invalid UTF-8 is skipped and counted, or is an error.

Cleaning is lazy and in source order: whitespace normalisation, the minimum-length filter, exact-duplicate
removal, then the `max_documents` cap (so a streamed corpus is read only as far as needed). The split into
train/validation/test is a seeded permutation of the kept documents.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import os
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import StageError
from pipeline.config import DataConfig, FilesSource, HubSource

log = logging.getLogger("pipeline.data")

SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Standard-library directories whose docstrings are not prose worth keeping (tests, vendored or
# deprecated trees, demos) or that are not part of the library at all (installed packages).
SKIP_STDLIB_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "distutils",
        "encodings",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "__pycache__",
        "__phello__",
    }
)


@dataclass
class CorpusStats:
    """Counts gathered while reading and cleaning a corpus (written to the prepare metrics)."""

    read: int = 0
    """Documents read from the source (before any filter)."""
    too_short: int = 0
    """Documents dropped for being shorter than `data.min_chars` after normalisation."""
    duplicates_removed: int = 0
    """Exact duplicates dropped (after normalisation)."""
    skipped_files: int = 0
    """Files skipped because they are not valid UTF-8 (`on_invalid_utf8: skip`)."""
    skipped_records: int = 0
    """`.jsonl`/`.parquet` records skipped because they are not valid UTF-8 text."""
    skipped_paths: list[str] = field(default_factory=list)
    """The skipped files, for the log."""


# --------------------------------------------------------------------------------------------- cleaning

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")  # any whitespace except newline
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """Collapse runs of spaces/tabs to one space, strip every line, keep at most one blank line in a row.

    Line breaks are kept (paragraphs and code examples stay readable); `\\r\\n` and `\\r` become `\\n`.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def clean_documents(documents: Iterable[str | None], cfg: DataConfig, stats: CorpusStats) -> list[str]:
    """Normalise, filter by length, drop exact duplicates and cap, in source order; updates `stats`.

    Reading stops as soon as `cfg.max_documents` documents are kept, so a streamed source is read only as
    far as needed.
    """
    kept: list[str] = []
    seen: set[bytes] = set()
    for doc in documents:
        stats.read += 1
        text = doc if isinstance(doc, str) else ""
        if cfg.normalize_whitespace:
            text = normalize_text(text)
        if len(text) < max(cfg.min_chars, 1):  # empty documents are always dropped
            stats.too_short += 1
            continue
        if cfg.dedup:
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest in seen:
                stats.duplicates_removed += 1
                continue
            seen.add(digest)
        kept.append(text)
        if cfg.max_documents is not None and len(kept) >= cfg.max_documents:
            break
    return kept


def split_documents(
    documents: list[str], seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Deterministic train/validation/test split: a permutation seeded by `seed`.

    Validation and test get `round(n * fraction)` documents each, at least one; train gets the rest (at
    least one). Within each split documents keep their source order.
    """
    n = len(documents)
    if n < 3:
        raise StageError(f"the corpus has {n} document(s) after filtering; need at least 3 (one per split)")
    n_val = max(1, round(n * validation_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise StageError(f"the corpus has {n} documents: too few for validation and test fractions and a train split")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = {
        "validation": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
    return {name: [documents[i] for i in sorted(parts[name])] for name in SPLITS}


def split_stats(texts: list[str]) -> dict[str, int]:
    """Documents, characters and whitespace-separated words of one split."""
    return {
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "words": sum(len(t.split()) for t in texts),
    }


# ------------------------------------------------------------------------------------- builtin source


def stdlib_dir() -> Path:
    """The standard library's source directory (from `sysconfig`, not from a module's `__file__`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def pydoc_topics(stdlib: Path | None = None) -> Iterator[str]:
    """The language-reference topic texts of `pydoc_data/topics.py`, sorted by topic name.

    The file is one assignment `topics = {...}` of string literals; it is parsed, never imported.
    """
    path = (stdlib or stdlib_dir()) / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise StageError(f"data.builtin.topics: {path} not found (this Python installation has no pydoc_data)")
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield topics[name]
            return
    raise StageError(f"data.builtin.topics: no `topics = {{...}}` assignment found in {path}")


def stdlib_source_files(stdlib: Path | None = None) -> Iterator[Path]:
    """The standard library's `.py` files in sorted order, skipping tests, vendored trees and site-packages."""
    root = stdlib or stdlib_dir()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_STDLIB_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(("test_", "_py")):  # _pyio, _pydecimal: C twins
                yield Path(dirpath) / name


_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_private(node: ast.AST) -> bool:
    name = getattr(node, "name", "")
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_docstrings(source: bytes, filename: str = "<source>") -> Iterator[str]:
    """Docstrings of a module and of its public classes and functions (any depth), in source order.

    Private helpers (`_name`) are skipped: their docstrings are terse notes rather than prose.
    Files that do not parse (e.g. templates shipped with the library) yield nothing.
    """
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError):
        return
    nodes = [n for n in ast.walk(tree) if isinstance(n, _DOCSTRING_OWNERS)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # ast.walk is breadth-first; keep reading order
    for node in nodes:
        if _is_private(node):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def builtin_documents(topics: bool = True, docstrings: bool = True, stdlib: Path | None = None) -> Iterator[str]:
    """The builtin corpus: pydoc topics first, then standard-library docstrings file by file."""
    if topics:
        yield from pydoc_topics(stdlib)
    if docstrings:
        for path in stdlib_source_files(stdlib):
            yield from module_docstrings(path.read_bytes(), str(path))


# ----------------------------------------------------------------------------------------- hub source


def hub_documents(hub: HubSource) -> Iterator[str | None]:
    """Documents of one text column of a `datasets` dataset (hub name or local directory)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            hub.name, hub.config, split=hub.split, streaming=hub.streaming, revision=hub.revision
        )
    except FileNotFoundError as exc:
        raise StageError(f"data.hub.name: dataset {hub.name!r} not found: {exc}") from None
    except (ValueError, ConnectionError, OSError) as exc:
        raise StageError(
            f"data.hub: cannot load {hub.name!r} (config {hub.config!r}, split {hub.split!r}): {exc}"
        ) from None
    columns = ds.column_names
    if columns is None:  # a streamed dataset without declared features: look at the first record
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    if hub.text_column not in columns:
        raise StageError(
            f"data.hub.text_column: no column {hub.text_column!r} in {hub.name!r}; columns: {', '.join(columns)}"
        )
    for record in ds:
        yield record[hub.text_column]


# --------------------------------------------------------------------------------------- files source


def match_files(pattern: str, root: Path) -> list[Path]:
    """Files matching a glob (relative to `root` unless absolute; `**` recurses), sorted."""
    base = "" if os.path.isabs(pattern) else str(root)
    matches = glob.glob(os.path.join(base, pattern), recursive=True)
    files = sorted(Path(m) for m in matches if os.path.isfile(m))
    if not files:
        raise StageError(f"data.files.glob: {pattern!r} matched no files under {root}")
    unsupported = [f for f in files if f.suffix not in FILE_SUFFIXES]
    if unsupported:
        raise StageError(
            f"data.files.glob: {pattern!r} matched {len(unsupported)} file(s) of unsupported type, e.g. "
            f"{unsupported[0]}; supported: {', '.join(FILE_SUFFIXES)}"
        )
    return files


def _invalid_utf8(path: Path, what: str, exc: UnicodeDecodeError, on_invalid: str) -> None:
    if on_invalid == "error":
        raise StageError(
            f"{path}: {what} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "set data.on_invalid_utf8: skip to skip such input"
        )
    log.warning("skipping %s: %s is not valid UTF-8", path, what)


def _txt_documents(path: Path, on_invalid: str, stats: CorpusStats) -> Iterator[str]:
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        _invalid_utf8(path, "the file", exc, on_invalid)
        stats.skipped_files += 1
        stats.skipped_paths.append(str(path))


def _jsonl_documents(path: Path, text_field: str, on_invalid: str, stats: CorpusStats) -> Iterator[str | None]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _invalid_utf8(path, f"line {lineno}", exc, on_invalid)
                stats.skipped_records += 1
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise StageError(f"{path}:{lineno}: no field {text_field!r} (data.files.text_field); found: {fields}")
            yield record[text_field]


def _parquet_documents(path: Path, text_field: str, on_invalid: str, stats: CorpusStats) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise StageError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise StageError(f"{path}: no column {text_field!r} (data.files.text_field); columns: {', '.join(names)}")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        column = batch.column(0)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            for i, value in enumerate(column.to_pylist()):
                try:
                    yield None if value is None else value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    _invalid_utf8(path, f"record {i}", exc, on_invalid)
                    stats.skipped_records += 1
        else:  # arrow strings are UTF-8 by construction
            yield from column.to_pylist()


def file_documents(files: FilesSource, root: Path, on_invalid_utf8: str, stats: CorpusStats) -> Iterator[str | None]:
    """Documents of the files matched by `files.glob`, file by file in sorted order."""
    for path in match_files(files.glob, root):
        if path.suffix == ".txt":
            yield from _txt_documents(path, on_invalid_utf8, stats)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, files.text_field, on_invalid_utf8, stats)
        else:
            yield from _parquet_documents(path, files.text_field, on_invalid_utf8, stats)


# ---------------------------------------------------------------------------------------------- corpus


def read_source(cfg: DataConfig, root: Path, stats: CorpusStats) -> Iterator[str | None]:
    """Raw documents of the configured source."""
    if cfg.source == "builtin":
        if not (cfg.builtin.topics or cfg.builtin.docstrings):
            raise StageError("data.builtin: both `topics` and `docstrings` are off: the corpus would be empty")
        return builtin_documents(cfg.builtin.topics, cfg.builtin.docstrings)
    if cfg.source == "hub":
        return hub_documents(cfg.hub)
    return file_documents(cfg.files, root, cfg.on_invalid_utf8, stats)


def prepare_corpus(cfg: DataConfig, seed: int, root: Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Read, clean and split the corpus; returns the splits and the stats written as metrics."""
    stats = CorpusStats()
    documents = clean_documents(read_source(cfg, root, stats), cfg, stats)
    if not documents:
        raise StageError(
            f"the corpus is empty: {stats.read} document(s) read from source {cfg.source!r}, "
            f"{stats.too_short} shorter than data.min_chars={cfg.min_chars}, {stats.skipped_files} file(s) skipped"
        )
    splits = split_documents(documents, seed, cfg.validation_fraction, cfg.test_fraction)
    metrics: dict[str, Any] = {name: split_stats(texts) for name, texts in splits.items()}
    metrics.update(
        documents_read=stats.read,
        documents_kept=len(documents),
        too_short=stats.too_short,
        duplicates_removed=stats.duplicates_removed,
        skipped_files=stats.skipped_files,
        skipped_records=stats.skipped_records,
    )
    return splits, metrics


def to_dataset_dict(splits: dict[str, list[str]]) -> Any:
    """The splits as a `datasets.DatasetDict` with one `text` column."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": splits[name]}, features=features) for name in SPLITS}
    )
