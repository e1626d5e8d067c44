"""Data at corpus scale: prepare + tokenize and the first training steps on generated `files` corpora.

For each size (`--tokens 1M 2M`) the script writes a synthetic corpus of plain-text shards (Zipf-distributed
pseudo-words, sentences, blank-line paragraphs: `data.files.sample_by: paragraph`) into a scratch project and
runs the real stages there, each in its own process:

- `prepare`, then `tokenize` from scratch with each `--num-procs` value (default 1 and 2), the values in turn
  `--repeats` times (`benchmarks/timing.py` alternation: each value sees the same load);
- on a slice of the prepared train split, in this process and in turn `--rounds` times: SentencePiece called
  directly (one thread), `datasets.map` (one process, batches of 1000, the ids returned) and the stage's shard
  encoder (one process): their throughput as median [min-max] and the per-round ratios to the direct call;
- `pretrain` of the `t5` variant for `--steps` steps (no validation, no checkpoint inside the window).

Per stage run: wall seconds, CPU seconds of the process and its workers (CPU / wall = cores it got), tokens/s,
peak RSS (the largest process; the sum over the process tree sampled every 0.1 s, which counts the pages forked
workers share with their parent once per process; and the tree's PSS, which counts them once), for pretrain the time
from process start to the end of the first training step; each as median [min-max] over the repeats. The
tokenized store's bytes per token come from the tokenize metrics. The load average is printed at the start
and the end.

`--store-tokens 1B` additionally writes a token store of that many random tokens straight to disk (no
prepare or tokenize: generating and tokenizing 1B tokens takes hours on 2 cores) next to the first corpus's
tokenizer and runs the same pretrain on it: the training figures at that scale. `--copies K` additionally
tokenizes each size's prepared splits repeated K times (no prepare: tokenize's figures at K times the size).

    python benchmarks/bench_data.py [--tokens 1M 2M] [--repeats 1] [--rounds 3] [--steps 3] [--store-tokens 1B]
    python benchmarks/bench_data.py --tokens 7.5M 75M --copies 10 --num-procs 2 --no-direct --steps 0
        # tokenize's memory at 40 MB, 400 MB and 4 GB of text (the 4 GB: the 400 MB prepared splits 10 times)
    python benchmarks/bench_data.py --tokens 10M 100M --steps 50          # the issue's sizes (an hour or more)

Issue 13 asks every benchmark's default run to take under 5 minutes; this one took 360 s at load average 3-7 with
another benchmark running (docs/data.md, "Measured"): most of it is process start-up under load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import alternate, alternate_results, load_average, median, ratio_spread, spread  # noqa: E402

CHARS_PER_TOKEN = 5.3  # measured on this generator with the default 8000-piece unigram vocabulary
SHARD_CHARS = 64_000_000
FIRST_STEP_ENV = "BENCH_DATA_FIRST_STEP_FILE"


def parse_count(text: str) -> int:
    """`10M`, `1B`, `250K` or a plain integer."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


# --------------------------------------------------------------------------------------------- corpus


def pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct pronounceable pseudo-words (consonant-vowel syllables)."""
    consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    words: set[str] = set()
    while len(words) < n:
        syllables = int(rng.integers(1, 5))
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def write_corpus(directory: Path, n_tokens: int, seed: int = 0) -> int:
    """Text shards of about `n_tokens` tokens in `directory`; returns the characters written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.array(pseudo_words(30_000, rng), dtype=object)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    target, written, shard = int(n_tokens * CHARS_PER_TOKEN), 0, 0
    while written < target:
        parts, size = [], 0
        while size < min(SHARD_CHARS, target - written):
            words = vocab[rng.choice(len(vocab), size=200_000, p=p)]
            sentence_ends = rng.random(len(words)) < 1 / 14
            paragraph_ends = sentence_ends & (rng.random(len(words)) < 1 / 8)
            words = np.where(paragraph_ends, words + ".\n\n", np.where(sentence_ends, words + ".", words))
            text = " ".join(words.tolist()).replace("\n\n ", "\n\n")
            parts.append(text)
            size += len(text)
        text = "".join(parts)[: target - written]
        (directory / f"part-{shard:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text)
        shard += 1
    return written


def write_random_store(path: Path, n_tokens: int, vocab_size: int, doc_tokens: int = 1000) -> None:
    """A token store of random ids (train `n_tokens`, validation and test 1% each), written in blocks."""
    from pipeline.data.tokenstore import SplitWriter, write_store_meta

    rng = np.random.default_rng(0)
    metas = {}
    for name, count in (("train", n_tokens), ("validation", n_tokens // 100), ("test", n_tokens // 100)):
        writer = SplitWriter(path / name, vocab_size)
        done = 0
        while done < count:
            block = min(50_000_000, count - done)
            block -= block % doc_tokens
            block = max(block, doc_tokens)
            tokens = rng.integers(3, vocab_size - 100, size=block, dtype=np.uint16)
            tokens[doc_tokens - 1 :: doc_tokens] = 1  # eos closes every document
            writer.write_flat(tokens, np.full(block // doc_tokens, doc_tokens))
            done += block
        metas[name] = writer.close()
    write_store_meta(path, vocab_size, metas)


# ----------------------------------------------------------------------------------------------- runs


def set_params(project: Path, **dotted) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in dotted.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run a command; wall seconds, peak RSS of its largest process and of its whole tree (sampled), output."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    tree_peak, pss_peak = 0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal tree_peak, pss_peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs))
                # PSS: each shared page (forked workers share the parent's) counted once over the sharers
                pss_peak = max(pss_peak, sum(getattr(p.memory_full_info(), "pss", 0) for p in procs))
            except psutil.Error:
                pass
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "seconds": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the process and the workers it waited for
        "peak_rss_gb": usage.ru_maxrss / 2**20,
        "tree_rss_gb": tree_peak / 2**30,
        "tree_pss_gb": pss_peak / 2**30,
        "out": output,
    }


def stage(project: Path, name: str, *extra: str, env: dict | None = None) -> dict:
    return run([sys.executable, "-m", f"pipeline.{name}", *extra], project, env)


def pretrain_child(argv: list[str]) -> None:
    """In the child: record the end of the first training step, then run the real pretrain stage."""
    from pipeline import pretrain
    from pipeline.training import module

    marker, original = Path(os.environ[FIRST_STEP_ENV]), module.SamplerPosition.on_train_batch_end

    def first_step(self, trainer, *args):
        if not marker.exists():
            marker.write_text(repr(time.time()))
        return original(self, trainer, *args)

    module.SamplerPosition.on_train_batch_end = first_step
    raise SystemExit(pretrain.main(argv))


def run_pretrain(project: Path) -> dict:
    marker = project / "first_step.txt"
    marker.unlink(missing_ok=True)
    for leftover in ("artifacts", "metrics/pretrain"):
        shutil.rmtree(project / leftover, ignore_errors=True)
    started = time.time()
    result = run(
        [sys.executable, __file__, "--pretrain-child", "--model", "t5", "--seed", "0"],
        project,
        {FIRST_STEP_ENV: str(marker), "PYTHONPATH": str(ROOT)},
    )
    result["first_step_s"] = float(marker.read_text()) - started
    return result


def slice_rates(project: Path, rounds: int, max_chars: int = 5_000_000) -> dict:
    """SentencePiece direct, `datasets.map` and the stage's shard encoder on one slice of the prepared train split
    (one thread/process each), called in turn `rounds` times after a warm-up round: seconds per round."""
    import datasets
    import pyarrow.compute as pc

    from pipeline.data.tokenizer import Tokenizer
    from pipeline.tokenize import Shard, encode_shards

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = Tokenizer.load(project / "data" / "tokenizer")
    train = datasets.load_from_disk(str(project / "data" / "prepared"))["train"]
    sizes = np.cumsum(np.asarray(pc.binary_length(train.data.column("text")).to_numpy(), dtype=np.int64))
    n = int(min(len(train), np.searchsorted(sizes, max_chars) + 1))
    subset = train.select(range(n))
    texts = subset.data.column("text").to_pylist()
    scratch = project / "slice"
    datasets.DatasetDict({"train": subset}).save_to_disk(str(scratch / "prepared"))
    shard = Shard("train", 0, 0, n, int(sizes[n - 1]))
    out: dict = {}

    def encode(batch):  # what a datasets-based tokenize would keep: the ids
        return {"input_ids": tok.encode(batch["text"], num_threads=1)}

    def stage_encoder():
        shutil.rmtree(scratch / "shards", ignore_errors=True)
        (scratch / "shards").mkdir()
        out["stage"] = encode_shards([shard], scratch / "prepared", tok, scratch / "shards", 1000, 1)[0]

    variants = {
        "direct": lambda: out.__setitem__("direct", sum(map(len, tok.encode(texts, num_threads=1)))),
        "map": lambda: out.__setitem__(
            "map", subset.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
        ),
        "stage": stage_encoder,
    }
    times = alternate(variants, rounds, warmup=1)
    tokens = out["direct"]
    mapped = pc.sum(pc.list_value_length(out["map"].data.column("input_ids"))).as_py()
    assert mapped == tokens, "datasets.map and the direct call disagree"
    assert out["stage"] == tokens, "the stage's encoder and the direct call disagree"
    shutil.rmtree(scratch, ignore_errors=True)
    return {"tokens": tokens, "documents": n, **times}


def tokenize_run(project: Path, num_proc: int) -> dict:
    """The tokenize stage from scratch with `num_proc` processes: `run`'s figures plus its metrics."""
    for d in ("data/tokenized", "data/tokenizer", "data/tokenized.partial"):
        shutil.rmtree(project / d, ignore_errors=True)
    set_params(project, **{"tokenizer.num_proc": num_proc})
    r = stage(project, "tokenize")
    r["metrics"] = json.loads((project / "metrics" / "tokenize.json").read_text())
    r["metrics"].update(json.loads((project / "artifacts" / "timing" / "tokenize.json").read_text()))  # speed
    r["encode_tps"] = r["metrics"]["tokens_per_second"]
    return r


def write_copies(src: Path, dst: Path, copies: int) -> None:
    """The prepared DatasetDict at `src`, each split repeated `copies` times, saved at `dst` (a corpus that size
    without running `prepare` on it: prepare reads ~0.1 GB of text a minute on 2 busy cores)."""
    import datasets

    datasets.disable_progress_bars()
    prepared = datasets.load_from_disk(str(src))
    copied = {name: datasets.concatenate_datasets([split] * copies) for name, split in prepared.items()}
    datasets.DatasetDict(copied).save_to_disk(str(dst))


def make_project(workdir: Path, label: str, steps: int) -> Path:
    project = workdir / label
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    set_params(
        project,
        **{
            "data.source": "files",
            "data.files": {"glob": "corpus/*.txt", "text_field": "text"},
            "pretrain.max_steps": steps,
            "pretrain.optimizer.warmup_steps": min(5, steps),
            "pretrain.val_every_n_steps": 10_000,
            "pretrain.checkpoint_every_n_steps": 10_000,
            "trainer.divergence.patience_steps": 0,  # a timing run of a few steps: no stuck-loss guard
            "trainer.progress_bar": False,
            "mlflow.system_metrics": False,
            "mlflow.log_models": False,
        },
    )
    return project


def gb(values: list[float]) -> str:
    return spread(values, 2)


def stage_row(label: str, what: str, runs: list[dict], tokens: float | None = None, extra: str = "") -> str:
    """One stage's runs: wall s, CPU s, K tokens/s, peak RSS GB (largest process, tree), tree PSS GB, each median
    [min-max]."""
    rate = spread([tokens / r["seconds"] / 1e3 for r in runs], 1) if tokens else "-"
    return " | ".join(
        (
            label,
            what,
            spread([r["seconds"] for r in runs], 1),
            spread([r["cpu_s"] for r in runs], 1),
            rate,
            gb([r["peak_rss_gb"] for r in runs]),
            gb([r["tree_rss_gb"] for r in runs]),
            gb([r["tree_pss_gb"] for r in runs]),
            extra,
        )
    )


HEADER = "size | run | wall s | CPU s | K tokens/s | peak RSS GB | tree RSS GB | tree PSS GB | notes"


def summarise(runs: list[dict], *keys: str) -> dict:
    return {k: {"median": median([r[k] for r in runs]), "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
            for k in keys}  # fmt: skip


def main() -> None:
    if "--pretrain-child" in sys.argv:
        pretrain_child([a for a in sys.argv[1:] if a != "--pretrain-child"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="*", default=["1M", "2M"], help="corpus sizes (default 1M 2M)")
    parser.add_argument("--num-procs", nargs="+", type=int, default=[1, 2], help="tokenize runs (default 1 2)")
    parser.add_argument("--repeats", type=int, default=1, help="alternated runs of each tokenize (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the slice comparison (default 3)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct SentencePiece/map comparison")
    parser.add_argument("--vocab-size", type=int, default=None, help="tokenizer.vocab_size (default: params.yaml)")
    parser.add_argument("--tokenizer-from", default=None, help="project whose data/tokenizer the store run uses")
    parser.add_argument("--store-tokens", default=None, help="also train on a random store of this size (e.g. 1B)")
    parser.add_argument(
        "--copies", type=int, default=1, help="also tokenize each size's prepared splits repeated this many times"
    )
    parser.add_argument("--steps", type=int, default=3, help="pretrain steps; 0 skips pretrain (default 3)")
    parser.add_argument("--workdir", default="/tmp/bench_data", help="scratch directory (default /tmp/bench_data)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"start: {load_average()}", flush=True)
    rows, summary = [], {}
    first_project = None
    for label in args.tokens:
        n_tokens = parse_count(label)
        project = make_project(workdir, label, max(args.steps, 1))
        if args.vocab_size:
            set_params(project, **{"tokenizer.vocab_size": args.vocab_size})
        first_project = first_project or project
        chars = write_corpus(project / "corpus", n_tokens)
        prep = stage(project, "prepare")
        rows.append(stage_row(label, f"prepare ({chars / 1e6:.0f} MB)", [prep]))

        tok_runs = alternate_results(
            {p: (lambda p=p, project=project: tokenize_run(project, p)) for p in args.num_procs},
            args.repeats,
            warmup=0,
        )  # the last run's outputs stay for the slice comparison and pretrain
        first = args.num_procs[0]
        total = tok_runs[first][0]["metrics"]["tokens_total"]
        for p, runs in tok_runs.items():
            m = runs[-1]["metrics"]
            encode = spread([r["encode_tps"] / 1e3 for r in runs], 1)
            rows.append(
                stage_row(
                    label,
                    f"tokenize num_proc={p}",
                    runs,
                    total,
                    f"encode {encode} K tokens/s, {m['bytes_per_token']:.3f} B/token",
                )
            )
        if len(args.num_procs) > 1:
            last = args.num_procs[-1]
            enc = {p: [1 / r["encode_tps"] for r in runs] for p, runs in tok_runs.items()}
            rows.append(
                f"{label} | tokenize encode speedup num_proc {last} / {first} per run: "
                f"{ratio_spread(enc[first], enc[last], 2)}; stage wall: "
                f"{ratio_spread([r['seconds'] for r in tok_runs[first]], [r['seconds'] for r in tok_runs[last]], 2)}"
            )
        entry = {
            "tokens": total,
            "prepare": summarise([prep], "seconds", "cpu_s", "peak_rss_gb", "tree_rss_gb", "tree_pss_gb"),
            "tokenize": {
                p: summarise(runs, "seconds", "cpu_s", "peak_rss_gb", "tree_rss_gb", "tree_pss_gb", "encode_tps")
                for p, runs in tok_runs.items()
            },
        }
        if not args.no_direct:
            sl = slice_rates(project, args.rounds)
            t = sl["tokens"]
            rows.append(
                f"{label} | same slice ({t / 1e6:.2f}M tokens, {args.rounds} alternated rounds), K tokens/s: "
                f"SentencePiece direct {spread([t / x / 1e3 for x in sl['direct']], 1)}, "
                f"datasets.map {spread([t / x / 1e3 for x in sl['map']], 1)}, "
                f"stage encoder (1 proc) {spread([t / x / 1e3 for x in sl['stage']], 1)}; per round "
                f"map / direct = {ratio_spread(sl['direct'], sl['map'], 2)}, "
                f"stage / direct = {ratio_spread(sl['direct'], sl['stage'], 2)}"
            )
            entry["slice"] = sl
        if args.steps > 0:
            pre = run_pretrain(project)
            rows.append(
                stage_row(label, f"pretrain {args.steps} steps", [pre], extra=f"first step {pre['first_step_s']:.1f} s")
            )
            entry["pretrain"] = summarise(
                [pre], "seconds", "cpu_s", "peak_rss_gb", "tree_rss_gb", "tree_pss_gb", "first_step_s"
            )
        summary[label] = entry
        print("\n".join(r for r in rows if r.startswith(f"{label} |")), flush=True)
        if args.copies > 1:  # the same prepared splits `copies` times over: tokenize at that scale, no prepare
            big_label = f"{label}x{args.copies}"
            big = make_project(workdir, big_label, max(args.steps, 1))
            if args.vocab_size:
                set_params(big, **{"tokenizer.vocab_size": args.vocab_size})
            write_copies(project / "data" / "prepared", big / "data" / "prepared", args.copies)
            runs = {p: tokenize_run(big, p) for p in args.num_procs}
            for p, r in runs.items():
                m = r["metrics"]
                rows.append(
                    stage_row(
                        big_label,
                        f"tokenize num_proc={p}",
                        [r],
                        m["tokens_total"],
                        f"encode {m['tokens_per_second'] / 1e3:.1f} K tokens/s, {m['bytes_per_token']:.3f} B/token",
                    )
                )
            summary[big_label] = {
                "tokens": runs[first]["metrics"]["tokens_total"],
                "tokenize": {
                    p: summarise([r], "seconds", "cpu_s", "peak_rss_gb", "tree_rss_gb", "tree_pss_gb", "encode_tps")
                    for p, r in runs.items()
                },
            }
            print("\n".join(r for r in rows if r.startswith(f"{big_label} |")), flush=True)
            if not args.keep:
                shutil.rmtree(big, ignore_errors=True)
    first_project = Path(args.tokenizer_from) if args.tokenizer_from else first_project
    if args.store_tokens and first_project is not None:
        label = args.store_tokens
        project = make_project(workdir, f"store-{label}", max(args.steps, 1))
        shutil.copytree(first_project / "data" / "tokenizer", project / "data" / "tokenizer")
        vocab = json.loads((project / "data" / "tokenizer" / "tokenizer.json").read_text())["vocab_size"]
        start = time.perf_counter()
        write_random_store(project / "data" / "tokenized", parse_count(label), vocab)
        rows.append(f"{label} | random store written in {time.perf_counter() - start:.0f} s")
        pre = run_pretrain(project)
        rows.append(
            stage_row(label, f"pretrain {args.steps} steps", [pre], extra=f"first step {pre['first_step_s']:.1f} s")
        )
        summary[f"store-{label}"] = {
            "pretrain": summarise(
                [pre], "seconds", "cpu_s", "peak_rss_gb", "tree_rss_gb", "tree_pss_gb", "first_step_s"
            )
        }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.keep:
        for label in [*args.tokens, *([f"store-{args.store_tokens}"] if args.store_tokens else [])]:
            shutil.rmtree(workdir / label, ignore_errors=True)
    print()
    print(f"runs: each value median [min-max] over {args.repeats} repeat(s) (tokenize) or one run (prepare, pretrain)")
    print("\n".join([HEADER, *rows]))
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
