"""Incremental decoding of our T5 and our Reformer against `transformers`, and cached against uncached.

Tables (CPU fp32, EOS disabled so every run produces exactly the asked number of tokens; same weights both sides):
  1. T5 (`--t5-preset`, default small) cached greedy and beam search, ours / `T5ForConditionalGeneration.generate`,
     for each batch size and thread count asked;
  2. T5 cached / uncached greedy (uncached: `models.generation.Uncached`, the model re-run over the whole prefix);
  3. Reformer (`tiny`, causal LM, byte vocabulary, fixed hash seed) cached greedy / uncached, and cached greedy /
     `ReformerModelWithLMHead.generate` (transformers' cached Reformer) from a longer prompt.

Each row alternates the two sides (ours, reference, ours, ...) after a warm-up round and prints the median and
[min-max] of the repeats, and of the per-round ratio ours / reference (`benchmarks/timing.py`); the load average is
printed at the start and the end, since other work on the machine moves the absolute times (alternation keeps the
ratio fair). "same" says whether both produced the same tokens.

    python benchmarks/bench_generate.py                              # default: under 5 minutes on 2 busy cores
    python benchmarks/bench_generate.py --t5-tokens 64 --threads 1 2 --repeats 3 --uncached-tokens 128 \
        --reformer-tokens 256 --reformer-hf-tokens 64    # the issue's figures (T5 small b4, 128-token prompt)
    python benchmarks/bench_generate.py --batches 1 4 8 16 32 --threads 1 2 --repeats 5
    python benchmarks/bench_generate.py --skip t5                    # the Reformer rows only

The default is sized to finish in under 5 minutes on a busy 2-core machine (one thread, 16 tokens, 2 repeats);
with several threads on a loaded machine every multi-threaded op of a decoding step waits for a descheduled thread,
and the 2-thread rows take minutes each there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: threads waiting at a barrier sleep instead of spinning (as bench_t5 and bench_reformer's
# children), so a multi-threaded row on a busy machine does not burn a core while its partner thread is descheduled.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import add_kernel_options, alternate, apply_kernel_options, load_average, ratio_spread, spread  # noqa: E402

from models.generation import Uncached, generate  # noqa: E402


def _quiet(fn):
    """Run fn with transformers' per-step notices silenced (printed, not logged, by its Reformer generate)."""

    def run():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return fn()

    return run


def _row(label: str, times: dict[str, list[float]], same: bool) -> str:
    ours, ref = times["ours"], times["ref"]
    return f"{label:<44} {spread(ours):>24} {spread(ref):>24} {ratio_spread(ours, ref):>24}  {same}"


def t5_rows(args) -> list[str]:
    from bench_t5 import batch, build

    ours, ref = build(args.t5_preset, None, 0)
    ours.eval(), ref.eval()
    ref.generation_config.eos_token_id = None
    rows, n = [], args.t5_tokens
    for threads in args.threads:
        torch.set_num_threads(threads)
        for b in args.batches:
            x, am, _, _ = batch(ours.config, b, args.t5_prompt, 2, seed=1)
            for beams in args.beams:
                out = {}

                def run_ours(x=x, am=am, beams=beams, out=out):
                    out["ours"] = ours.generate(x, am, max_new_tokens=n, num_beams=beams, eos_token_id=-1)

                def run_ref(x=x, am=am, beams=beams, out=out):
                    out["ref"] = ref.generate(
                        x, attention_mask=am, max_new_tokens=n, do_sample=False, num_beams=beams, early_stopping=False
                    )

                times = alternate({"ours": run_ours, "ref": run_ref}, args.repeats)
                same = torch.equal(out["ours"], out["ref"])
                kind = "greedy" if beams == 1 else f"beam-{beams}"
                rows.append(_row(f"T5 {kind} b{b} {threads}t, {n} tokens", times, same))
                print(rows[-1], flush=True)
    if args.uncached_tokens:
        torch.set_num_threads(args.threads[0])
        x, am, _, _ = batch(ours.config, args.batches[0], args.t5_prompt, 2, seed=1)
        m, out, plain = args.uncached_tokens, {}, Uncached(ours)
        times = alternate(
            {
                "ours": lambda: out.__setitem__("ours", ours.generate(x, am, max_new_tokens=m, eos_token_id=-1)),
                "ref": lambda: out.__setitem__("ref", generate(plain, x, am, max_new_tokens=m, eos_token_id=-1)),
            },
            1,
            warmup=0,
        )
        rows.append(_row(f"T5 cached / uncached b{args.batches[0]}, {m} tokens", times, torch.equal(*out.values())))
        print(rows[-1], flush=True)
    return rows


def reformer_rows(args) -> list[str]:
    from transformers.utils import logging

    from models.hf.reformer import reformer_to_hf
    from models.reformer import ReformerConfig, ReformerModel

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads[0])
    config = ReformerConfig.from_preset("tiny", vocab_size=256, layout="causal_lm", hash_seed=0, dropout_rate=0.0)
    torch.manual_seed(0)
    ours = ReformerModel(config).eval()
    ref = reformer_to_hf(ours).eval()
    ref.generation_config.eos_token_id = None
    rows, out = [], {}
    g = torch.Generator().manual_seed(1)

    m = args.reformer_tokens
    ids = torch.randint(2, 256, (1, args.reformer_prompt), generator=g)
    times = alternate(
        {
            "ours": lambda: out.__setitem__("ours", ours.generate(ids, max_new_tokens=m, eos_token_id=-1)),
            "ref": lambda: out.__setitem__("ref", generate(Uncached(ours), ids, max_new_tokens=m, eos_token_id=-1)),
        },
        1,
        warmup=0,
    )
    rows.append(_row(f"Reformer cached / uncached P{ids.shape[1]}, {m} tokens", times, torch.equal(*out.values())))
    print(rows[-1], flush=True)

    n = args.reformer_hf_tokens
    ids = torch.randint(2, 256, (1, args.reformer_hf_prompt), generator=g)
    times = alternate(
        {
            "ours": lambda: out.__setitem__("ours", ours.generate(ids, max_new_tokens=n, eos_token_id=-1)),
            "ref": _quiet(
                lambda: out.__setitem__(
                    "ref", ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                )
            ),
        },
        args.repeats,
    )
    rows.append(_row(f"Reformer greedy / transformers P{ids.shape[1]}, {n} tokens", times, torch.equal(*out.values())))
    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t5-preset", default="small")
    p.add_argument("--t5-prompt", type=int, default=128)
    p.add_argument("--t5-tokens", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[4])
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=2, help="alternated timed rounds after one warm-up")
    p.add_argument("--uncached-tokens", type=int, default=32, help="T5 cached vs uncached (0 skips)")
    p.add_argument("--reformer-prompt", type=int, default=128)
    p.add_argument("--reformer-tokens", type=int, default=128, help="Reformer cached vs uncached")
    p.add_argument("--reformer-hf-prompt", type=int, default=512)
    p.add_argument("--reformer-hf-tokens", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], choices=["t5", "reformer"])
    add_kernel_options(p)
    args = p.parse_args(argv)
    kernels = apply_kernel_options(args)
    import transformers

    policy = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, CPU fp32, {policy}; {load_average()}")
    print(kernels)
    print(f"{'row':<44} {'ours median [min-max] s':>24} {'reference':>24} {'ours/ref per round':>24}  same")
    if "t5" not in args.skip:
        t5_rows(args)
    if "reformer" not in args.skip:
        reformer_rows(args)
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
