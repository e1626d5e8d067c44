"""Data at corpus scale: prepare + tokenize and the first training steps on generated `files` corpora.

For each size (`--tokens 10M 100M`) the script writes a synthetic corpus of plain-text shards (Zipf-distributed
pseudo-words, sentences, blank-line paragraphs: `data.files.sample_by: paragraph`) into a scratch project and
runs the real stages there, each in its own process:

- `prepare`, then `tokenize` with `tokenizer.num_proc` 1 and again from scratch with 2;
- SentencePiece called directly (one thread) and `datasets.map` (one process) on the same slice of the
  prepared train split, right after, under the same load: the stage's throughput as a fraction of those;
- `pretrain` of the `t5` variant for `--steps` steps (no validation, no checkpoint inside the window).

Per run: wall time, tokens/s, peak RSS (the largest process, and the sum over the process tree sampled every
0.1 s), and for pretrain the time from process start to the end of the first training step. The tokenized
store's bytes per token come from the tokenize metrics.

`--store-tokens 1000M` additionally writes a token store of that many random tokens straight to disk (no
prepare or tokenize: generating and tokenizing 1B tokens takes hours on 2 cores) next to the first corpus's
tokenizer and runs the same pretrain on it: the training figures at that scale.

    python benchmarks/bench_data.py [--tokens 10M 100M] [--store-tokens 1000M] [--steps 50] [--workdir DIR]
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
    from pipeline.tokenstore import SplitWriter, write_store_meta

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
    tree_peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs if p.is_running()))
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
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 2**20, "tree_rss_gb": tree_peak / 2**30, "out": output}


def stage(project: Path, name: str, *extra: str, env: dict | None = None) -> dict:
    return run([sys.executable, "-m", f"pipeline.{name}", *extra], project, env)


def pretrain_child(argv: list[str]) -> None:
    """In the child: record the end of the first training step, then run the real pretrain stage."""
    from pipeline import datamodule, pretrain

    marker, original = Path(os.environ[FIRST_STEP_ENV]), datamodule.SamplerPosition.on_train_batch_end

    def first_step(self, trainer, *args):
        if not marker.exists():
            marker.write_text(repr(time.time()))
        return original(self, trainer, *args)

    datamodule.SamplerPosition.on_train_batch_end = first_step
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


def direct_rates(project: Path, max_chars: int = 20_000_000) -> tuple[float, float, int]:
    """(SentencePiece direct tokens/s, datasets.map tokens/s) on one thread/process over the same train slice."""
    import datasets

    from pipeline.tokenizer import Tokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = Tokenizer.load(project / "data" / "tokenizer")
    train = datasets.load_from_disk(str(project / "data" / "prepared"))["train"]
    n, size = 0, 0
    for n, text in enumerate(train.data.column("text").to_pylist(), 1):  # noqa: B007
        size += len(text)
        if size >= max_chars:
            break
    subset = train.select(range(n))
    texts = subset.data.column("text").to_pylist()
    start = time.perf_counter()
    ids = tok.encode(texts, num_threads=1)
    direct = time.perf_counter() - start
    tokens = sum(map(len, ids))

    def encode(batch):
        return {"n": [len(x) for x in tok.encode(batch["text"], num_threads=1)]}

    start = time.perf_counter()
    mapped = subset.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
    mapped_s = time.perf_counter() - start
    assert sum(mapped["n"]) == tokens
    return tokens / direct, tokens / mapped_s, tokens


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
            "trainer.progress_bar": False,
            "mlflow.system_metrics": False,
            "mlflow.log_models": False,
        },
    )
    return project


def fmt_row(label: str, what: str, r: dict, extra: str = "", tokens: float | None = None) -> str:
    rate = f"{tokens / r['seconds']:>12,.0f}" if tokens else f"{'':>12}"
    return (
        f"{label:<6} {what:<22} {r['seconds']:>8.1f} {rate} {r['peak_rss_gb']:>8.2f} {r['tree_rss_gb']:>8.2f} {extra}"
    )


def main() -> None:
    if "--pretrain-child" in sys.argv:
        pretrain_child([a for a in sys.argv[1:] if a != "--pretrain-child"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", nargs="*", default=["10M", "100M"], help="corpus sizes (default 10M 100M)")
    parser.add_argument("--num-procs", nargs="+", type=int, default=[1, 2], help="tokenize runs (default 1 2)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct SentencePiece/map comparison")
    parser.add_argument("--tokenizer-from", default=None, help="project whose data/tokenizer the store run uses")
    parser.add_argument("--store-tokens", default=None, help="also train on a random store of this size (e.g. 1B)")
    parser.add_argument("--steps", type=int, default=50, help="pretrain steps (default 50)")
    parser.add_argument("--workdir", default="/tmp/bench_data", help="scratch directory (default /tmp/bench_data)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    print(f"load average at start: {os.getloadavg()}")
    header = f"{'size':<6} {'run':<22} {'seconds':>8} {'tokens/s':>12} {'rss GB':>8} {'tree GB':>8}"
    rows, summary = [header], {}
    first_project = None
    for label in args.tokens:
        n_tokens = parse_count(label)
        project = make_project(workdir, label, args.steps)
        first_project = first_project or project
        chars = write_corpus(project / "corpus", n_tokens)
        prep = stage(project, "prepare")
        rows.append(fmt_row(label, f"prepare ({chars / 1e6:.0f} MB)", prep))
        tok_runs = {}
        for num_proc in args.num_procs:
            for d in ("data/tokenized", "data/tokenizer", "data/tokenized.partial"):
                shutil.rmtree(project / d, ignore_errors=True)
            set_params(project, **{"tokenizer.num_proc": num_proc})
            r = stage(project, "tokenize")
            r["metrics"] = json.loads((project / "metrics" / "tokenize.json").read_text())
            tok_runs[num_proc] = r
            m = r["metrics"]
            rows.append(
                fmt_row(
                    label,
                    f"tokenize num_proc={num_proc}",
                    r,
                    f"encode {m['tokens_per_second']:,.0f} tok/s, {m['bytes_per_token']:.3f} B/token",
                    m["tokens_total"],
                )
            )
        direct, mapped, sample_tokens = direct_rates(project) if not args.no_direct else (float("nan"),) * 3
        stage_rate = tok_runs[args.num_procs[0]]["metrics"]["tokens_per_second"]
        rows.append(
            f"{label:<6} same slice ({sample_tokens / 1e6:.1f}M tokens): SentencePiece direct {direct:,.0f} tok/s, "
            f"datasets.map {mapped:,.0f} tok/s; stage (1 proc) / direct = {stage_rate / direct:.2f}, "
            f"map / direct = {mapped / direct:.2f}"
        )
        pre = run_pretrain(project)
        rows.append(
            fmt_row(label, f"pretrain {args.steps} steps", pre, extra=f"first step {pre['first_step_s']:.1f} s")
        )
        summary[label] = {
            "tokens": tok_runs[args.num_procs[0]]["metrics"]["tokens_total"],
            "prepare": {k: prep[k] for k in ("seconds", "peak_rss_gb", "tree_rss_gb")},
            "tokenize": {
                p: {**{k: r[k] for k in ("seconds", "peak_rss_gb", "tree_rss_gb")}, **r["metrics"]}
                for p, r in tok_runs.items()
            },
            "speedup_last_vs_first": tok_runs[args.num_procs[-1]]["metrics"]["tokens_per_second"] / stage_rate,
            "direct_tokens_per_s": direct,
            "map_tokens_per_s": mapped,
            "pretrain": {k: pre[k] for k in ("seconds", "peak_rss_gb", "tree_rss_gb", "first_step_s")},
        }
        speedup = summary[label]["speedup_last_vs_first"]
        rows.append(
            f"{label:<6} tokenize encode speedup num_proc {args.num_procs[-1]} / {args.num_procs[0]} = {speedup:.2f}"
        )
        print("\n".join(rows[-6:]), flush=True)
    first_project = Path(args.tokenizer_from) if args.tokenizer_from else first_project
    if args.store_tokens and first_project is not None:
        label = args.store_tokens
        project = make_project(workdir, f"store-{label}", args.steps)
        shutil.copytree(first_project / "data" / "tokenizer", project / "data" / "tokenizer")
        vocab = json.loads((project / "data" / "tokenizer" / "tokenizer.json").read_text())["vocab_size"]
        start = time.perf_counter()
        write_random_store(project / "data" / "tokenized", parse_count(label), vocab)
        rows.append(f"{label:<6} random store written in {time.perf_counter() - start:.0f} s")
        pre = run_pretrain(project)
        rows.append(
            fmt_row(label, f"pretrain {args.steps} steps", pre, extra=f"first step {pre['first_step_s']:.1f} s")
        )
        summary[f"store-{label}"] = {
            "pretrain": {k: pre[k] for k in ("seconds", "peak_rss_gb", "tree_rss_gb", "first_step_s")}
        }
    print()
    print("\n".join(rows))
    print(f"load average at end: {os.getloadavg()}")
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.keep:
        for label in [*args.tokens, *([f"store-{args.store_tokens}"] if args.store_tokens else [])]:
            shutil.rmtree(workdir / label, ignore_errors=True)


if __name__ == "__main__":
    main()
