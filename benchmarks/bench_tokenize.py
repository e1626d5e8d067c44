"""Tokenization throughput: the `tokenize` stage's `datasets.map` path against SentencePiece called directly.

Both run on the same text in the same process: the prepared train split (or, without `data/prepared`, the
builtin corpus), repeated `--repeat` times so that fixed costs (worker start-up) are measured at a realistic
scale. Each variant runs `--runs` times; the best time counts. The ratio `map / direct` is the figure the
stage must keep at or above 0.7.

    python benchmarks/bench_tokenize.py [--repeat 8] [--num-proc 2] [--batch-size 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets

from pipeline.config import DataConfig
from pipeline.data import CorpusStats, builtin_documents, clean_documents
from pipeline.tokenize import map_workers, tokenize_split
from pipeline.tokenizer import Tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]


def corpus() -> list[str]:
    prepared = ROOT / "data" / "prepared"
    if (prepared / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(prepared))["train"].data.column("text").to_pylist()
    return clean_documents(builtin_documents(), DataConfig(), CorpusStats())


def tokenizer(texts: list[str], tmp: Path) -> Tokenizer:
    saved = ROOT / "data" / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        return Tokenizer.load(saved)
    train_sentencepiece(texts, tmp / "spm.model", num_pieces=7900)
    return Tokenizer(tmp / "spm.model", 100)


def best_of(runs: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the corpus tokenized (default 8)")
    parser.add_argument("--num-proc", type=int, default=2, help="datasets.map workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="datasets.map batch size (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant, best counts (default 3)")
    args = parser.parse_args()
    datasets.disable_caching()
    datasets.disable_progress_bars()

    base = corpus()
    texts = base * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer(base, Path(tmp))
        dataset = datasets.Dataset.from_dict({"text": texts})

        t_direct, ids = best_of(args.runs, lambda: tok.encode(texts))
        tokens = sum(map(len, ids))
        t_raw, _ = best_of(args.runs, lambda: tok.sp.encode(texts))
        t_map, mapped = best_of(args.runs, lambda: tokenize_split(dataset, tok, args.batch_size, args.num_proc))
        assert sum(mapped["length"]) == tokens, "datasets.map and the direct call disagree"

    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, {tokens} tokens")
    print(f"{'variant':<48} {'seconds':>8} {'tokens/s':>12} {'vs direct':>10}")
    workers = map_workers(len(texts), args.batch_size, args.num_proc)
    rows = [
        ("SentencePiece encode (ids only)", t_raw),
        ("Tokenizer.encode (direct, eos appended)", t_direct),
        (f"datasets.map -> Arrow ({workers} proc, batch {args.batch_size})", t_map),
    ]
    for name, seconds in rows:
        print(f"{name:<48} {seconds:>8.3f} {tokens / seconds:>12,.0f} {t_direct / seconds:>10.2f}")
    print(f"ratio datasets.map / direct = {t_direct / t_map:.2f} (target >= 0.70)")


if __name__ == "__main__":
    main()
