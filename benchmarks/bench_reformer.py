"""Training-step time and peak memory of our Reformer against full attention, our T5 and `transformers`' Reformer.

Tables (batch 1, one training step = forward + cross-entropy + backward + AdamW step):
  1. time and peak memory versus sequence length (default 1K, 4K; `--full-sweep` 1K..64K) for
     - `reformer`: ours, preset (default `tiny`), causal_lm, reversible, LSH/local as in the preset;
     - `full`: the same model and weights shape with full attention everywhere and an ordinary residual stack
       (an equal-size full-attention Transformer);
     - `t5`: our T5 of the same preset name, causal_lm (if `models.t5` is importable);
     - `hf`: `transformers.ReformerModelWithLMHead` built from the identical config (`config_to_hf`);
  2. peak memory versus depth at one length (default 2K): reversible Reformer against the same layers as an
     ordinary residual stack;
  3. ours / transformers ratios (time and memory) at the lengths both ran;
  4. ours and transformers' Reformer in one child process, steps alternated (`benchmarks/timing.py`): each side's
     median [min-max] and the per-round ratio's (default 4K).

Times are median [min-max] over the timed steps; the load average is printed at the start and the end.

Every (model, length) runs in a fresh child process (glibc's mmap threshold fixed, so freed blocks go back to the
system at once); its peak memory is the growth of the child's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) from after building the model and inputs to after the steps, so the
interpreter, torch and the weights are excluded. Runs whose attention would not fit in the memory available now are
skipped with "n/a (needs ~X GiB)". On CUDA (`--device cuda`) peak memory is `torch.cuda.max_memory_allocated`.

    python benchmarks/bench_reformer.py                       # the default tables (under 5 minutes on 2 busy cores)
    python benchmarks/bench_reformer.py --lengths 1024 4096 16384 --max-quadratic-length 4096 --depth-length 4096 \
        --paired-lengths 4096 16384 --paired-repeats 10       # the earlier default, 16K included (~4 min idle)
    python benchmarks/bench_reformer.py --full-sweep          # 1K..64K, depths 2..12, paired up to 64K (~15-20 min)
    python benchmarks/bench_reformer.py --lengths 4096 --models reformer hf --depths --paired-lengths 4096 16384

The default keeps the slow quadratic references (`full`, `t5`) to lengths <= --max-quadratic-length (1K) and times
lengths >= --long (16K) with one step and no warm-up. Children run with OMP_WAIT_POLICY=passive (--omp-wait-policy):
on a machine shared with other jobs, OpenMP threads that spin at every barrier while their partner is descheduled
made step times swing 2-3x; sleeping threads make the alternated ratio stable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import add_kernel_options, alternate, apply_kernel_options, load_average, median, ratio_spread, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def reformer_config(preset: str, length: int, vocab: int, layers: int | None, **overrides):
    """The benchmark's Reformer config: axial grid sized to `length` (transformers trains only on exactly
    prod(axial_pos_shape) tokens), dropout as in the preset."""
    from models.reformer import ReformerConfig

    base = ReformerConfig.from_preset(preset)
    cols = min(256, length)
    kw = dict(vocab_size=vocab, layout="causal_lm", axial_pos_shape=[length // cols, cols])
    kw["axial_pos_dims"] = base.axial_pos_dims
    kw["max_position_embeddings"] = max(65536, length)
    if layers is not None:
        kw["attn_layers"] = (base.attn_layers * layers)[:layers]
    kw.update(overrides)
    return ReformerConfig.from_preset(preset, **kw)


def build(spec: dict):
    """(model, step function) for one benchmark row."""
    import torch
    import torch.nn.functional as F

    name, length, vocab = spec["model"], spec["length"], spec["vocab"]
    layers = spec.get("layers")
    if name in ("reformer", "full", "hf"):
        overrides = {"reversible": spec.get("reversible", True)}
        if name == "full":  # every layer attends to the whole sequence; an ordinary residual stack
            overrides.update(use_full_attention=True, local_chunk_length=length, reversible=False)
        config = reformer_config(spec["preset"], length, vocab, layers, **overrides)
        if name == "hf":
            from transformers import ReformerModelWithLMHead
            from transformers.utils import logging

            from models.hf.reformer import config_to_hf

            logging.set_verbosity_error()
            model = ReformerModelWithLMHead(config_to_hf(config))
        else:
            from models.reformer import ReformerModel

            model = ReformerModel(config)
    elif name == "t5":
        from models.t5 import T5Config, T5Model

        kw = dict(vocab_size=vocab, layout="causal_lm")
        if layers is not None:
            kw["num_layers"] = layers
        model = T5Model(T5Config.from_preset(spec["preset"], **kw))
    else:
        raise ValueError(f"unknown model {name!r}")
    device = torch.device(spec["device"])
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the pipeline's (build_optimizer)
    ids = torch.randint(2, vocab, (1, length), device=device)

    def step():
        if name == "hf":
            logits = model(ids).logits
        else:
            logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def child(spec: dict) -> dict:
    """Runs in the child process: build, measure, return {time_s, peak_gib}."""
    import torch

    torch.manual_seed(0)
    _, step = build(spec)
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not cuda and spec.get("budget_bytes"):  # fail with a MemoryError instead of pushing the machine into OOM
        status = Path("/proc/self/status").read_text()
        vm = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + spec["budget_bytes"], resource.RLIM_INFINITY))
    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"time_s": median(times), "times": times, "peak_gib": peak / GIB}


def paired_child(spec: dict) -> dict:
    """Ours and transformers' Reformer built side by side, steps alternated after one warm-up each
    (`benchmarks/timing.py`): every step time of each, for a per-round ratio that survives a busy machine."""
    import torch

    torch.manual_seed(0)
    steps = {name: build({**spec, "model": name})[1] for name in ("reformer", "hf")}
    times = alternate(steps, spec["repeats"], warmup=1)
    return {f"{name}_times": t for name, t in times.items()}


def estimate_gib(spec: dict, heads: int, layers: int) -> float:
    """Rough peak of the (L, L) attention maps of a full-attention model: one kept per layer and head for the
    backward, two more in flight; T5 also keeps its position bias. Chunked models are small by construction."""
    if spec["model"] not in ("full", "t5"):
        return 0.0
    maps = layers + 2 + (1 if spec["model"] == "t5" else 0)
    return maps * heads * spec["length"] ** 2 * 4 / GIB


def available_gib(device: str) -> float:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / GIB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def measure(spec: dict, args) -> dict | str:
    """Run one row in a fresh process; returns the child's result or the reason it was skipped."""
    from models.reformer import ReformerConfig

    preset = ReformerConfig.from_preset(args.preset)
    layers = spec.get("layers") or len(preset.attn_layers)
    need = estimate_gib(spec, preset.num_heads, layers)
    have = available_gib(args.device)
    if need > have:
        return f"n/a (needs ~{need:.0f} GiB)"
    spec = {**spec, "budget_bytes": int(args.memory_fraction * have * GIB)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        # a fixed mmap threshold makes glibc return large freed blocks at once, so peak RSS follows live tensors
        # instead of the allocator's high-water mark (which otherwise grows with the number of layers run)
        env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536", **omp_env(args)},
        timeout=args.child_timeout,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if "memory" in last.lower():
            return f"n/a (over {args.memory_fraction * have:.0f} GiB)"
        return f"failed ({last[:60]})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def omp_env(args) -> dict[str, str]:
    return {} if args.omp_wait_policy == "default" else {"OMP_WAIT_POLICY": args.omp_wait_policy.upper()}


def fmt(result, key: str, unit: str) -> str:
    if isinstance(result, str):
        return result
    if key == "time_s" and len(result.get("times", [])) > 1:
        return f"{spread(result['times'], 2)} {unit}"
    return f"{result[key]:.2f} {unit}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"\n## {title}\n", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=256, help="byte-level, as the paper's enwik8 runs")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096], help="none: skip the length tables")
    parser.add_argument("--models", nargs="+", default=["reformer", "full", "t5", "hf"])
    parser.add_argument("--max-quadratic-length", type=int, default=1024, help="longest length for full and t5")
    parser.add_argument("--depths", type=int, nargs="*", default=[2, 12], help="none: skip the depth table")
    parser.add_argument("--depth-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--long", type=int, default=16384, help="from this length on: 1 timed step, no warm-up")
    parser.add_argument("--paired-lengths", type=int, nargs="*", default=[4096], help="alternated ours/hf")
    parser.add_argument("--paired-repeats", type=int, default=5, help="alternated steps each (3 from --long on)")
    parser.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"])
    parser.add_argument(
        "--full-sweep",
        action="store_true",
        help="lengths 1K..64K (quadratic references up to 16K where memory allows), depths 2 4 8 12, paired 4K..64K",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--memory-fraction", type=float, default=0.85, help="cap per run, of the memory available")
    parser.add_argument("--child-timeout", type=int, default=900)
    add_kernel_options(parser)
    args = parser.parse_args(argv)
    kernels = apply_kernel_options(args)
    if args.full_sweep:
        args.lengths, args.depths = [1 << k for k in range(10, 17)], [2, 4, 8, 12]
        args.max_quadratic_length, args.paired_lengths = max(args.max_quadratic_length, 16384), [4096, 16384, 65536]
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(paired_child(spec) if spec["model"] == "paired" else child(spec)))
        return

    models = [m for m in args.models if m != "t5" or _importable("models.t5")]
    print(f"start: {load_average()}", flush=True)
    print(kernels, flush=True)
    started = time.perf_counter()
    results: dict[tuple[str, int], dict | str] = {}
    for length in args.lengths:
        short = length < args.long
        for name in models:
            if name in ("full", "t5") and length > args.max_quadratic_length:
                results[name, length] = "skipped (quadratic)"
                continue
            spec = dict(model=name, length=length, vocab=args.vocab, preset=args.preset, device=args.device)
            spec.update(warmup=1 if short else 0, repeats=args.repeats if short else 1)
            results[name, length] = measure(spec, args)
            print(f"  {name:9s} L={length:6d}: {results[name, length]}", file=sys.stderr, flush=True)

    header = ["length"] + [f"{m} time" for m in models] + [f"{m} peak" for m in models] + ["reformer/full peak"]
    rows = []
    for length in args.lengths:
        row = [str(length)] + [fmt(results[m, length], "time_s", "s") for m in models]
        row += [fmt(results[m, length], "peak_gib", "GiB") for m in models]
        ref, full = results.get(("reformer", length)), results.get(("full", length))
        ok = isinstance(ref, dict) and isinstance(full, dict)
        row.append(f"{ref['peak_gib'] / full['peak_gib']:.3f}" if ok else "n/a")
        rows.append(row)
    out = (
        [table(f"Training step vs length (batch 1, preset {args.preset}, vocab {args.vocab})", header, rows)]
        if rows
        else []
    )

    depth_rows, first = [], {}
    for depth in args.depths:
        row = [str(depth)]
        for reversible in (True, False):
            spec = dict(model="reformer", length=args.depth_length, vocab=args.vocab, preset=args.preset)
            spec.update(device=args.device, layers=depth, reversible=reversible, warmup=0, repeats=1)
            result = measure(spec, args)
            print(f"  depth {depth} reversible={reversible}: {result}", file=sys.stderr, flush=True)
            if isinstance(result, dict):
                first.setdefault(reversible, result["peak_gib"])
                row.append(f"{result['peak_gib']:.3f} GiB ({result['peak_gib'] / first[reversible]:.2f}x)")
            else:
                row.append(result)
        depth_rows.append(row)
    title = f"Peak memory vs depth at {args.depth_length} tokens (growth against the shallowest)"
    if depth_rows:
        out.append(table(title, ["layers", "reversible", "ordinary residual"], depth_rows))

    if "hf" in models and "reformer" in models:
        ratio_rows = []
        for length in args.lengths:
            ours, hf = results["reformer", length], results["hf", length]
            if isinstance(ours, dict) and isinstance(hf, dict):
                t, m = ours["time_s"] / hf["time_s"], ours["peak_gib"] / hf["peak_gib"]
                ratio_rows.append([str(length), f"{t:.2f}", f"{m:.2f}"])
        if ratio_rows:
            title = "Ours / transformers' Reformer (identical config, separate runs)"
            out.append(table(title, ["length", "time", "peak"], ratio_rows))
        paired_rows = []
        for length in args.paired_lengths:
            spec = dict(model="paired", length=length, vocab=args.vocab, preset=args.preset, device=args.device)
            repeats = args.paired_repeats if length < args.long else min(args.paired_repeats, 3)
            result = measure({**spec, "repeats": repeats}, args)
            print(f"  paired L={length}: {result}", file=sys.stderr, flush=True)
            if isinstance(result, dict):
                t_ours, t_hf = result["reformer_times"], result["hf_times"]
                row = [str(length), str(repeats), f"{spread(t_ours, 2)} s", f"{spread(t_hf, 2)} s"]
                paired_rows.append(row + [ratio_spread(t_ours, t_hf, 2)])
        if paired_rows:
            title = "Step time, ours vs transformers' Reformer in one process, alternated (median [min-max])"
            header = ["length", "steps", "ours", "transformers", "ours/transformers per round"]
            out.append(table(title, header, paired_rows))
    print("\n".join(out))
    policy = f"OMP_WAIT_POLICY={args.omp_wait_policy}"
    print(f"\n(total {time.perf_counter() - started:.0f} s, device {args.device}, default torch threads, {policy})")
    print(f"end: {load_average()}")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
