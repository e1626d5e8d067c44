"""Tokenization throughput: the `tokenize` stage's shard encoder and `datasets.map` against SentencePiece direct.

All run on the same text in the same process, one SentencePiece thread each (`datasets.map` returns the ids, as
a `datasets`-based tokenization would keep them, as lists, and as one flat uint16 array per batch, the store's
layout): the prepared train split (or, without `data/prepared`, the
builtin corpus), repeated `--repeat` times so that fixed costs are measured at a realistic scale. The variants
run in turn (`benchmarks/timing.py`: one warm-up round, then `--runs` rounds), so all see the same load; each
prints its median [min-max] seconds and the per-round throughput ratio against the direct call of the same round
(direct seconds / variant seconds, median [min-max]). The ratios `stage / direct` and `map / direct` are the
figures the stage must keep at or above 0.7; the stage with `--num-proc` processes is shown against one process
(`benchmarks/bench_data.py` measures whole stages on generated corpora). Each variant also reports its CPU
seconds (this process and the workers it waited for) and CPU / wall, the cores it got: on a machine whose cores
are busy with other work, the parallel speedup is bounded by the cores left, not by the code. The one-process
ratios are printed by CPU seconds too, which the load changes much less than wall seconds. The load average is
printed at the start and the end.

    python benchmarks/bench_tokenize.py [--repeat 8] [--num-proc 2] [--batch-size 1000] [--runs 3]
    python benchmarks/bench_tokenize.py --repeat 1 --runs 1 --warmup 0     # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import alternate_results, load_average, median, ratio_spread, spread, table  # noqa: E402

from pipeline.config.sections import DataConfig  # noqa: E402
from pipeline.data.corpus import CorpusStats, builtin_documents, clean_documents  # noqa: E402
from pipeline.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from pipeline.tokenize import document_bytes, encode_shards, plan_shards  # noqa: E402

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


def cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """`fn` as a call returning (wall seconds, CPU seconds)."""

    def run() -> tuple[float, float]:
        cpu, start = cpu_seconds(), time.perf_counter()
        fn()
        return time.perf_counter() - start, cpu_seconds() - cpu

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the corpus tokenized (default 8)")
    parser.add_argument("--num-proc", type=int, default=2, help="stage worker processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="documents per batch (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="timed alternated rounds of every variant (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    args = parser.parse_args()
    print(f"start: {load_average()}")
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

        def mapped():  # the ids kept, as a datasets-based tokenization would
            return split.map(
                lambda b: {"input_ids": tok.encode(b["text"], num_threads=1)},
                batched=True,
                batch_size=args.batch_size,
                remove_columns=["text"],
            )

        def flat_batch(batch):  # one row per batch: its ids as one uint16 array and the lengths (the store's layout)
            ids = tok.encode(batch["text"], num_threads=1)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=int(lengths.sum()))
            return {"tokens": [flat], "lengths": [lengths]}

        def mapped_flat():
            return split.map(flat_batch, batched=True, batch_size=args.batch_size, remove_columns=["text"])

        out = {}
        variants = {
            "SentencePiece encode (ids only)": lambda: tok.sp.encode(texts, num_threads=1),
            "Tokenizer.encode (direct, eos appended)": lambda: out.__setitem__(
                "direct", tok.encode(texts, num_threads=1)
            ),
            f"datasets.map (1 proc, batch {args.batch_size})": lambda: out.__setitem__("map", mapped()),
            "datasets.map, flat uint16 per batch": lambda: out.__setitem__("map_flat", mapped_flat()),
            "stage shard encoder (1 proc)": lambda: out.__setitem__("stage", stage(1)),
        }
        if args.num_proc > 1:
            variants[f"stage shard encoder ({args.num_proc} proc)"] = lambda: stage(args.num_proc)
        measured = alternate_results({name: timed(fn) for name, fn in variants.items()}, args.runs, args.warmup)
        times = {name: [wall for wall, _ in runs] for name, runs in measured.items()}
        cpu = {name: [c for _, c in runs] for name, runs in measured.items()}
        tokens = sum(map(len, out["direct"]))
        mapped_tokens = pc.sum(pc.list_value_length(out["map"].data.column("input_ids"))).as_py()
        assert mapped_tokens == tokens, "datasets.map and the direct call disagree"
        flat_tokens = pc.sum(pc.list_value_length(out["map_flat"].data.column("tokens"))).as_py()
        assert flat_tokens == tokens, "datasets.map (flat) and the direct call disagree"
        assert out["stage"] == tokens, "the stage's encoder and the direct call disagree"

    print(
        f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, {tokens} tokens, {len(shards)} shards"
    )
    direct = times["Tokenizer.encode (direct, eos appended)"]
    rows = [
        (
            name,
            spread(t),
            f"{tokens / median(t):,.0f}",
            ratio_spread(direct, t, digits=2),
            spread(cpu[name]),
            spread([c / w for c, w in zip(cpu[name], t, strict=True)], 2),
        )
        for name, t in times.items()
    ]
    header = ("variant", "seconds median [min-max]", "tokens/s", "direct/variant per round", "CPU s", "cores used")
    print(table(header, rows))
    stage_1 = times["stage shard encoder (1 proc)"]
    map_t = times[f"datasets.map (1 proc, batch {args.batch_size})"]
    flat_t = times["datasets.map, flat uint16 per batch"]
    print(
        f"stage / direct = {ratio_spread(direct, stage_1, 2)}, "
        f"datasets.map / direct = {ratio_spread(direct, map_t, 2)}, "
        f"datasets.map flat / direct = {ratio_spread(direct, flat_t, 2)} (target >= 0.70)"
    )
    cpu_direct = cpu["Tokenizer.encode (direct, eos appended)"]
    cpu_stage, cpu_map = cpu["stage shard encoder (1 proc)"], cpu[f"datasets.map (1 proc, batch {args.batch_size})"]
    print(  # one process's CPU seconds measure its work whatever else runs on the machine
        f"by CPU seconds: stage / direct = {ratio_spread(cpu_direct, cpu_stage, 2)}, "
        f"datasets.map / direct = {ratio_spread(cpu_direct, cpu_map, 2)}, "
        f"datasets.map flat / direct = {ratio_spread(cpu_direct, cpu['datasets.map, flat uint16 per batch'], 2)}"
    )
    if args.num_proc > 1:
        stage_n = times[f"stage shard encoder ({args.num_proc} proc)"]
        cpu_1, cpu_n = cpu["stage shard encoder (1 proc)"], cpu[f"stage shard encoder ({args.num_proc} proc)"]
        print(
            f"stage {args.num_proc} proc / 1 proc = {ratio_spread(stage_1, stage_n, 2)} (wall, per round); "
            f"CPU seconds {args.num_proc} proc / 1 proc = {ratio_spread(cpu_n, cpu_1, 2)} (the work parallelism adds)"
        )
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
