"""The pipeline's stages (`python -m pipeline.<stage>`); see README.md.

Importing the package sets one process-wide default before torch loads its OpenMP runtime, which reads it once:
`OMP_WAIT_POLICY=PASSIVE` (unless already set), so a thread that waits at the end of a parallel region sleeps
instead of spinning. On a shared machine the spinning threads of one process take the cores the others' threads
need: a tiny-T5 training step at 2 threads took 1.8-2.0 s with the runtime's default and 0.78-0.80 s passive at
load average 6 on 2 cores. Set `OMP_WAIT_POLICY=ACTIVE` in the environment to keep spinning.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
