"""Tokenization throughput: the `tokenize` stage's shard encoder and `datasets.map` against SentencePiece direct.

All run on the same text in the same process, one SentencePiece thread each: the prepared train split (or,
without `data/prepared`, the builtin corpus), repeated `--repeat` times so that fixed costs are measured at a
realistic scale. Each variant runs `--runs` times; the best time counts. The ratios `stage / direct` and
`map / direct` are the figures the stage must keep at or above 0.7; the stage with `--num-proc` processes is
shown against one process (`benchmarks/bench_data.py` measures whole stages on generated corpora).

    python benchmarks/bench_tokenize.py [--repeat 8] [--num-proc 2] [--batch-size 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import datasets

from pipeline.config import DataConfig
from pipeline.data import CorpusStats, builtin_documents, clean_documents
from pipeline.tokenize import document_bytes, encode_shards, plan_shards
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
    parser.add_argument("--num-proc", type=int, default=2, help="stage worker processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="documents per batch (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant, best counts (default 3)")
    args = parser.parse_args()
    datasets.disable_caching()
    datasets.disable_progress_bars()

    base = corpus()
    texts = base * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tokenizer(base, tmp)
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp / "prep"))
        split = datasets.load_from_disk(str(tmp / "prep"))["train"]
        shards = plan_shards("train", document_bytes(split), 4_000_000)

        def stage(num_proc: int):
            out = tmp / f"shards-{num_proc}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            return encode_shards(shards, tmp / "prep", tok, out, args.batch_size, num_proc)[0]

        def mapped():
            return split.map(
                lambda b: {"n": [len(x) for x in tok.encode(b["text"], num_threads=1)]},
                batched=True,
                batch_size=args.batch_size,
                remove_columns=["text"],
            )

        t_direct, ids = best_of(args.runs, lambda: tok.encode(texts, num_threads=1))
        tokens = sum(map(len, ids))
        t_raw, _ = best_of(args.runs, lambda: tok.sp.encode(texts, num_threads=1))
        t_map, result = best_of(args.runs, mapped)
        assert sum(result["n"]) == tokens, "datasets.map and the direct call disagree"
        t_stage, n = best_of(args.runs, lambda: stage(1))
        assert n == tokens, "the stage's encoder and the direct call disagree"
        t_par, _ = best_of(args.runs, lambda: stage(args.num_proc))

    print(
        f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, {tokens} tokens, {len(shards)} shards"
    )
    print(f"{'variant':<48} {'seconds':>8} {'tokens/s':>12} {'vs direct':>10}")
    rows = [
        ("SentencePiece encode (ids only)", t_raw),
        ("Tokenizer.encode (direct, eos appended)", t_direct),
        (f"datasets.map (1 proc, batch {args.batch_size})", t_map),
        ("stage shard encoder (1 proc)", t_stage),
        (f"stage shard encoder ({args.num_proc} proc)", t_par),
    ]
    for name, seconds in rows:
        print(f"{name:<48} {seconds:>8.3f} {tokens / seconds:>12,.0f} {t_direct / seconds:>10.2f}")
    print(f"stage / direct = {t_direct / t_stage:.2f}, datasets.map / direct = {t_direct / t_map:.2f} (target >= 0.70)")
    print(f"stage {args.num_proc} proc / 1 proc = {t_stage / t_par:.2f}")


if __name__ == "__main__":
    main()
