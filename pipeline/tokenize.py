"""`tokenize` stage: train (or load) the SentencePiece tokenizer and tokenize every split into the token store.

Inputs: `data/prepared/` from `prepare`. Outputs: `data/tokenizer/` (`spm.model` + `tokenizer.json`, see
`pipeline/data/tokenizer.py`), `data/tokenized/` (the memory-mapped token store of `pipeline/data/tokenstore.py`: per
split a flat uint16/uint32 token file, eos after every document, with document offsets) and
`metrics/tokenize.json` (documents and tokens per split, vocabulary, throughput, bytes per token on disk).

Scale: memory is bounded by the tokenizer's training sample, not by the corpus.
- SentencePiece is trained on a seeded sample of train documents of at most `tokenizer.train_sample_mb` MB of
  text (the whole train split when it is smaller), then at most `input_sentence_size` of its lines.
- Each split is cut into shards of about `tokenizer.shard_mb` MB of text; `tokenizer.num_proc` worker
  processes encode shards in parallel (one SentencePiece thread each), reading the prepared Arrow files
  through their memory map, a `batch_size`-document slice at a time. The pages read are dropped from the
  process after each slice (`SplitTexts`): they stay in the shared page cache, but a worker's resident set
  does not grow with the text it has read.
- Finished shards (and the trained tokenizer) are kept in `data/tokenized.partial/` until the stage
  completes, under a key of everything that decides the outputs: a killed run continues from the finished
  shards; a run with other params or other prepared data starts over.
- The outputs are assembled in temporary siblings and swapped into place at the end, so a failed run leaves
  the previous outputs intact; temporary siblings left by a killed run are removed by the next one
  (`common.recover_output`, which also rolls back a swap interrupted half-way).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import logging
import math
import mmap
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import StageError, atomic_output, recover_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config, TokenizerConfig
from pipeline.config.paths import stage_timing
from pipeline.data.tokenizer import MODEL_NAME, Tokenizer, train_sentencepiece
from pipeline.data.tokenstore import SplitWriter, token_dtype, write_store_meta

log = logging.getLogger("pipeline.tokenize")

PREPARED_DIR = "data/prepared"
TOKENIZER_DIR = "data/tokenizer"
TOKENIZED_DIR = "data/tokenized"
WORK_DIR = "data/tokenized.partial"
METRICS_FILE = "metrics/tokenize.json"
SPLITS = ("train", "validation", "test")
MIN_PARALLEL_BYTES = 4 << 20
"""Below this much text left to encode, worker processes cost more than they save: encode in-process."""
RELEASE_MARGIN = 1 << 20
"""Bytes before a batch's Arrow buffers that `SplitTexts.release` drops too (see there)."""


def load_prepared(path: Path) -> Any:
    """The `prepare` stage's DatasetDict, or a `StageError` saying how to get it."""
    import datasets

    if not (path / "dataset_dict.json").is_file():
        raise StageError(f"{path} holds no prepared dataset: run the prepare stage first (dvc repro prepare)")
    try:
        prepared = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load the prepared dataset ({exc}); re-run prepare") from None
    missing = [s for s in SPLITS if s not in prepared]
    if missing or "text" not in prepared["train"].column_names:
        raise StageError(f"{path}: expected splits train/validation/test with a `text` column; re-run prepare")
    return prepared


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- sampling


class SplitTexts:
    """The `text` column of one prepared split, read through this process's own read-only memory maps of the
    split's Arrow files (`datasets.save_to_disk` layout: `state.json` lists them in row order).

    Pages of a memory map that have been read count in the process's resident set for as long as the mapping
    lives (and a forked worker inherits them), so reading a whole corpus through `datasets`' own mapping makes
    RSS grow with the corpus. `release(arrays)` drops the pages under those arrays from this process with
    `madvise(MADV_DONTNEED)` (the data stays in the shared page cache; a later read maps it again), which is
    safe only on a read-only file mapping: hence our own maps instead of the ones behind `datasets`' tables.
    """

    def __init__(self, split_dir: str | Path):
        import pyarrow as pa

        split_dir = Path(split_dir)
        state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
        chunks: list[Any] = []
        self._maps: list[tuple[int, mmap.mmap]] = []
        for entry in state["_data_files"]:
            with (split_dir / entry["filename"]).open("rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            buffer = pa.py_buffer(mapped)
            self._maps.append((buffer.address, mapped))
            chunks.extend(pa.ipc.open_stream(buffer).read_all().column("text").chunks)
        self.column = pa.chunked_array(chunks, type=pa.string()) if chunks else pa.chunked_array([], pa.string())
        self.release_all()  # the record batch headers read just now: a page or more per 1000 documents

    def __len__(self) -> int:
        return len(self.column)

    def slice(self, start: int, count: int) -> list[str]:
        """The texts of documents `[start, start + count)`; their pages are released after decoding."""
        part = self.column.slice(start, count)
        texts = part.to_pylist()
        self.release(part.chunks)
        return texts

    def release(self, arrays: Any) -> None:
        """Drop the pages under these arrays' buffers (whole Arrow record batches) from this process, and up to
        `RELEASE_MARGIN` bytes before them: a page fault maps the pages around it too (the kernel's fault-around,
        64 KB by default), which reach back into what an earlier call released."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for array in arrays:
            for buf in array.buffers():
                if buf is not None and buf.size:
                    self._drop(buf.address - RELEASE_MARGIN, buf.size + RELEASE_MARGIN)

    def release_all(self) -> None:
        """Drop every page of the split's maps from this process."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for _, mapped in self._maps:
                if len(mapped):
                    mapped.madvise(mmap.MADV_DONTNEED)

    def _drop(self, address: int, size: int) -> None:
        """`MADV_DONTNEED` on the pages of [address, address + size) that lie in one of our maps."""
        for base, mapped in self._maps:
            start, end = max(address - base, 0), min(address - base + size, len(mapped))
            if start < end:
                start = start // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def text_column(split: Any) -> Any:
    """The `text` column (a pyarrow ChunkedArray) of a `datasets` split or of a `SplitTexts`."""
    return split.column if isinstance(split, SplitTexts) else split.data.column("text")


def document_bytes(split: Any) -> np.ndarray:
    """UTF-8 bytes of each document of a prepared split (a `datasets` split or a `SplitTexts`), from the Arrow
    offsets (no text is decoded)."""
    import pyarrow.compute as pc

    column = text_column(split)
    lengths = pc.fill_null(pc.binary_length(column), 0)
    sizes = np.asarray(lengths.to_numpy(), dtype=np.int64)
    if isinstance(split, SplitTexts):
        split.release(column.chunks)
    return sizes


def sample_documents(sizes: np.ndarray, budget_bytes: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random sample of documents holding at most `budget_bytes` of text (at least
    one document), or None when the whole split fits in the budget."""
    if int(sizes.sum()) <= budget_bytes:
        return None
    order = np.random.default_rng(seed).permutation(len(sizes))
    within = np.cumsum(sizes[order]) <= budget_bytes
    return np.sort(order[: max(1, int(within.sum()))])


def training_texts(train: Any, cfg: TokenizerConfig, seed: int) -> tuple[list[str], int]:
    """(texts the tokenizer is trained on, their bytes): the train split, or a sample of `train_sample_mb` MB."""
    sizes = document_bytes(train)
    keep = sample_documents(sizes, int(cfg.train_sample_mb * 1e6), seed)
    if keep is None:
        texts = text_column(train).to_pylist()
        if isinstance(train, SplitTexts):
            train.release_all()
        return texts, int(sizes.sum())
    log.info(
        "training the tokenizer on %d of %d train documents (%.0f MB)",
        len(keep),
        len(sizes),
        cfg.train_sample_mb,
    )
    return sampled_texts(train, keep), int(sizes[keep].sum())


def sampled_texts(split: Any, keep: np.ndarray) -> list[str]:
    """The texts of documents `keep` (sorted indices), read chunk by chunk from the memory-mapped Arrow column:
    only those rows are decoded (`select` would keep the whole table behind an index mapping, and a take on the
    whole column may first concatenate its chunks)."""
    texts: list[str] = []
    start = 0
    chunks = split.column.chunks if isinstance(split, SplitTexts) else split.data.table.column("text").chunks
    for chunk in chunks:
        lo, hi = np.searchsorted(keep, [start, start + len(chunk)])
        if hi > lo:
            texts.extend(chunk.take(keep[lo:hi] - start).to_pylist())
            if isinstance(split, SplitTexts):
                split.release([chunk])
        start += len(chunk)
    return texts


def build_tokenizer(cfg: TokenizerConfig, seed: int, train: Any, root: Path, out_dir: Path) -> Tokenizer:
    """Train a tokenizer on (a sample of) the train split, or load `cfg.model_file`; save it into `out_dir`."""
    if cfg.model_file:
        source = Path(cfg.model_file)
        source = source if source.is_absolute() else root / source
        tokenizer = Tokenizer(source, cfg.num_sentinels)
        if tokenizer.vocab_size != cfg.vocab_size:
            log.warning(
                "tokenizer.vocab_size=%d is ignored: %s gives %d pieces + %d sentinels = %d",
                cfg.vocab_size,
                source,
                tokenizer.num_pieces,
                cfg.num_sentinels,
                tokenizer.vocab_size,
            )
        tokenizer.save(out_dir, source=str(cfg.model_file))
        return tokenizer
    num_pieces = cfg.vocab_size - cfg.num_sentinels
    start = time.perf_counter()
    texts, _ = training_texts(train, cfg, seed)
    train_sentencepiece(
        texts,
        out_dir / MODEL_NAME,
        num_pieces=num_pieces,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        seed=seed,
        user_defined_symbols=cfg.user_defined_symbols,
    )
    del texts
    log.info(
        "trained a %s SentencePiece model of %d pieces in %.1f s",
        cfg.model_type,
        num_pieces,
        time.perf_counter() - start,
    )
    tokenizer = Tokenizer(out_dir / MODEL_NAME, cfg.num_sentinels)
    tokenizer.save(out_dir, source="trained", model_type=cfg.model_type)
    return tokenizer


# --------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Documents `[start, stop)` of one split, about `shard_mb` MB of text; its files are `<name>.bin/.npz`."""

    split: str
    index: int
    start: int
    stop: int
    nbytes: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def plan_shards(split: str, sizes: np.ndarray, shard_bytes: int) -> list[Shard]:
    """Cut a split into consecutive shards of about `shard_bytes` of text each (at least one document each)."""
    if len(sizes) == 0:
        return [Shard(split, 0, 0, 0, 0)]
    ends = np.cumsum(sizes)
    n = max(1, math.ceil(int(ends[-1]) / max(shard_bytes, 1)))
    # shard i ends at the first document whose cumulative size reaches (i + 1) / n of the split
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, n) / n, side="left") + 1
    bounds = np.unique(np.concatenate([[0], np.clip(cuts, 1, len(sizes)), [len(sizes)]]))
    starts = np.concatenate([[0], ends])
    return [
        Shard(split, i, int(a), int(b), int(starts[b] - starts[a]))
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def shard_done(work: Path, shard: Shard) -> bool:
    """Whether a shard's files are complete (the `.npz` is renamed into place last)."""
    return (work / f"{shard.name}.npz").is_file() and (work / f"{shard.name}.bin").is_file()


_WORKER: dict[str, Any] = {}


def _init_worker(prepared_dir: str, tokenizer: Tokenizer, out_dir: str, batch_size: int) -> None:
    _WORKER.clear()
    _WORKER.update(prepared=Path(prepared_dir), splits={}, tokenizer=tokenizer, out=Path(out_dir), batch=batch_size)


def _worker_split(name: str) -> SplitTexts:
    """The worker's own maps of a split's Arrow files, opened on first use."""
    splits: dict[str, SplitTexts] = _WORKER["splits"]
    if name not in splits:
        splits[name] = SplitTexts(_WORKER["prepared"] / name)
    return splits[name]


def encode_shard(shard: Shard) -> tuple[Shard, int, float]:
    """Encode one shard into `<name>.bin` (raw ids) and `<name>.npz` (lengths, counts); returns (shard, tokens, s).

    Runs in a worker initialised by `_init_worker`. Files are written under temporary names (with the pid: an
    orphaned worker of a killed run cannot collide) and renamed into place, the `.npz` last.
    """
    start_time = time.perf_counter()
    tok: Tokenizer = _WORKER["tokenizer"]
    out: Path = _WORKER["out"]
    texts_of = _worker_split(shard.split)
    dtype = token_dtype(tok.vocab_size)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    lengths: list[np.ndarray] = []
    tmp_bin = out / f".{shard.name}.bin.{os.getpid()}.tmp"
    with tmp_bin.open("wb") as fh:
        for s in range(shard.start, shard.stop, _WORKER["batch"]):
            texts = texts_of.slice(s, min(_WORKER["batch"], shard.stop - s))
            ids = tok.encode(texts, add_eos=True, num_threads=1)
            batch_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(batch_lengths.sum()))
            fh.write(flat.tobytes())
            counts += np.bincount(flat, minlength=tok.vocab_size)
            lengths.append(batch_lengths)
    texts_of.release_all()  # what fault-around mapped beyond the released batches
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    tmp_npz = out / f".{shard.name}.{os.getpid()}.tmp.npz"
    np.savez(tmp_npz, lengths=all_lengths, counts=counts)
    os.replace(tmp_bin, out / f"{shard.name}.bin")
    os.replace(tmp_npz, out / f"{shard.name}.npz")
    return shard, int(all_lengths.sum()), time.perf_counter() - start_time


def encode_shards(
    shards: list[Shard], prepared_dir: Path, tokenizer: Tokenizer, out: Path, batch_size: int, num_proc: int
) -> tuple[int, int]:
    """Encode `shards` (largest first) on up to `num_proc` processes; returns (tokens, processes used)."""
    pending = sorted(shards, key=lambda s: -s.nbytes)
    workers = min(num_proc, len(pending))
    if sum(s.nbytes for s in pending) < MIN_PARALLEL_BYTES:
        workers = 1
    args = (str(prepared_dir), tokenizer, str(out), batch_size)
    tokens = 0
    if workers <= 1:
        _init_worker(*args)
        for shard in pending:
            tokens += encode_shard(shard)[1]
        return tokens, 1
    # fork: workers inherit the imported libraries (as `datasets.map` does); each maps the Arrow files itself.
    # gc.freeze: the workers' garbage collector then leaves the parent's objects alone instead of writing to
    # (and so copying) every page of the inherited heap
    gc.freeze()
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=args) as pool:
            for shard, n, seconds in pool.imap_unordered(encode_shard, pending):
                tokens += n
                log.debug("shard %s: %d tokens in %.1f s", shard.name, n, seconds)
    finally:
        gc.unfreeze()
    return tokens, workers


# ----------------------------------------------------------------------------------------------- stage


def job_key(cfg: Config, prepared_dir: Path) -> str:
    """Everything the outputs depend on: the tokenizer params (not `num_proc`/`batch_size`), the seed, the
    shard size and the prepared data's fingerprints. Finished shards are reused only under the same key."""
    tc = cfg.tokenizer
    prepared = sorted(
        (str(p.relative_to(prepared_dir)), p.read_text(encoding="utf-8"))
        for p in (*prepared_dir.glob("*/state.json"), prepared_dir / "stats.json")
        if p.is_file()
    )
    model_file = None
    if tc.model_file:
        path = Path(tc.model_file)
        path = path if path.is_absolute() else prepared_dir.parent.parent / path
        model_file = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path)
    key = {
        "seed": cfg.seed,
        "model_file": model_file,
        "vocab_size": tc.vocab_size,
        "num_sentinels": tc.num_sentinels,
        "model_type": tc.model_type,
        "character_coverage": tc.character_coverage,
        "input_sentence_size": tc.input_sentence_size,
        "train_sample_mb": tc.train_sample_mb,
        "shard_mb": tc.shard_mb,
        "prepared": prepared,
    }
    if tc.user_defined_symbols:  # only then: the key of every run without them is what it was
        key["user_defined_symbols"] = tc.user_defined_symbols
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def open_work_dir(work: Path, key: str) -> Path:
    """The resumable work directory for `key`: kept when its key matches, otherwise emptied."""
    key_file = work / "job.json"
    if work.exists():
        try:
            same = json.loads(key_file.read_text(encoding="utf-8")).get("key") == key
        except (OSError, ValueError, AttributeError):  # missing or half-written by a killed run
            same = False
        if same:
            (work / "shards").mkdir(exist_ok=True)
            for stale in (work / "shards").glob(".*.tmp*"):  # partial shard files of the killed run
                _remove(stale)
            recover_output(work / "tokenizer")
            return work
        log.info("%s belongs to other params or data: starting over", work)
        shutil.rmtree(work)
    (work / "shards").mkdir(parents=True)
    tmp = work / ".job.json.tmp"
    tmp.write_text(json.dumps({"key": key}) + "\n", encoding="utf-8")
    os.replace(tmp, key_file)
    return work


def work_tokenizer(cfg: Config, prepared: Any, root: Path, work: Path) -> Tokenizer:
    """The tokenizer of this job: trained (or loaded) once and kept in the work directory across kills."""
    saved = work / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        log.info("resuming: reusing the tokenizer in %s", saved)
        return Tokenizer.load(saved)
    with atomic_output(saved) as tmp:
        build_tokenizer(cfg.tokenizer, cfg.seed, prepared["train"], root, tmp)
    return Tokenizer.load(saved)


def body(cfg: Config, args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_progress_bars()
    root = repo_root()
    tc = cfg.tokenizer
    for target in (root / TOKENIZER_DIR, root / TOKENIZED_DIR, root / WORK_DIR):
        recover_output(target)
    prepared = load_prepared(root / PREPARED_DIR)
    # the splits' texts through maps whose pages are released after reading (RSS flat in the corpus size)
    try:
        texts = {name: SplitTexts(root / PREPARED_DIR / name) for name in SPLITS}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{root / PREPARED_DIR}: cannot map its Arrow files ({exc!r}); re-run prepare") from None
    for name in SPLITS:
        if len(texts[name]) != len(prepared[name]):
            raise StageError(f"{root / PREPARED_DIR / name}: unexpected Arrow layout; re-run prepare")
    del prepared
    work = open_work_dir(root / WORK_DIR, job_key(cfg, root / PREPARED_DIR))
    try:
        tokenizer = work_tokenizer(cfg, texts, root, work)
    except StageError:
        shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        raise
    shards = {name: plan_shards(name, document_bytes(texts[name]), int(tc.shard_mb * 1e6)) for name in SPLITS}
    del texts
    todo = [s for split in shards.values() for s in split if not shard_done(work / "shards", s)]
    total_shards = sum(map(len, shards.values()))
    if len(todo) < total_shards:
        log.info("resuming: %d of %d shards already tokenized", total_shards - len(todo), total_shards)
    start = time.perf_counter()
    encoded, workers = encode_shards(todo, root / PREPARED_DIR, tokenizer, work / "shards", tc.batch_size, tc.num_proc)
    seconds = time.perf_counter() - start

    metrics: dict[str, Any] = {}
    with atomic_output(root / TOKENIZER_DIR) as tok_dir, atomic_output(root / TOKENIZED_DIR) as data_dir:
        shutil.copytree(work / "tokenizer", tok_dir)
        data_dir.mkdir()
        metas = {}
        for name in SPLITS:
            writer = SplitWriter(data_dir / name, tokenizer.vocab_size)
            for shard in shards[name]:
                with np.load(work / "shards" / f"{shard.name}.npz") as z:
                    writer.append_file(work / "shards" / f"{shard.name}.bin", z["lengths"], z["counts"])
            metas[name] = writer.close()
            metrics[name] = {"documents": metas[name]["documents"], "tokens": metas[name]["tokens"]}
        write_store_meta(data_dir, tokenizer.vocab_size, metas)
        total = sum(m["tokens"] for m in metas.values())
        disk = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
        metrics.update(
            vocab_size=tokenizer.vocab_size,
            num_pieces=tokenizer.num_pieces,
            num_sentinels=tokenizer.num_sentinels,
            tokens_total=total,
            dtype=token_dtype(tokenizer.vocab_size).name,
            bytes_per_token=round(disk / max(total, 1), 4),
        )
    # how this run went on this machine (speed, parallelism, resumed shards): apart from the reproducible metrics
    timing = dict(
        seconds=round(seconds, 3),
        tokens_per_second=round(encoded / max(seconds, 1e-9), 1),
        shards=total_shards,
        shards_resumed=total_shards - len(todo),
        processes=workers,
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(stage_timing(root, "tokenize"), timing)
    write_json(root / METRICS_FILE, metrics)
    log.info(
        "tokenized %d tokens (%s) with a vocabulary of %d at %.0f tokens/s on %d process(es), %.2f bytes/token",
        total,
        ", ".join(f"{name} {metrics[name]['tokens']}" for name in SPLITS),
        tokenizer.vocab_size,
        timing["tokens_per_second"],
        workers,
        metrics["bytes_per_token"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("Train the SentencePiece tokenizer and tokenize every split.")
    return run_stage(body, parser, argv, rerun="re-run the stage to continue from the shards it finished")


if __name__ == "__main__":
    raise SystemExit(main())
