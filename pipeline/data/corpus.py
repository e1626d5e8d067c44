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
import codecs
import glob
import hashlib
import logging
import os
import re
import sysconfig
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import StageError
from pipeline.config.sections import DataConfig, FilesSource, HubSource

log = logging.getLogger("pipeline.data.corpus")

SPLITS = ("train", "validation", "test")

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


def iter_clean_documents(documents: Iterable[str | None], cfg: DataConfig, stats: CorpusStats) -> Iterator[str]:
    """Normalise, filter by length, drop exact duplicates and cap, lazily in source order; updates `stats`.

    Reading stops as soon as `cfg.max_documents` documents are kept, so a streamed source is read only as
    far as needed. Memory: one 16-byte digest per kept document for the duplicate check, never the texts.
    """
    kept, cap = 0, effective_cap(cfg)
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
        yield text
        kept += 1
        if cap is not None and kept >= cap:
            break


def clean_documents(documents: Iterable[str | None], cfg: DataConfig, stats: CorpusStats) -> list[str]:
    """`iter_clean_documents` as a list (small corpora, tests)."""
    return list(iter_clean_documents(documents, cfg, stats))


def split_indices(n: int, seed: int, validation_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Deterministic train/validation/test split of `n` documents: sorted index arrays from a permutation
    seeded by `seed` (8 bytes per document, never the texts).

    Validation and test get `round(n * fraction)` documents each, at least one; train gets the rest (at
    least one).
    """
    if n < 3:
        raise StageError(
            f"the corpus has {n} document(s) after filtering; need at least 3 (one per split). "
            "A single text file is one document with data.files.sample_by: document; use paragraph or line"
        )
    n_val = max(1, round(n * validation_fraction))
    n_test = max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise StageError(f"the corpus has {n} documents: too few for validation and test fractions and a train split")
    order = np.random.default_rng(seed).permutation(n)
    parts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {name: np.sort(parts[name]) for name in SPLITS}


def split_documents(
    documents: list[str], seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """`split_indices` applied to a list of texts: within each split documents keep their source order."""
    parts = split_indices(len(documents), seed, validation_fraction, test_fraction)
    return {name: [documents[i] for i in parts[name]] for name in SPLITS}


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

FILE_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
"""File suffix -> the `datasets` builder that reads it (`data.files.format: auto`)."""
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
"""Compressed files (`c4-train.00000-of-01024.json.gz`) are read through `datasets`' own decompression."""


def file_format(path: Path) -> str | None:
    """The builder for a file by its suffix (a compression suffix is looked through), or None."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return FILE_FORMATS.get(suffixes[-1]) if suffixes else None


def match_files(pattern: str, root: Path, fmt: str = "auto") -> tuple[list[Path], str]:
    """(files matching a glob, relative to `root` unless absolute, `**` recursing, sorted; their builder).

    With `fmt` `auto` every file's suffix must name the same builder (`text`, `json`, `parquet`, `csv`).
    """
    base = "" if os.path.isabs(pattern) else str(root)
    matches = glob.glob(os.path.join(base, pattern), recursive=True)
    files = sorted(Path(m) for m in matches if os.path.isfile(m))
    if not files:
        raise StageError(f"data.files.glob: {pattern!r} matched no files under {root}")
    if fmt != "auto":
        return files, fmt
    formats = {f: file_format(f) for f in files}
    unsupported = [f for f, kind in formats.items() if kind is None]
    if unsupported:
        raise StageError(
            f"data.files.glob: {pattern!r} matched {len(unsupported)} file(s) of unsupported type, e.g. "
            f"{unsupported[0]}; supported: {', '.join(FILE_FORMATS)} (optionally {', '.join(COMPRESSIONS)}), "
            "or set data.files.format"
        )
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        raise StageError(
            f"data.files.glob: {pattern!r} mixes {' and '.join(kinds)} files; narrow the glob to one format"
        )
    return files, kinds[0]


def _invalid_utf8(path: Path, exc: UnicodeDecodeError, on_invalid: str) -> None:
    if on_invalid == "error":
        raise StageError(
            f"{path}: the file is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
            "set data.on_invalid_utf8: skip to skip such files"
        )
    log.warning("skipping %s: the file is not valid UTF-8", path)


def check_utf8(path: Path) -> None:
    """Raise `UnicodeDecodeError` unless the (uncompressed) file is valid UTF-8; reads it in 16 MB blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            decoder.decode(block)
    decoder.decode(b"", final=True)


def _load_file(path: Path, fmt: str, files: FilesSource) -> Any:
    import datasets

    # the builders log a file they cannot read before raising; the stage's own message names it once
    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)
    kwargs: dict[str, Any] = {}
    if fmt == "text":  # one row per line, blank-line separated paragraph, or whole file
        sample_by = files.sample_by
        kwargs = {"sample_by": sample_by, "keep_linebreaks": sample_by != "line"}
    return datasets.load_dataset(fmt, data_files=[str(path)], split="train", streaming=True, **kwargs)


def _file_records(path: Path, fmt: str, files: FilesSource) -> Iterator[str | None]:
    """The text of each record. A JSON or parquet record without the text field, or with one that is not a string,
    is an error naming the record (counted from 1: the line of a JSON-lines file), not a document too short: a
    record missing from the corpus would otherwise go unnoticed. (An empty CSV cell is an empty document.)"""
    field_name = "text" if fmt == "text" else files.text_field
    try:
        ds = _load_file(path, fmt, files)  # parquet reads the file's schema here
        for n, record in enumerate(ds, 1):
            if field_name not in record:
                raise StageError(
                    f"{path}: no field {field_name!r} (data.files.text_field) in record {n}; found: {', '.join(record)}"
                )
            value = record[field_name]
            if fmt in ("json", "parquet") and not isinstance(value, str):
                if value is None:
                    others = ", ".join(k for k, v in record.items() if v is not None) or "none"
                    what = f"no text: its {field_name!r} field is missing or null (the fields it has: {others})"
                else:
                    what = f"a {type(value).__name__}, not text, in its {field_name!r} field"
                raise StageError(
                    f"{path}: record {n} has {what}; fix or remove the record, or set data.files.text_field to the "
                    "field that holds the text"
                )
            yield value
    except StageError:
        raise
    except Exception as exc:  # the builders raise pyarrow, json, csv and OS errors alike: name the file
        problem = " ".join(str(exc).split())[:300]
        raise StageError(
            f"{path}: cannot read it as {fmt} ({type(exc).__name__}: {problem}); the file is damaged or not {fmt}: "
            "replace it, or narrow data.files.glob to leave it out"
        ) from None


def file_documents(files: FilesSource, root: Path, on_invalid_utf8: str, stats: CorpusStats) -> Iterator[str | None]:
    """Documents of the files matched by `files.glob`, file by file in sorted order, streamed through
    `datasets`' own loaders (nothing is read into memory whole). Text files are cut by `files.sample_by`;
    JSON (lines), parquet and CSV give one document per record, the `files.text_field` column.

    Uncompressed text, JSON and CSV files are checked to be UTF-8 before reading (invalid ones are skipped
    whole and counted, or are an error: `on_invalid_utf8`).
    """
    paths, fmt = match_files(files.glob, root, files.format)
    for path in paths:
        if fmt != "parquet" and path.suffix not in COMPRESSIONS:
            try:
                check_utf8(path)
            except UnicodeDecodeError as exc:
                _invalid_utf8(path, exc, on_invalid_utf8)
                stats.skipped_files += 1
                stats.skipped_paths.append(str(path))
                continue
        yield from _file_records(path, fmt, files)


# --------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class DataPreset:
    """A named corpus for cluster runs: where it lives on the hub, what a document is, how much of it to use,
    and the sizes and lengths of the C4 pretraining setting of Raffel et al. 2020 (`pretraining_params`,
    dotted params keys)."""

    hub: str
    """Dataset name on the hub; `data.preset_dir` may point at a local copy of the same layout instead."""
    config: str
    split: str
    text_column: str
    documents: str
    """`rows` (one record, one document) or `wikitext_articles` (rows are lines; a ` = Title = ` line starts
    the next article)."""
    max_documents: int | None
    """The preset's document cap, used when `data.max_documents` is null."""
    pretraining_params: dict[str, Any]


C4_PRETRAINING_SETTING = {
    # T5 paper (Raffel et al. 2020), section 3.1: SentencePiece vocabulary of 32,000 pieces (plus 100
    # sentinels), inputs of 512 tokens (span corruption of 568 raw tokens gives 114 targets, section 3.1.4),
    # batches of 128 sequences, 2^19 pretraining steps: 2^35 (~34B) tokens.
    "tokenizer.vocab_size": 32_100,
    "tokenizer.num_sentinels": 100,
    "pretrain.input_length": 512,
    "pretrain.batch_size": 128,
    "pretrain.max_steps": 524_288,
}

DATA_PRESETS: dict[str, DataPreset] = {
    # WikiText-103 (Merity et al. 2016): 28,475 train articles, ~103M words, ~540 MB of raw text.
    "wikitext-103": DataPreset(
        "Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text", "wikitext_articles", None, C4_PRETRAINING_SETTING
    ),
    # C4 English (allenai/c4, config `en`: 1024 gzipped JSON-lines train shards, ~365M documents, ~156B
    # tokens). 80M documents (~427 tokens each) cover T5's 2^35-token budget without repeating any document,
    # which the paper found to matter (section 3.4.2, table 9).
    "c4-en": DataPreset("allenai/c4", "en", "train", "text", "rows", 80_000_000, C4_PRETRAINING_SETTING),
}


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \s*$")


def wikitext_articles(rows: Iterable[str | None]) -> Iterator[str]:
    """WikiText rows (one line each, headings as ` = Title = `) regrouped into articles."""
    article: list[str] = []
    for row in rows:
        if not row:
            continue
        if _WIKITEXT_TITLE.match(row) and article:
            yield "".join(article)
            article = []
        article.append(row if row.endswith("\n") else row + "\n")
    if article:
        yield "".join(article)


def preset_documents(cfg: DataConfig) -> Iterator[str | None]:
    """Documents of the named preset, streamed from the hub or from `data.preset_dir` (same layout)."""
    if cfg.preset not in DATA_PRESETS:
        raise StageError(f"data.preset: {cfg.preset!r} is not a preset; choose one of {', '.join(DATA_PRESETS)}")
    preset = DATA_PRESETS[cfg.preset]
    name = preset.hub
    if cfg.preset_dir:
        name = str(Path(cfg.preset_dir).expanduser())
        if not Path(name).is_dir():
            raise StageError(f"data.preset_dir: {name} is not a directory (a local copy of {preset.hub})")
    hub = HubSource(name=name, config=preset.config, split=preset.split, text_column=preset.text_column, streaming=True)
    rows = hub_documents(hub)
    return wikitext_articles(rows) if preset.documents == "wikitext_articles" else rows


def preset_mismatches(preset: str, values: dict[str, Any]) -> list[str]:
    """`key=value` of the preset's pretraining setting that differ from `values` (dotted params keys -> values)."""
    wanted = DATA_PRESETS[preset].pretraining_params
    return [f"{key}={value}" for key, value in wanted.items() if values.get(key) != value]


# ---------------------------------------------------------------------------------------------- corpus


def read_source(cfg: DataConfig, root: Path, stats: CorpusStats) -> Iterator[str | None]:
    """Raw documents of the configured source."""
    if cfg.source == "builtin":
        if not (cfg.builtin.topics or cfg.builtin.docstrings):
            raise StageError("data.builtin: both `topics` and `docstrings` are off: the corpus would be empty")
        return builtin_documents(cfg.builtin.topics, cfg.builtin.docstrings)
    if cfg.source == "hub":
        return hub_documents(cfg.hub)
    if cfg.source == "preset":
        return preset_documents(cfg)
    return file_documents(cfg.files, root, cfg.on_invalid_utf8, stats)


def effective_cap(cfg: DataConfig) -> int | None:
    """`data.max_documents`, or the preset's cap when that is null."""
    if cfg.max_documents is None and cfg.source == "preset" and cfg.preset in DATA_PRESETS:
        return DATA_PRESETS[cfg.preset].max_documents
    return cfg.max_documents


ARROW_BATCH_DOCUMENTS = 4096
ARROW_BATCH_BYTES = 32 << 20


def _write_arrow(texts: Iterable[str], path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Stream texts into an Arrow IPC file (column `text`) in bounded batches; returns per-document
    (characters, words) as int64 arrays and a digest of the texts."""
    import pyarrow as pa

    schema = pa.schema([("text", pa.string())])
    chars, words = array("q"), array("q")
    digest = hashlib.blake2b(digest_size=16)
    batch: list[str] = []
    size = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for text in texts:
            batch.append(text)
            chars.append(len(text))
            words.append(len(text.split()))
            digest.update(len(text).to_bytes(8, "little"))
            digest.update(text.encode("utf-8", "surrogatepass"))
            size += len(text)
            if len(batch) >= ARROW_BATCH_DOCUMENTS or size >= ARROW_BATCH_BYTES:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                batch, size = [], 0
        if batch:
            writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
    return np.frombuffer(chars, dtype=np.int64), np.frombuffer(words, dtype=np.int64), digest.hexdigest()


def write_prepared(cfg: DataConfig, seed: int, root: Path, out_dir: Path, scratch: Path) -> dict[str, Any]:
    """Read, clean and split the corpus into a `datasets.DatasetDict` saved at `out_dir`; returns the metrics.

    The cleaned documents stream into one Arrow file in `scratch` (a directory the caller removes), the
    split is drawn over document indices, and each split is saved from memory-mapped Arrow: memory stays
    bounded by a batch of documents plus a few bytes per document, whatever the corpus size.
    """
    import datasets

    stats = CorpusStats()
    raw = scratch / "documents.arrow"
    chars, words, digest = _write_arrow(iter_clean_documents(read_source(cfg, root, stats), cfg, stats), raw)
    if len(chars) == 0:
        raise StageError(
            f"the corpus is empty: {stats.read} document(s) read from source {cfg.source!r}, "
            f"{stats.too_short} shorter than data.min_chars={cfg.min_chars}, {stats.skipped_files} file(s) skipped"
        )
    if len(chars) < 3:  # where the documents went, not only that too few are left
        raise StageError(
            f"the corpus has {len(chars)} document(s) after filtering; need at least 3 (one per split): "
            f"{stats.read} read from source {cfg.source!r}, {stats.too_short} shorter than "
            f"data.min_chars={cfg.min_chars}, {stats.duplicates_removed} duplicate(s) removed (data.dedup), "
            f"{stats.skipped_files} file(s) skipped"
        )
    parts = split_indices(len(chars), seed, cfg.validation_fraction, cfg.test_fraction)
    documents = datasets.Dataset.from_file(str(raw))
    # fingerprints from the content and the split, not from the scratch path: the same corpus gives
    # byte-identical outputs (DVC and the tokenize stage's resume key compare them)
    split_key = hashlib.blake2b(f"{digest}/{seed}/{cfg.validation_fraction}/{cfg.test_fraction}".encode()).hexdigest()
    splits = datasets.DatasetDict(
        {name: documents.select(parts[name], new_fingerprint=f"{split_key[:32]}{i}") for i, name in enumerate(SPLITS)}
    )
    splits.save_to_disk(str(out_dir))
    metrics: dict[str, Any] = {
        name: {
            "documents": len(parts[name]),
            "characters": int(chars[parts[name]].sum()),
            "words": int(words[parts[name]].sum()),
        }
        for name in SPLITS
    }
    metrics.update(
        documents_read=stats.read,
        documents_kept=len(chars),
        too_short=stats.too_short,
        duplicates_removed=stats.duplicates_removed,
        skipped_files=stats.skipped_files,
    )
    return metrics
