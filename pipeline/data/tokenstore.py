"""The token store: each split as one flat, memory-mapped token file with document offsets.

Layout (`data/tokenized/`, written by the tokenize stage):

    meta.json              {"format": "token-store", "version": 1, "dtype": "uint16", "vocab_size", "splits"}
    <split>/tokens.bin     every document's ids (eos appended) back to back, raw little-endian `dtype`
    <split>/offsets.npy    int64 (documents + 1,): document i is tokens[offsets[i]:offsets[i + 1]]
    <split>/counts.npy     int64 (vocab_size,): how often each id occurs (the unigram baseline, without a pass)
    <split>/meta.json      {"documents": ..., "tokens": ..., "dtype": ..., "sha256": ...}

`dtype` is uint16 when every id fits (vocab_size <= 65,536), else uint32: about 2 bytes per token on disk.
Readers map the files (`mmap`, random access advised), so opening a split costs nothing and memory does not
grow with the corpus: pages are read on demand and shared by every process on the machine (DDP ranks, loader
workers).
Packing a split into fixed-length chunks is a reshape of the flat file (a view), not a copy.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "token-store"
VERSION = 1
TOKENS_NAME = "tokens.bin"
OFFSETS_NAME = "offsets.npy"
COUNTS_NAME = "counts.npy"
META_NAME = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id below `vocab_size`: uint16 up to 65,536 ids, else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of a raw token file (an empty array for an empty file, which mmap refuses).

    Advised random access: training reads one chunk here and one there, and the kernel's default read-around
    would page in (and count in the resident set) about 128 KB of the file for every ~1 KB example.
    """
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    with path.open("rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype)  # (N,) read-only view of the mapping


class TokenSplit(Sequence[np.ndarray]):
    """One split of the store: a sequence of documents (read-only views of the mapped token file).

    `tokens` is the whole flat stream (documents back to back, each ending with eos); `counts` the unigram
    counts. Pickles as its path, so loader worker processes re-map the file instead of copying it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found; run the tokenize stage (`dvc repro tokenize`)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.dtype = np.dtype(self.meta["dtype"])
        self.tokens = _map(self.path / TOKENS_NAME, self.dtype)  # (N,) a view of the mapped file
        self.offsets = np.load(self.path / OFFSETS_NAME, mmap_mode="r")  # (D + 1,) int64
        if len(self.tokens) != int(self.offsets[-1]) or len(self.offsets) != self.meta["documents"] + 1:
            raise ValueError(f"{self.path}: token file and offsets disagree; re-run the tokenize stage")
        self._fd: int | None = None

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens `[start, start + count)` of the flat stream, read with one positional read (a fresh array).

        Training fetches its examples this way rather than through the mapping: a fault on a mapped file maps a
        whole page-cache folio (often hundreds of KB on current kernels) into the resident set for every
        ~1 KB example; a read leaves the pages in the shared page cache only.
        """
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + count}) out of range [0, {self.num_tokens})")
        if self._fd is None:
            self._fd = os.open(self.path / TOKENS_NAME, os.O_RDONLY)
        data = os.pread(self._fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        i %= len(self)
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def num_tokens(self) -> int:
        """Tokens in the split (eos included)."""
        return len(self.tokens)

    @property
    def counts(self) -> np.ndarray:
        """(vocab_size,) int64 occurrences of each id in the split."""
        return np.load(self.path / COUNTS_NAME)

    def __repr__(self) -> str:
        return f"TokenSplit({str(self.path)!r}, documents={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


class TokenStore(dict):
    """The splits of a store by name (`store["train"]` is a `TokenSplit`); `meta` is the store's description."""

    def __init__(self, path: str | Path):
        path = Path(path)
        meta_path = path / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} holds no token store; run the tokenize stage first (`dvc repro tokenize`)")
        self.path = path
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: not a version-{VERSION} token store; re-run the tokenize stage")
        super().__init__({name: TokenSplit(path / name) for name in self.meta["splits"]})


class SplitWriter:
    """Appends documents to one split's files; `close()` writes offsets, counts and meta.

    Documents are appended as given (the caller appends eos). Memory: one int64 per document for the offsets
    plus the vocabulary-sized counts, never the tokens.
    """

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.dtype = vocab_size, token_dtype(vocab_size)
        self._file: BinaryIO = (self.path / TOKENS_NAME).open("wb")
        self._lengths: list[np.ndarray] = []
        self._counts = np.zeros(vocab_size, dtype=np.int64)
        self._hash = hashlib.sha256()

    def write_flat(self, tokens: np.ndarray, lengths: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Append documents given as one flat array and their lengths (`counts`: their unigram counts, if known)."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        buffer = data.tobytes()
        self._file.write(buffer)
        self._hash.update(buffer)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._counts += counts if counts is not None else np.bincount(data, minlength=self.vocab_size)

    def write(self, documents: Iterable[Sequence[int]]) -> None:
        """Append documents given as sequences of ids."""
        docs = [np.asarray(d, dtype=np.int64) for d in documents]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.write_flat(np.concatenate(docs) if docs else np.zeros(0, np.int64), lengths)

    def append_file(self, tokens_path: Path, lengths: np.ndarray, counts: np.ndarray) -> None:
        """Append a finished shard (raw tokens of this dtype, lengths and counts) by copying its file in blocks."""
        with tokens_path.open("rb") as src:
            for block in iter(lambda: src.read(1 << 24), b""):
                self._file.write(block)
                self._hash.update(block)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._counts += counts

    def close(self) -> dict[str, Any]:
        """Finish the split; returns its meta (documents, tokens, dtype, sha256)."""
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.path / OFFSETS_NAME, offsets)
        np.save(self.path / COUNTS_NAME, self._counts)
        meta = {
            "documents": len(lengths),
            "tokens": int(offsets[-1]),
            "dtype": self.dtype.name,
            "sha256": self._hash.hexdigest(),
        }
        if (self.path / TOKENS_NAME).stat().st_size != meta["tokens"] * self.dtype.itemsize:
            raise RuntimeError(f"{self.path}: token file size does not match the documents written")
        (self.path / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return meta


def write_store_meta(path: str | Path, vocab_size: int, splits: dict[str, dict[str, Any]], **info: Any) -> None:
    """Write the store's `meta.json` (after every split is closed)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "splits": splits,
        **info,
    }
    Path(path, META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_store(path: str | Path, splits: dict[str, Iterable[Sequence[int]]], vocab_size: int) -> TokenStore:
    """Write a whole store from in-memory documents (tests, small tools); returns it opened."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    metas = {}
    for name, docs in splits.items():
        writer = SplitWriter(path / name, vocab_size)
        writer.write(docs)
        metas[name] = writer.close()
    write_store_meta(path, vocab_size, metas)
    return TokenStore(path)


def store_signature(path: str | Path) -> list[tuple[str, str]]:
    """What identifies a store's content cheaply: each split's name and sha256 (from the metas)."""
    path = Path(path)
    return sorted(
        (p.parent.name, json.loads(p.read_text(encoding="utf-8")).get("sha256", ""))
        for p in path.glob(f"*/{META_NAME}")
        if p.is_file()
    )
