"""Timing helpers shared by the benchmark scripts: alternated calls, median and spread, the load average.

On a shared machine the load changes during a run; calling ours and the reference in turn (ours, reference,
ours, ...) exposes both to the same load, and the median with its spread says how much to trust a ratio.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions called in turn; `warmup` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def spread(times: list[float]) -> str:
    """'median [min-max]' in seconds."""
    return f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages and the core count, for the record beside every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
