"""The kernel settings (params.yaml `kernels:`) measured against each other, so a user picks one with evidence.

Every setting gives the same numbers run after run on one machine (none is chosen by a timing at run time); they
differ in speed, and in the last bits of the results. This script times, on this machine, for each setting:
- a training step of our T5 and our Reformer (forward + cross-entropy + backward + fused AdamW), the reference path
  (`kernels.paths: reference`) against the fast paths with `kernels.matmul` blas and onednn;
- cached greedy and beam-4 decoding with our T5, the reference path against the fast paths with `kernels.decoding`
  plain and shaped (under each matmul kernel);
- the decoding products alone, per T5-small weight and row count, each form of
  `models.fast.products.decoding_form`.
The settings alternate call by call in this one process (`benchmarks/timing.py`: median [min-max] and the per-round
ratio against the first setting of the row), and the load average is printed at the start and the end.

    python benchmarks/bench_kernels.py                          # T5 small, Reformer tiny, 1 thread (~4 min busy)
    python benchmarks/bench_kernels.py --threads 2 --repeats 5
    python benchmarks/bench_kernels.py --skip products          # the model rows only

What `kernels.matmul: auto` picks here is printed too (`models.settings.default_matmul_kernel`: oneDNN on AMD, the BLAS
elsewhere); set `kernels.matmul` explicitly where this table says the other one is faster on your processor.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benchmarks: waiting threads sleep

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import alternate, load_average, ratio_spread, spread, table  # noqa: E402

import models  # noqa: E402
from models import settings  # noqa: E402
from models.fast import products  # noqa: E402


def setting(matmul: str, decoding: str, paths: str = "fast"):
    """A function that switches this process to the setting and runs `fn` under it."""

    def wrap(fn):
        def run():
            models.set_cpu_kernels(matmul, decoding, paths)
            return fn()

        return run

    return wrap


def train_step(model, data):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    x, am, dec_in, labels = data

    def step():
        logits = model(x, am, dec_in) if dec_in is not None else model(x, am)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def t5_model(preset: str):
    from models.t5 import T5Config, T5Model

    torch.manual_seed(0)
    return T5Model(T5Config.from_preset(preset))


def reformer_model(preset: str, length: int):
    from models.reformer import ReformerConfig, ReformerModel

    torch.manual_seed(0)
    return ReformerModel(ReformerConfig.from_preset(preset, vocab_size=256, layout="causal_lm", hash_seed=0))


def t5_batch(vocab: int, b: int, s: int, t: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(2, vocab, (b, s), generator=g), torch.randint(2, vocab, (b, t), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    am[b // 2 :, s - s // 8 :] = 0
    return x, am, torch.cat([torch.zeros(b, 1, dtype=torch.long), y[:, :-1]], 1), y


def row(label: str, times: dict[str, list[float]]) -> tuple[str, ...]:
    names = list(times)
    first = times[names[0]]
    cells = [label]
    for name in names:
        cells.append(f"{name}: {spread(times[name])}")
    for name in names[1:]:
        cells.append(f"{name}/{names[0]}: {ratio_spread(times[name], first)}")
    return tuple(cells)


def model_rows(args) -> list[tuple[str, ...]]:
    rows = []
    matmuls = ["blas", "onednn"] if models.onednn_available() else ["blas"]

    def settings_of(step):  # the reference path, then the fast paths under each matmul kernel
        return {"reference": setting("blas", "plain", "reference")(step)} | {
            f"fast+{m}": setting(m, "plain")(step) for m in matmuls
        }

    t5 = t5_model(args.t5_preset)
    data = t5_batch(t5.config.vocab_size, args.batch, args.input_len, args.target_len)
    step = train_step(t5, data)
    times = alternate(settings_of(step), args.repeats, warmup=1)
    rows.append(row(f"T5 {args.t5_preset} training step b{args.batch} {args.input_len}/{args.target_len}", times))
    print(rows[-1], file=sys.stderr, flush=True)

    rf = reformer_model(args.reformer_preset, args.reformer_len)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 256, (1, args.reformer_len), generator=g)
    step = train_step(rf, (ids, None, None, ids))
    times = alternate(settings_of(step), args.repeats, warmup=1)
    rows.append(row(f"Reformer {args.reformer_preset} causal LM training step b1 {args.reformer_len}", times))
    print(rows[-1], file=sys.stderr, flush=True)

    t5.eval()
    x, am, _, _ = t5_batch(t5.config.vocab_size, args.gen_batch, args.gen_input_len, 2)
    for beams in (1, 4):
        for m in matmuls:

            def gen(beams=beams):
                with torch.no_grad():
                    return t5.generate(x, am, max_new_tokens=args.gen_tokens, num_beams=beams, eos_token_id=-1)

            runs = {"reference": setting("blas", "plain", "reference")(gen)}
            runs |= {f"fast+{m}+{d}": setting(m, d)(gen) for d in ("plain", "shaped")}
            times = alternate(runs, args.repeats, warmup=1)
            label = f"T5 {args.t5_preset} {'greedy' if beams == 1 else f'beam-{beams}'} b{args.gen_batch}, {m}"
            rows.append(row(f"{label}, {args.gen_tokens} tokens", times))
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def product_rows(args) -> list[tuple[str, ...]]:
    """Each decoding form on T5-small's weights, 8 copies of each streamed in turn (as decoding reads them)."""
    shapes = {"vocabulary": (32128, 512), "q/k/v stacked": (1536, 512), "wi": (2048, 512), "wo": (512, 2048)}
    forms = ["linear", "right"] + (["packed"] if models.onednn_available() else [])
    rows = []
    models.set_cpu_kernels("blas", "plain", "fast")
    for rows_n in args.rows:
        for name, (out_f, in_f) in shapes.items():
            weights = [torch.randn(out_f, in_f) for _ in range(8)]
            x = torch.randn(rows_n, in_f)

            def run(form, weights=weights, x=x):
                def fn():
                    for w in weights:
                        products.compute(form, x, w)

                return fn

            times = alternate({f: run(f) for f in forms}, args.repeats, warmup=1)
            rule = products.decoding_form(rows_n, out_f, in_f, torch.float32)
            rows.append(row(f"{rows_n} rows x {name} {out_f}x{in_f} (shaped: {rule})", times))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t5-preset", default="small")
    p.add_argument("--reformer-preset", default="tiny")
    p.add_argument("--reformer-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--gen-input-len", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=[], choices=["models", "products"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"start: {load_average()}")
    vendor = models.processor_vendor() or "unknown vendor"
    auto = settings.default_matmul_kernel()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {vendor}; auto picks {auto} on the fast paths")
    rows = []
    if "models" not in args.skip:
        rows += model_rows(args)
    if "products" not in args.skip:
        rows += product_rows(args)
    width = max(len(r) for r in rows)
    rows = [tuple(r) + ("",) * (width - len(r)) for r in rows]
    print(table(("row",) + ("",) * (width - 1), rows))
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
