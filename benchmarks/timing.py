"""Timing helpers shared by the benchmark scripts: alternated calls, median and spread, per-round ratios, the load.

On a shared machine the load changes during a run; calling ours and the reference in turn (ours, reference,
ours, ...) exposes both to the same load, and the median with its spread says how much to trust a ratio. The ratio
is taken round by round (ours / reference of the same round, both under the same load) and summarised by its
median and range, which is steadier than a ratio of two medians taken from different rounds.

Every script prints `load_average()` when it starts and when it ends, so each figure carries the load it was
measured under.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def alternate_results(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list]:
    """What each function returns, call by call, the functions called in turn; `warmup` rounds are not kept.

    For functions that time themselves (a training loop that leaves out its setup, a child process)."""
    results: dict[str, list] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            value = fn()
            if i >= warmup:
                results[name].append(value)
    return results


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions called in turn; `warmup` rounds are not kept."""

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    return alternate_results({name: timed(fn) for name, fn in fns.items()}, repeats, warmup)


def median(times: list[float]) -> float:
    return statistics.median(times)


def spread(times: list[float], digits: int = 3) -> str:
    """'median [min-max]' (seconds, or whatever the values are)."""
    return f"{statistics.median(times):.{digits}f} [{min(times):.{digits}f}-{max(times):.{digits}f}]"


def ratios(ours: list[float], ref: list[float]) -> list[float]:
    """Round-by-round ours / reference: each pair was measured back to back, under the same load."""
    if len(ours) != len(ref):
        raise ValueError(f"ratios need paired rounds, got {len(ours)} and {len(ref)}")
    return [a / b for a, b in zip(ours, ref, strict=True)]


def ratio_spread(ours: list[float], ref: list[float], digits: int = 3) -> str:
    """'median [min-max]' of the per-round ratios ours / reference."""
    return spread(ratios(ours, ref), digits)


def add_kernel_options(parser) -> None:
    """`--paths`, `--matmul` and `--decoding`: the code our models compute with (params.yaml's `kernels` section, same
    defaults). Child processes inherit them through BENCH_PATHS / BENCH_MATMUL / BENCH_DECODING."""
    parser.add_argument("--paths", default=os.environ.get("BENCH_PATHS", "fast"), choices=["fast", "reference"])
    parser.add_argument("--matmul", default=os.environ.get("BENCH_MATMUL", "auto"), choices=["auto", "blas", "onednn"])
    parser.add_argument("--decoding", default=os.environ.get("BENCH_DECODING", "shaped"), choices=["plain", "shaped"])


def apply_kernel_options(args) -> str:
    """Set our models' CPU kernels from `add_kernel_options`' arguments (and for child processes); returns a line
    for the record: what was asked and what it resolved to on this processor."""
    import models

    os.environ["BENCH_MATMUL"], os.environ["BENCH_DECODING"] = args.matmul, args.decoding
    os.environ["BENCH_PATHS"] = args.paths
    k = models.set_cpu_kernels(args.matmul, args.decoding, args.paths)
    asked = f"matmul {k.matmul} (asked {args.matmul}), decoding {k.decoding}"
    return f"our kernels: paths {k.paths}, {asked}; {models.processor_vendor()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages and the core count, for the record beside every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def table(header: tuple[str, ...] | list[str], rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    """Aligned plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(r) for r in [header, *rows])
