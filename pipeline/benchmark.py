"""Stage `benchmark`: training-step speed and peak memory of every model variant versus sequence length and depth.

Every variant of `models:` is built from its `params.yaml` entry in the encoder-decoder layout the pipeline
trains (its family's spec sizes it to a depth and a length), and runs one AdamW training step on random
tokens: `L` input tokens and `L / 4` target tokens (the ratio span corruption produces). Every measurement runs
in its own child process (`python -m pipeline.benchmark --child SPEC`), so its peak memory is that process's
own (`ru_maxrss` on CPU, `torch.cuda.max_memory_allocated` on a GPU) and one out-of-memory death cannot take the
stage down.

- speed: input tokens per second of a training step (forward + backward + optimizer), median of `repeats`
  timed steps after one warmup step, with the spread of the repeats (`tokens_per_s_low`/`_high`: slowest and
  fastest step);
- memory: `peak_mb` (whole child process) and `step_mb` (peak minus the resident size after building the model
  and optimizer: what the step itself needs, mostly activations);
- lengths go from the shortest up; a variant stops at the first length it cannot run (failure, or a predicted
  peak above `max_memory_gb` by quadratic extrapolation from the last length); the length sweep starts nothing
  after 75% of `time_budget_s`, the depth sweep nothing after all of it;
- the first variant of `models:` is the reference; another variant's crossover length is the shortest measured
  length from which on it is faster (or uses less memory) than the reference at every longer measured length,
  or runs where the reference could not; `null` when it never does. `crossovers` adds its uncertainty: the
  crossover counting only lengths where the spreads of the repeats do not overlap (`certain`) and counting
  every length where the other's best repeat wins (`possible`); memory figures must also differ by more than
  `memory_resolution` (16 MiB or 20%: separate runs of the stage disagree by that much), with a sentence for
  the report; `dropped` lists every measurement the time budget or the memory limit left out.

Outputs: `artifacts/benchmark/results.json` (every measurement), `results.csv`, `length.csv` and `depth.csv`
(DVC plots data, one column per variant), `speed_vs_length.png`, `memory_vs_length.png`, `memory_vs_depth.png`,
and the DVC metrics `metrics/benchmark.json` (crossovers and per-length ratios against the reference,
parameter counts).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.common import atomic_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config
from pipeline.console import progress_bar, quiet_libraries

log = logging.getLogger("pipeline.benchmark")

OUT_DIR = Path("artifacts/benchmark")
METRICS = Path("metrics/benchmark.json")
CHILD_TIMEOUT_S = 300.0
LENGTH_SHARE = 0.75  # share of benchmark.time_budget_s the length sweep may start measurements in


# ------------------------------------------------------------------------------------------ child side


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; falls back to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model in `spec`, run warmup + timed training steps; returns timing and memory figures."""
    import torch
    import torch.nn.functional as F

    from models import build_model

    torch.manual_seed(spec.get("seed", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(spec["family"], spec["config"]).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, L, T, V = spec["batch_size"], spec["input_len"], spec["target_len"], model.config.vocab_size
    inputs = torch.randint(3, V, (B, L), device=device)
    targets = torch.randint(3, V, (B, T), device=device)
    decoder_inputs = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(inputs, decoder_input_ids=decoder_inputs)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    base_mb = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    step()  # warmup: allocates optimizer states, fills caches
    times = [step() for _ in range(spec["repeats"])]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    seconds = statistics.median(times)
    return {
        "step_s": seconds,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "repeats": len(times),
        "tokens_per_s": B * L / seconds,
        # the spread of the repeats: slowest and fastest step (a busy machine widens it)
        "tokens_per_s_low": B * L / max(times),
        "tokens_per_s_high": B * L / min(times),
        "peak_mb": peak_mb,
        "step_mb": max(peak_mb - base_mb, 0.0),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- parent side


def model_config(
    cfg: Config, variant: str, vocab_size: int, num_layers: int | None = None, length: int = 0
) -> dict[str, Any]:
    """The variant's config as a dict (encoder-decoder, no dropout), sized by its family's spec to `num_layers`
    layers per stack (None: as configured) and `length` positions."""
    from models import spec

    config = cfg.model_config(variant, vocab_size)
    config = type(config).from_dict({**config.to_dict(), "layout": "encoder_decoder", "dropout_rate": 0.0})
    return spec(cfg.family(variant)).benchmark_config(config, num_layers, length).to_dict()


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, dict[str, int]]:
    """Total and non-embedding parameters of each variant (the matched-size check)."""
    from models import build_model

    counts = {}
    for variant in cfg.models:
        model = build_model(cfg.family(variant), model_config(cfg, variant, vocab_size))
        counts[variant] = {"total": model.num_parameters(), "non_embedding": model.num_parameters(non_embedding=True)}
    return counts


def _child_main(spec: dict[str, Any], conn: Any) -> None:
    try:
        conn.send(measure_step(spec))
    except Exception as exc:  # reported, not raised: the parent records the failure and moves on
        conn.send({"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    finally:
        conn.close()


def run_child(spec: dict[str, Any], timeout_s: float = CHILD_TIMEOUT_S) -> dict[str, Any]:
    """Run `measure_step(spec)` in a fresh child process; returns its result or `{"error": ...}`.

    Children are forked from a `forkserver` that has already imported torch and the models, so a measurement
    does not pay the import again; each child still has its own memory, hence its own peak (`ru_maxrss`).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "models"])
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(spec, send), daemon=True)
    proc.start()
    send.close()
    result: dict[str, Any] | None = None
    if receive.poll(timeout_s):
        try:
            result = receive.recv()
        except EOFError:  # died before answering
            result = None
    proc.join(5 if result is not None else 0.1)
    if proc.is_alive():
        proc.kill()
        proc.join()
        if result is None:
            return {"error": f"timed out after {timeout_s:.0f} s"}
    if result is None:
        code = proc.exitcode
        reason = "killed (out of memory?)" if code is not None and code < 0 else f"exit {code}"
        return {"error": f"measurement process died: {reason}"}
    return result


MEMORY_RESOLUTION = (16.0, 0.2)  # MiB, share of the reference: step memory differences below count as no difference


def memory_resolution(reference_mb: float) -> float:
    """How far apart two step-memory figures must be to differ. Repeats in one process agree to the MiB, but the
    same model and length measured 111, 118 and 127 MiB in three runs of the stage (T5 tiny at 512 tokens), so the
    spread of the repeats alone would call a crossover certain that the next run reverses."""
    floor, share = MEMORY_RESOLUTION
    return max(floor, share * reference_mb)


def crossover(
    lengths: list[int], reference: dict[int, float | None], other: dict[int, float | None], better
) -> int | None:
    """Shortest length from which `other` wins against `reference` at every longer measured length.

    `reference[L]`/`other[L]` are the figures, None where that variant did not fit, the key absent where L was
    not measured (time budget); `better(o, r)` says whether the other's figure beats the reference's. A length
    where only the other fit counts as a win, one where only the reference fit as a loss; lengths not measured
    for both are ignored.
    """
    wins: list[tuple[int, bool]] = []
    for n in sorted(lengths):
        if n not in reference or n not in other or (reference[n] is None and other[n] is None):
            continue
        o, r = other[n], reference[n]
        wins.append((n, o is not None and (r is None or better(o, r))))
    answer = None
    for n, won in reversed(wins):
        if not won:
            break
        answer = n
    return answer


def crossover_sentence(
    variant: str, reference: str, what: str, certain: int | None, possible: int | None, compared: list[int]
) -> str:
    """The crossover in words, with its uncertainty: `certain` counts a length only where the spreads of the
    repeats do not overlap, `possible` wherever the other variant's best repeat wins."""
    verb = "trains faster than" if what == "speed" else "needs less memory than"
    scope = f"lengths measured for both: {', '.join(map(str, compared))}"
    if not compared:
        return f"{what}: {variant} versus {reference} not measured (no length measured for both within the time budget)"
    if certain == possible:
        if certain is None:
            return f"{what}: {variant} never {verb} {reference} ({scope})"
        if certain == min(compared):
            return f"{what}: {variant} {verb} {reference} at every length measured ({scope})"
        return (
            f"{what}: {variant} {verb} {reference} from length **{certain}** on ({scope}; the repeats do not overlap)"
        )
    if certain is None:
        return (
            f"{what}: uncertain: {variant} may cross {reference} from length {possible} on, but the spread of the "
            f"repeats overlaps: not established in the measured range ({scope})"
        )
    near = "repeats overlap" if what == "speed" else "figures differ by less than the resolution"
    return (
        f"{what}: {variant} {verb} {reference} from length **{certain}** on; the crossover may come as early as "
        f"{possible}, where the {near} ({scope})"
    )


def benchmark(cfg: Config, vocab_size: int, child=run_child) -> dict[str, Any]:
    """All measurements of the stage, as a JSON-ready dict (see the module docstring)."""
    b = cfg.benchmark
    start = time.perf_counter()
    budget_left = lambda: b.time_budget_s - (time.perf_counter() - start)  # noqa: E731
    limit_mb = b.max_memory_gb * 1024
    rows: list[dict[str, Any]] = []

    def spec(variant: str, length: int, num_layers: int | None = None) -> dict[str, Any]:
        return {
            "family": cfg.family(variant),
            "config": model_config(cfg, variant, vocab_size, num_layers, length),
            "batch_size": b.batch_size,
            "input_len": length,
            "target_len": max(length // 4, 1),
            "repeats": b.repeats,
            "seed": cfg.seed,
        }

    lengths = sorted(set(b.seq_lengths))
    stopped: dict[str, str] = {}
    bar = progress_bar((len(lengths) + len(set(b.depths))) * len(cfg.models), "benchmark")
    for length in lengths:
        for variant in cfg.models:
            row = {"kind": "length", "variant": variant, "seq_length": length, "num_layers": None}
            previous = [r for r in rows if r["variant"] == variant and r["kind"] == "length" and "peak_mb" in r]
            if variant in stopped:
                row["skipped"] = stopped[variant]
            elif budget_left() <= (1 - LENGTH_SHARE) * b.time_budget_s:  # the rest is kept for the depth sweep
                row["skipped"] = f"time budget of {b.time_budget_s:.0f} s used"
            elif previous and previous[-1]["peak_mb"] * (length / previous[-1]["seq_length"]) ** 2 > limit_mb:
                predicted = previous[-1]["peak_mb"] * (length / previous[-1]["seq_length"]) ** 2
                row["skipped"] = f"predicted peak {predicted:.0f} MiB > max_memory_gb {b.max_memory_gb}"
            else:
                row.update(child(spec(variant, length), max(min(budget_left() + 60, CHILD_TIMEOUT_S), 30)))
            if "error" in row or ("skipped" in row and "budget" not in row["skipped"]):
                stopped.setdefault(variant, f"does not fit: stopped at {length}")
            log.info("benchmark %s", _describe(row))
            rows.append(row)
            bar.update(1)
    for num_layers in sorted(set(b.depths)):
        for variant in cfg.models:
            row = {"kind": "depth", "variant": variant, "seq_length": b.depth_seq_length, "num_layers": num_layers}
            if budget_left() <= 0:
                row["skipped"] = f"time budget of {b.time_budget_s:.0f} s used"
            else:
                row.update(child(spec(variant, b.depth_seq_length, num_layers), max(budget_left() + 60, 30)))
            log.info("benchmark %s", _describe(row))
            rows.append(row)
            bar.update(1)
    bar.close()
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def _describe(row: dict[str, Any]) -> str:
    what = f"{row['variant']:>8} L={row['seq_length']}" + (f" layers={row['num_layers']}" if row["num_layers"] else "")
    if "tokens_per_s" in row:
        return f"{what}: {row['tokens_per_s']:.0f} tok/s, peak {row['peak_mb']:.0f} MiB, step {row['step_mb']:.0f} MiB"
    return f"{what}: {row.get('error') or row.get('skipped')}"


def summarize(result: dict[str, Any], counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """DVC metrics: per-length figures, crossovers and ratios against the reference (first) variant, parameters.

    `counts` lists the variants in params order (see `parameter_counts`); the first is the reference.
    """
    variants = list(counts)
    ref = variants[0]
    by = {(r["variant"], r["kind"], r["seq_length"], r["num_layers"]): r for r in result["rows"]}
    lengths = sorted({r["seq_length"] for r in result["rows"] if r["kind"] == "length"})

    def figures(variant: str, key: str) -> dict[int, float | None]:
        """Measured lengths -> figure; None where the variant did not fit; lengths cut by the budget left out."""
        out = {}
        for n in lengths:
            row = by.get((variant, "length", n, None), {})
            if key in row or "error" in row or ("skipped" in row and "budget" not in row["skipped"]):
                out[n] = row.get(key)
        return out

    speed = {v: figures(v, "tokens_per_s") for v in variants}
    memory = {v: figures(v, "step_mb") for v in variants}

    def spread(variant: str, key: str) -> dict[int, tuple[float, float, float] | None]:
        """Like `figures`, as (median, low, high) of the repeats (low = high = median without a spread)."""
        out: dict[int, tuple[float, float, float] | None] = {}
        for n, value in figures(variant, key).items():
            row = by.get((variant, "length", n, None), {})
            out[n] = None if value is None else (value, row.get(f"{key}_low", value), row.get(f"{key}_high", value))
        return out

    crossovers = []
    for key, what, faster in (("tokens_per_s", "speed", True), ("step_mb", "memory", False)):
        ref_fig = spread(ref, key)
        for v in variants[1:]:
            fig = spread(v, key)
            # certain: the other's worst repeat beats the reference's best; possible: its best beats their worst
            if faster:
                certain = crossover(lengths, ref_fig, fig, lambda o, r: o[1] > r[2])
                possible = crossover(lengths, ref_fig, fig, lambda o, r: o[2] > r[1])
            else:  # the repeats of one process agree to the MiB; separate processes do not (`MEMORY_RESOLUTION`)
                certain = crossover(lengths, ref_fig, fig, lambda o, r: o[2] + memory_resolution(r[1]) < r[1])
                possible = crossover(lengths, ref_fig, fig, lambda o, r: o[1] < r[2] + memory_resolution(r[2]))
            compared = [n for n in lengths if n in ref_fig and n in fig]
            crossovers.append(
                {"variant": v, "reference": ref, "what": what, "certain": certain, "possible": possible,
                 "compared": compared, "sentence": crossover_sentence(v, ref, what, certain, possible, compared)}
            )  # fmt: skip
    dropped = [
        f"{r['variant']} at {r['seq_length']}" + (f" x {r['num_layers']} layers" if r["num_layers"] else "")
        + f": {r.get('error') or r.get('skipped')}"
        for r in result["rows"] if "error" in r or "skipped" in r
    ]  # fmt: skip
    per_length = {}
    for n in lengths:
        entry: dict[str, Any] = {}
        for v in variants:
            entry[f"{v}_tokens_per_s"] = _round(speed[v].get(n))
            entry[f"{v}_step_mb"] = _round(memory[v].get(n))
        for v in variants[1:]:
            if speed[ref].get(n) and speed[v].get(n):
                entry[f"speed_ratio_{v}_over_{ref}"] = _round(speed[v][n] / speed[ref][n], 3)
            if memory[ref].get(n) and memory[v].get(n):
                entry[f"memory_ratio_{v}_over_{ref}"] = _round(memory[v][n] / memory[ref][n], 3)
        per_length[str(n)] = entry
    return {
        "reference": ref,
        "speed_crossover_length": {
            v: crossover(lengths, speed[ref], speed[v], lambda o, r: o > r) for v in variants[1:]
        },
        "memory_crossover_length": {
            v: crossover(lengths, memory[ref], memory[v], lambda o, r: o < r) for v in variants[1:]
        },
        "crossovers": crossovers,
        "dropped": dropped,
        "longest_length": {v: max((n for n in lengths if speed[v].get(n)), default=None) for v in variants},
        "compared_lengths": {v: [n for n in lengths if n in speed[ref] and n in speed[v]] for v in variants[1:]},
        "per_length": per_length,
        "parameters": counts,
        "non_embedding_ratio_over_reference": {
            v: round(counts[v]["non_embedding"] / counts[ref]["non_embedding"], 3) for v in variants[1:]
        },
        "seconds": result["seconds"],
    }


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def write_tables(result: dict[str, Any], out: Path) -> None:
    """`results.csv` (one row per measurement, every field), `length.csv` and `depth.csv`: what `dvc plots show`
    draws, one row per (variant, length or depth) with `variant` a column, so the `variants` template
    (`.dvc/plots/variants.json`) draws one line per variant, whatever the variants are called."""
    fields = ["kind", "variant", "seq_length", "num_layers", "tokens_per_s", "step_s", "peak_mb", "step_mb", "note"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({**r, "note": r.get("error") or r.get("skipped") or ""})
    (out / "results.csv").write_text(buf.getvalue(), encoding="utf-8")
    for kind, axis in (("length", "seq_length"), ("depth", "num_layers")):
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([axis, "variant", "tokens_per_s", "step_mb"])
        measured = [r for r in result["rows"] if r["kind"] == kind and r.get("tokens_per_s") is not None]
        for r in sorted(measured, key=lambda r: (r["variant"], r[axis])):
            writer.writerow([r[axis], r["variant"], _fmt(r.get("tokens_per_s")), _fmt(r.get("step_mb"))])
        (out / f"{kind}.csv").write_text(buf.getvalue(), encoding="utf-8")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def write_plots(result: dict[str, Any], out: Path, variants: list[str]) -> None:
    """The three PNG charts, drawn by `pipeline.charts.benchmark_chart` (the report draws the same ones, with the
    same colour per variant: the params' order)."""
    from pipeline.report.charts import BENCHMARK_CHARTS, benchmark_chart, colors

    for name in BENCHMARK_CHARTS:
        benchmark_chart(result["rows"], name, out / name, colors(variants))


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    root = repo_root()
    vocab_size = -(-cfg.tokenizer.vocab_size // 128) * 128  # params only: the stage does not depend on data
    counts = parameter_counts(cfg, vocab_size)
    result = benchmark(cfg, vocab_size)
    result["parameters"] = counts
    result["vocab_size"] = vocab_size
    metrics = summarize(result, counts)
    result["summary"] = metrics
    with atomic_output(root / OUT_DIR) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_tables(result, tmp)
        write_plots(result, tmp, list(cfg.models))
    write_json(root / METRICS, metrics)
    log.info(
        "benchmark done in %.0f s: speed crossover vs %s %s, memory crossover %s",
        result["seconds"], metrics["reference"], metrics["speed_crossover_length"], metrics["memory_crossover_length"],
    )  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Speed and memory of every variant versus sequence length and depth."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
