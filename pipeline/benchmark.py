"""Stage `benchmark`: training-step speed and peak memory of both families versus sequence length and depth.

Both families are built from their `params.yaml` presets (matched by non-embedding parameter count) in the
encoder-decoder layout the pipeline trains, and run one AdamW training step on random tokens: `L` input tokens
and `L / 4` target tokens (the ratio span corruption produces). Every measurement runs in its own child process
(`python -m pipeline.benchmark --child SPEC`), so its peak memory is that process's own (`ru_maxrss` on CPU,
`torch.cuda.max_memory_allocated` on a GPU) and one out-of-memory death cannot take the stage down.

- speed: input tokens per second of a training step (forward + backward + optimizer), median of `repeats`
  timed steps after one warmup step;
- memory: `peak_mb` (whole child process) and `step_mb` (peak minus the resident size after building the model
  and optimizer: what the step itself needs, mostly activations);
- lengths go from the shortest up; a family stops at the first length it cannot run (failure, or a predicted
  peak above `max_memory_gb` by quadratic extrapolation from the last length); the length sweep starts nothing
  after 75% of `time_budget_s`, the depth sweep nothing after all of it;
- the crossover length is the shortest measured length from which on the Reformer is faster (or uses less
  memory) than T5 at every longer measured length, or runs where T5 could not; `null` when it never does.

Outputs: `artifacts/benchmark/results.json` (every measurement), `results.csv`, `length.csv` and `depth.csv`
(DVC plots data, one column per family), `speed_vs_length.png`, `memory_vs_length.png`, `memory_vs_depth.png`,
and the DVC metrics `metrics/benchmark.json` (crossovers, per-length ratios, parameter counts).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.common import atomic_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import FAMILIES, Config

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
        "tokens_per_s": B * L / seconds,
        "peak_mb": peak_mb,
        "step_mb": max(peak_mb - base_mb, 0.0),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------- parent side


def model_config(
    cfg: Config, family: str, vocab_size: int, num_layers: int | None = None, length: int = 0
) -> dict[str, Any]:
    """The family's config as a dict (encoder-decoder), optionally with `num_layers` layers per stack, able to
    take `length` positions."""
    overrides: dict[str, Any] = {"vocab_size": vocab_size, "layout": "encoder_decoder", "dropout_rate": 0.0}
    base = cfg.model_config(family, vocab_size)
    if num_layers is not None:
        if family == "reformer":  # repeat the preset's attention pattern (local, lsh, ...) to the depth asked
            pattern = list(base.attn_layers)
            overrides["attn_layers"] = [pattern[i % len(pattern)] for i in range(num_layers)]
            overrides["encoder_attn_layers"] = None
        else:
            overrides["num_layers"] = num_layers
            overrides["num_decoder_layers"] = None
    # position tables grow to hold `length` positions (position embeddings are not non-embedding parameters)
    if family == "reformer" and base.axial_pos_shape and math.prod(base.axial_pos_shape) < length:
        overrides["axial_pos_shape"] = [-(-length // base.axial_pos_shape[1]), base.axial_pos_shape[1]]
    elif family == "reformer" and not base.axial_pos_shape and base.max_position_embeddings < length:
        overrides["max_position_embeddings"] = length
    section = cfg.models[family]
    from models import config_class

    return config_class(family).from_preset(section.preset, **{**section.overrides, **overrides}).to_dict()


def parameter_counts(cfg: Config, vocab_size: int) -> dict[str, dict[str, int]]:
    """Total and non-embedding parameters of each family's preset (the matched-size check)."""
    from models import build_model

    counts = {}
    for family in FAMILIES:
        model = build_model(family, model_config(cfg, family, vocab_size))
        counts[family] = {"total": model.num_parameters(), "non_embedding": model.num_parameters(non_embedding=True)}
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


def crossover(lengths: list[int], t5: dict[int, float | None], reformer: dict[int, float | None], better) -> int | None:
    """Shortest length from which the Reformer wins at every longer measured length.

    `t5[L]`/`reformer[L]` are the figures, None where that family did not fit, the key absent where L was not
    measured (time budget); `better(r, t)` says whether the Reformer's figure beats T5's. A length where only
    the Reformer fit counts as a win, one where only T5 fit as a loss; lengths not measured for both are ignored.
    """
    wins: list[tuple[int, bool]] = []
    for n in sorted(lengths):
        if n not in t5 or n not in reformer or (t5[n] is None and reformer[n] is None):
            continue
        r, t = reformer[n], t5[n]
        wins.append((n, r is not None and (t is None or better(r, t))))
    answer = None
    for n, won in reversed(wins):
        if not won:
            break
        answer = n
    return answer


def benchmark(cfg: Config, vocab_size: int, child=run_child) -> dict[str, Any]:
    """All measurements of the stage, as a JSON-ready dict (see the module docstring)."""
    b = cfg.benchmark
    start = time.perf_counter()
    budget_left = lambda: b.time_budget_s - (time.perf_counter() - start)  # noqa: E731
    limit_mb = b.max_memory_gb * 1024
    rows: list[dict[str, Any]] = []

    def spec(family: str, length: int, num_layers: int | None = None) -> dict[str, Any]:
        return {
            "family": family,
            "config": model_config(cfg, family, vocab_size, num_layers, length),
            "batch_size": b.batch_size,
            "input_len": length,
            "target_len": max(length // 4, 1),
            "repeats": b.repeats,
            "seed": cfg.seed,
        }

    lengths = sorted(set(b.seq_lengths))
    stopped: dict[str, str] = {}
    for length in lengths:
        for family in FAMILIES:
            row = {"kind": "length", "family": family, "seq_length": length, "num_layers": None}
            previous = [r for r in rows if r["family"] == family and r["kind"] == "length" and "peak_mb" in r]
            if family in stopped:
                row["skipped"] = stopped[family]
            elif budget_left() <= (1 - LENGTH_SHARE) * b.time_budget_s:  # the rest is kept for the depth sweep
                row["skipped"] = f"time budget of {b.time_budget_s:.0f} s used"
            elif previous and previous[-1]["peak_mb"] * (length / previous[-1]["seq_length"]) ** 2 > limit_mb:
                predicted = previous[-1]["peak_mb"] * (length / previous[-1]["seq_length"]) ** 2
                row["skipped"] = f"predicted peak {predicted:.0f} MiB > max_memory_gb {b.max_memory_gb}"
            else:
                row.update(child(spec(family, length), max(min(budget_left() + 60, CHILD_TIMEOUT_S), 30)))
            if "error" in row or ("skipped" in row and "budget" not in row["skipped"]):
                stopped.setdefault(family, f"does not fit: stopped at {length}")
            log.info("benchmark %s", _describe(row))
            rows.append(row)
    for num_layers in sorted(set(b.depths)):
        for family in FAMILIES:
            row = {"kind": "depth", "family": family, "seq_length": b.depth_seq_length, "num_layers": num_layers}
            if budget_left() <= 0:
                row["skipped"] = f"time budget of {b.time_budget_s:.0f} s used"
            else:
                row.update(child(spec(family, b.depth_seq_length, num_layers), max(budget_left() + 60, 30)))
            log.info("benchmark %s", _describe(row))
            rows.append(row)
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def _describe(row: dict[str, Any]) -> str:
    what = f"{row['family']:>8} L={row['seq_length']}" + (f" layers={row['num_layers']}" if row["num_layers"] else "")
    if "tokens_per_s" in row:
        return f"{what}: {row['tokens_per_s']:.0f} tok/s, peak {row['peak_mb']:.0f} MiB, step {row['step_mb']:.0f} MiB"
    return f"{what}: {row.get('error') or row.get('skipped')}"


def summarize(result: dict[str, Any], counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """DVC metrics: crossovers, per-length Reformer/T5 ratios, parameter counts."""
    by = {(r["family"], r["kind"], r["seq_length"], r["num_layers"]): r for r in result["rows"]}
    lengths = sorted({r["seq_length"] for r in result["rows"] if r["kind"] == "length"})

    def figures(family: str, key: str) -> dict[int, float | None]:
        """Measured lengths -> figure; None where the family did not fit; lengths cut by the budget left out."""
        out = {}
        for n in lengths:
            row = by.get((family, "length", n, None), {})
            if key in row or "error" in row or ("skipped" in row and "budget" not in row["skipped"]):
                out[n] = row.get(key)
        return out

    speed = {f: figures(f, "tokens_per_s") for f in FAMILIES}
    memory = {f: figures(f, "step_mb") for f in FAMILIES}
    per_length = {}
    for n in lengths:
        entry: dict[str, Any] = {}
        for f in FAMILIES:
            entry[f"{f}_tokens_per_s"] = _round(speed[f].get(n))
            entry[f"{f}_step_mb"] = _round(memory[f].get(n))
        if speed["t5"].get(n) and speed["reformer"].get(n):
            entry["speed_ratio_reformer_over_t5"] = _round(speed["reformer"][n] / speed["t5"][n], 3)
        if memory["t5"].get(n) and memory["reformer"].get(n):
            entry["memory_ratio_reformer_over_t5"] = _round(memory["reformer"][n] / memory["t5"][n], 3)
        per_length[str(n)] = entry
    longest = {f: max((n for n in lengths if speed[f].get(n)), default=None) for f in FAMILIES}
    compared = [n for n in lengths if n in speed["t5"] and n in speed["reformer"]]
    t5_ne, ref_ne = counts["t5"]["non_embedding"], counts["reformer"]["non_embedding"]
    return {
        "speed_crossover_length": crossover(lengths, speed["t5"], speed["reformer"], lambda r, t: r > t),
        "memory_crossover_length": crossover(lengths, memory["t5"], memory["reformer"], lambda r, t: r < t),
        "longest_length": longest,
        "compared_lengths": compared,
        "per_length": per_length,
        "parameters": counts,
        "non_embedding_ratio_reformer_over_t5": round(ref_ne / t5_ne, 3),
        "seconds": result["seconds"],
    }


def _round(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def write_tables(result: dict[str, Any], out: Path) -> None:
    """`results.csv` (one row per measurement), `length.csv` and `depth.csv` (one column per family)."""
    fields = ["kind", "family", "seq_length", "num_layers", "tokens_per_s", "step_s", "peak_mb", "step_mb", "note"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({**r, "note": r.get("error") or r.get("skipped") or ""})
    (out / "results.csv").write_text(buf.getvalue(), encoding="utf-8")
    for kind, axis in (("length", "seq_length"), ("depth", "num_layers")):
        keys = sorted({r[axis] for r in result["rows"] if r["kind"] == kind})
        cols = [f"{f}_{m}" for f in FAMILIES for m in ("tokens_per_s", "step_mb")]
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([axis, *cols])
        for k in keys:
            line = [k]
            for f in FAMILIES:
                row = next((r for r in result["rows"] if r["kind"] == kind and r["family"] == f and r[axis] == k), {})
                line += [_fmt(row.get("tokens_per_s")), _fmt(row.get("step_mb"))]
            writer.writerow(line)
        (out / f"{kind}.csv").write_text(buf.getvalue(), encoding="utf-8")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def write_plots(result: dict[str, Any], out: Path) -> None:
    """The three PNG charts (log-log axes for length: quadratic versus linear growth shows as slopes 2 and 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [
        ("speed_vs_length.png", "length", "seq_length", "tokens_per_s", "training tokens/s", "Speed vs length"),
        ("memory_vs_length.png", "length", "seq_length", "step_mb", "step memory (MiB)", "Memory vs length"),
        ("memory_vs_depth.png", "depth", "num_layers", "step_mb", "step memory (MiB)", "Memory vs depth"),
    ]
    for name, kind, axis, key, ylabel, title in charts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for family, marker in zip(FAMILIES, "os", strict=False):
            pts = sorted(
                (r[axis], r[key]) for r in result["rows"] if r["kind"] == kind and r["family"] == family and key in r
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=family)
        if kind == "length":
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            depth_note = ""
        else:
            depth_note = f" (length {result['rows'][-1]['seq_length']})"
        ax.set_xlabel("sequence length (input tokens)" if kind == "length" else "layers per stack")
        ax.set_ylabel(ylabel)
        ax.set_title(title + depth_note)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
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
        write_plots(result, tmp)
    write_json(root / METRICS, metrics)
    log.info(
        "benchmark done in %.0f s: speed crossover %s, memory crossover %s",
        result["seconds"], metrics["speed_crossover_length"], metrics["memory_crossover_length"],
    )  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Speed and memory of both families versus sequence length and depth."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
