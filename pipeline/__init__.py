"""The pipeline's stages (`python -m pipeline.<stage>`); see README.md.

Importing the package chooses how torch's OpenMP threads wait between parallel regions, before torch loads its
OpenMP runtime (libgomp reads the environment once, at load). A tiny model's training step is thousands of small
operations, so the wait decides the step time:
- the CPUs this process may use are idle (sampled over 0.1 s from /proc/stat when the package is imported):
  `GOMP_SPINCOUNT=10000`, a short spin before sleeping, so the threads catch the next operation awake. A
  tiny-T5 training step at 2 threads took 176-178 ms against 325-473 ms passive at load 1.2;
- other processes keep at least half a core busy: `OMP_WAIT_POLICY=PASSIVE`, sleep at once. On a shared machine
  the spinning threads of one process take the cores the others' threads need: the same step took 1.8-2.0 s
  with the runtime's default (a long spin) and 0.78-0.80 s passive at load average 6 on 2 cores, and 1.5 s with
  the short spin against 0.6 s passive at load 2.5.
A stage is one process and decides once, at its start. `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` set in the
environment win (`OMP_WAIT_POLICY=ACTIVE` spins always). `openmp_wait()` says which was chosen.
"""

import os
import time

SPIN_COUNT = "10000"  # libgomp spins: about 0.1 ms on these machines, longer than the gap between two operations
BUSY_CORES = 0.5  # cores kept busy by other processes from which threads sleep at once


def busy_cores(interval: float = 0.1) -> float | None:
    """Cores of this machine kept busy by any process over `interval` seconds (we sleep meanwhile), from
    /proc/stat; None where it cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total (without guest time, counted in user), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def _choose_openmp_wait() -> None:
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    busy = busy_cores()
    if busy is not None and busy < BUSY_CORES:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def openmp_wait() -> str:
    """How OpenMP threads wait in this process, for the run's record: `spin <count>`, `passive`, `active`..."""
    if "GOMP_SPINCOUNT" in os.environ:
        return f"spin {os.environ['GOMP_SPINCOUNT']}"
    return os.environ.get("OMP_WAIT_POLICY", "default").lower()


_choose_openmp_wait()
