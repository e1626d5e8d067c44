"""Our T5 (`models.t5`) against `transformers`' `T5ForConditionalGeneration`: same config, same weights.

Prints a table of times, peak memory and the ratios ours / reference for
- a training step (train mode with dropout, forward + cross-entropy + backward + fused AdamW step, the pipeline's),
- cached greedy generation of `--gen-tokens` tokens (EOS disabled so both produce exactly that many),
- our cached vs uncached greedy decoding (the decoder re-run over the whole prefix at each step).

Times: both models live in this process and their steps alternate (ours, reference, ours, ...), so load
from other processes hits both alike (`benchmarks/timing.py`); each row prints the median [min-max] of each side
over `--steps` timed steps after `--warmup`, and of the per-round ratio ours / reference. The load average is
printed at the start and the end.
Peak memory of a training step: each model runs its steps in a fresh subprocess that builds the model and
optimizer, resets the kernel's resident-set high-water mark (`/proc/self/clear_refs` = 5), runs the steps and
reads `VmHWM` from `/proc/self/status`: the reported figure is that peak minus the resident set just before
the first step (activations, gradients, optimizer state, temporaries), plus the absolute peak.

    python benchmarks/bench_t5.py                       # small preset, batch 2, 256 / 64, fp32, CPU (< 5 min busy)
    python benchmarks/bench_t5.py --batch 8 --input-len 512 --target-len 114 --steps 3 --mem-steps 2 \
        --gen-tokens 64 --gen-repeats 3 --uncached-tokens 128   # the issues' shapes (over 8 minutes on 2 busy cores)
    python benchmarks/bench_t5.py --preset tiny --steps 1 --gen-repeats 1    # seconds: a smoke run

Decoding is hundreds of small ops per token: on a machine shared with other work, every OpenMP barrier of a
multi-threaded op waits for a descheduled thread, and generation times say more about the load than the models.
Time generation with `--threads 1` there (and the training step, which is large matmuls, with the default):

    python benchmarks/bench_t5.py --preset small --skip generate
    python benchmarks/bench_t5.py --preset small --skip train memory --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Before torch loads OpenMP: threads that wait at a barrier sleep instead of spinning. On a machine shared with other
# jobs a spinning thread whose partner is descheduled burns its core, and step times swung 2-5x (bench_reformer's
# children do the same). Set OMP_WAIT_POLICY=ACTIVE to time the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import add_kernel_options, alternate, apply_kernel_options, load_average, ratio_spread, spread, table  # noqa: E402

from models.layers import padded_keys  # noqa: E402
from models.t5 import T5Config, T5Model  # noqa: E402


def build(preset: str, vocab_size: int | None, seed: int):
    """(ours, reference) with identical weights: the reference is built from our config, ours converted from it."""
    import transformers

    from models.hf.t5 import hf_config_dict, t5_from_hf

    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    config = T5Config.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in hf_config_dict(config).items() if k != "architectures"}
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg))
    if not config.tie_word_embeddings:
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight))
    ours = t5_from_hf(ref)
    return ours, ref


def batch(config: T5Config, b: int, s: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, config.vocab_size, (b, s), generator=g)
    y = torch.randint(2, config.vocab_size, (b, t), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    am[b // 2 :, s - s // 8 :] = 0  # some padding, as real batches have
    dec_in = torch.cat([torch.zeros(b, 1, dtype=torch.long), y[:, :-1]], dim=1)
    return x, am, dec_in, y


def make_step(model, is_ref: bool, data):
    x, am, dec_in, labels = data
    # both sides step with the pipeline's optimizer, fused AdamW (pipeline/training/module.py `build_optimizer`):
    # the unfused default's ten elementwise passes per tensor were ~0.8 s of a 5 s step here, the same for both
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step():
        if is_ref:
            logits = model(input_ids=x, attention_mask=am, decoder_input_ids=dec_in).logits
        else:
            logits = model(x, am, dec_in)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(args) -> None:
    """Subprocess body: peak resident memory of training steps of one model."""
    ours, ref = build(args.preset, args.vocab_size, args.seed)
    config = ours.config
    model, is_ref = (ref, True) if args.child == "ref" else (ours, False)
    del ours, ref
    import gc

    gc.collect()
    step = make_step(model, is_ref, batch(config, *args.shape))
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    for _ in range(args.mem_steps):
        step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "step_peak_mib": (peak - before) / 1024}))


def memory(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--preset", args.preset, "--batch", str(args.batch)]
    cmd += ["--input-len", str(args.input_len), "--target-len", str(args.target_len), "--seed", str(args.seed)]
    cmd += ["--mem-steps", str(args.mem_steps), "--threads", str(args.threads)]
    if args.vocab_size:
        cmd += ["--vocab-size", str(args.vocab_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def uncached_greedy(model: T5Model, x, am, n: int) -> torch.Tensor:
    """Greedy decoding without caches: the decoder re-runs over the whole prefix each step (encoder once)."""
    with torch.no_grad():
        memory = model.encode(x, am)
        cross_hidden = padded_keys(am)
        seq = torch.zeros(x.shape[0], 1, dtype=torch.long)
        for _ in range(n):
            T = seq.shape[1]
            bias, hidden = model.decoder.self_mask(T, T, causal=True)
            h = model.decoder(model.shared(seq), bias, hidden, memory=memory, cross_hidden=cross_hidden)
            seq = torch.cat([seq, model.logits(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (32128 for small)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--target-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=1, help="training steps in each memory subprocess")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--gen-input-len", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=16)
    p.add_argument("--gen-repeats", type=int, default=2)
    p.add_argument("--uncached-tokens", type=int, default=16, help="0 skips cached vs uncached")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "memory", "generate"])
    p.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    add_kernel_options(p)
    args = p.parse_args()
    args.shape = (args.batch, args.input_len, args.target_len)
    torch.set_num_threads(args.threads)
    kernels = apply_kernel_options(args)
    if args.child:
        return child_memory(args)

    import transformers

    print(f"start: {load_average()}")
    ours, ref = build(args.preset, args.vocab_size, args.seed)
    c = ours.config
    print(f"T5 preset {args.preset}: {ours.num_parameters() / 1e6:.1f}M parameters")
    print(f"transformers {transformers.__version__}, attention {ref.config._attn_implementation}")
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={policy}, fp32 CPU")
    print(f"{kernels}\n")
    rows = []  # (label, ours, reference, ratio): timings as median [min-max] strings
    if "train" not in args.skip:
        data = batch(c, *args.shape)
        t = alternate(
            {"ours": make_step(ours, False, data), "ref": make_step(ref, True, data)}, args.steps, args.warmup
        )
        rows.append((f"train step b{args.batch} {args.input_len}/{args.target_len} (s)", *_timed_row(t)))
        _progress(rows)
    if "memory" not in args.skip:
        mo, mr = memory(args, "ours"), memory(args, "ref")
        for key, label in (("step_peak_mib", "increment"), ("peak_mib", "process")):
            ratio = f"{mo[key] / mr[key]:.3f}"
            rows.append((f"train step peak memory, {label} (MiB)", f"{mo[key]:.1f}", f"{mr[key]:.1f}", ratio))
        _progress(rows)
    if "generate" not in args.skip:
        if "train" not in args.skip:  # the training steps moved the two models' weights apart (own dropout draws)
            ours, ref = build(args.preset, args.vocab_size, args.seed)
        ours.eval(), ref.eval()
        x, am, _, _ = batch(c, args.gen_batch, args.gen_input_len, 2, seed=1)
        ref.generation_config.eos_token_id = None  # exactly gen_tokens tokens from both
        n = args.gen_tokens
        outs = {}

        def run_ours():
            outs["ours"] = ours.generate(x, am, max_new_tokens=n, eos_token_id=-1)

        def run_ref():
            outs["ref"] = ref.generate(x, attention_mask=am, max_new_tokens=n, do_sample=False, num_beams=1)

        t = alternate({"ours": run_ours, "ref": run_ref}, args.gen_repeats, 1)
        same = torch.equal(outs["ours"], outs["ref"])
        label = f"greedy generate {n} tokens b{args.gen_batch} (s){'' if same else ' OUTPUT DIFFERS'}"
        rows.append((label, *_timed_row(t)))
        _progress(rows)
        if args.uncached_tokens:
            m = args.uncached_tokens
            t = alternate(
                {
                    "ours": lambda: outs.__setitem__("c", ours.generate(x, am, max_new_tokens=m, eos_token_id=-1)),
                    "ref": lambda: outs.__setitem__("u", uncached_greedy(ours, x, am, m)),
                },
                1,
                warmup=0,
            )
            same = torch.equal(outs["c"], outs["u"])
            label = f"ours greedy {m} tokens: cached vs uncached (s){'' if same else ' OUTPUT DIFFERS'}"
            rows.append((label, *_timed_row(t)))

    header = ("measure", "ours median [min-max]", "reference", "ours/ref per round")
    print(table(header, rows))
    print(f"end: {load_average()}")


def _progress(rows: list[tuple[str, ...]]) -> None:
    print(f"  done: {' | '.join(rows[-1])}", file=sys.stderr, flush=True)


def _timed_row(times: dict[str, list[float]]) -> tuple[str, str, str]:
    """The table cells of one alternated measurement: each side's spread and the per-round ratio's."""
    return spread(times["ours"]), spread(times["ref"]), ratio_spread(times["ours"], times["ref"])


if __name__ == "__main__":
    main()
