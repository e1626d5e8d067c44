"""`tokenize` stage: train (or load) the SentencePiece tokenizer and tokenize every split.

Inputs: `data/prepared/` from `prepare`. Outputs: `data/tokenizer/` (`spm.model` + `tokenizer.json`, see
`pipeline/tokenizer.py`), `data/tokenized/` (a `datasets.DatasetDict` with `input_ids`, int32 with eos
appended, and `length` per document) and `metrics/tokenize.json` (tokens per split, vocabulary, throughput).
The tokenizer is trained on the train split only. Both directories are built in temporary siblings and
swapped into place at the end, so a failed run leaves the previous outputs intact.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.common import StageError, atomic_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config, TokenizerConfig
from pipeline.tokenizer import MODEL_NAME, Tokenizer, train_sentencepiece

log = logging.getLogger("pipeline.tokenize")

PREPARED_DIR = "data/prepared"
TOKENIZER_DIR = "data/tokenizer"
TOKENIZED_DIR = "data/tokenized"
METRICS_FILE = "metrics/tokenize.json"
MIN_BATCHES_PER_WORKER = 16


def load_prepared(path: Path) -> Any:
    """The `prepare` stage's DatasetDict, or a `StageError` saying how to get it."""
    import datasets

    if not (path / "dataset_dict.json").is_file():
        raise StageError(f"{path} holds no prepared dataset: run the prepare stage first (dvc repro prepare)")
    try:
        prepared = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot load the prepared dataset ({exc})") from None
    missing = [s for s in ("train", "validation", "test") if s not in prepared]
    if missing or "text" not in prepared["train"].column_names:
        raise StageError(f"{path}: expected splits train/validation/test with a `text` column; re-run prepare")
    return prepared


def build_tokenizer(cfg: TokenizerConfig, seed: int, train_texts: list[str], root: Path, out_dir: Path) -> Tokenizer:
    """Train a tokenizer on `train_texts` (or load `cfg.model_file`) and save it into `out_dir`."""
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
    train_sentencepiece(
        train_texts,
        out_dir / MODEL_NAME,
        num_pieces=num_pieces,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        seed=seed,
    )
    log.info(
        "trained a %s SentencePiece model of %d pieces in %.1f s",
        cfg.model_type,
        num_pieces,
        time.perf_counter() - start,
    )
    tokenizer = Tokenizer(out_dir / MODEL_NAME, cfg.num_sentinels)
    tokenizer.save(out_dir, source="trained", model_type=cfg.model_type)
    return tokenizer


def encode_batch(batch: Any, tokenizer: Tokenizer) -> Any:
    """`datasets.map` function on an Arrow batch: `text` -> `input_ids` (list<int32>, eos appended), `length`.

    Building the Arrow arrays directly from flat numpy buffers keeps the per-token Python work to the
    SentencePiece call itself (returning Python lists would make `datasets` convert every id one by one).
    """
    import numpy as np
    import pyarrow as pa

    ids = tokenizer.encode(batch.column("text").to_pylist(), add_eos=True)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat), "length": lengths})


def map_workers(num_documents: int, batch_size: int, num_proc: int) -> int:
    """Worker processes worth starting for a split: at most `num_proc`, each with `MIN_BATCHES_PER_WORKER`.

    SentencePiece already spreads each batch over all cores with threads; extra processes only help with
    the per-batch Python and Arrow work, and each costs a start-up (about half a second) that small splits
    never win back, so the default corpus is tokenized in-process.
    """
    return max(1, min(num_proc, num_documents // (batch_size * MIN_BATCHES_PER_WORKER)))


def tokenize_split(dataset: Any, tokenizer: Tokenizer, batch_size: int, num_proc: int) -> Any:
    """Tokenize one split with a batched `datasets.map` (worker processes only for large splits)."""
    workers = map_workers(len(dataset), batch_size, num_proc)
    return (
        dataset.with_format("arrow")
        .map(
            encode_batch,
            fn_kwargs={"tokenizer": tokenizer},
            batched=True,
            batch_size=batch_size,
            num_proc=workers if workers > 1 else None,
            remove_columns=dataset.column_names,
            desc="tokenize",
        )
        .with_format(None)
    )


def body(cfg: Config, args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_caching()  # map results go to temporary files, never into data/prepared
    datasets.disable_progress_bars()
    root = repo_root()
    prepared = load_prepared(root / PREPARED_DIR)
    tc = cfg.tokenizer
    metrics: dict[str, Any] = {}
    with atomic_output(root / TOKENIZER_DIR) as tok_dir, atomic_output(root / TOKENIZED_DIR) as data_dir:
        train_texts = prepared["train"].data.column("text").to_pylist()
        tokenizer = build_tokenizer(tc, cfg.seed, train_texts, root, tok_dir)
        tokenized = {}
        start = time.perf_counter()
        for name, split in prepared.items():
            tokenized[name] = tokenize_split(split, tokenizer, tc.batch_size, tc.num_proc)
        seconds = time.perf_counter() - start
        result = datasets.DatasetDict(tokenized)
        result.save_to_disk(str(data_dir))
        total = 0
        for name, split in result.items():
            tokens = int(sum(split.data.column("length").to_pylist()))
            total += tokens
            metrics[name] = {"documents": len(split), "tokens": tokens}
        metrics.update(
            vocab_size=tokenizer.vocab_size,
            num_pieces=tokenizer.num_pieces,
            num_sentinels=tokenizer.num_sentinels,
            tokens_total=total,
            tokens_per_second=round(total / max(seconds, 1e-9), 1),
        )
    write_json(root / METRICS_FILE, metrics)
    log.info(
        "tokenized %d tokens (%s) with a vocabulary of %d at %.0f tokens/s",
        total,
        ", ".join(f"{name} {metrics[name]['tokens']}" for name in result),
        tokenizer.vocab_size,
        metrics["tokens_per_second"],
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Train the SentencePiece tokenizer and tokenize every split."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
