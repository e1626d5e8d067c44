"""Where every stage reads and writes: one place for the layout of `artifacts/` and `metrics/`.

A training or evaluation run is identified by its stage, its model variant (a key of `models:` in
`params.yaml`) and its seed (an entry of `seeds:`); `dvc.yaml` spells the same paths with `${item.model}` and
`${item.seed}`, and `tests/test_variants.py` checks the two agree.

    artifacts/<stage>/<variant>/<seed>/final/         consolidated weights + config.json
    artifacts/eval/<variant>/<seed>/                  evaluation outputs (samples, confusion matrices)
    artifacts/timing/<stage>/<variant>-<seed>.json    how the run went on this machine: wall time, throughput,
                                                      MLflow run id, resumed or not (`artifacts/timing/<name>.json`
                                                      for prepare and tokenize)
    metrics/<stage>/<variant>-<seed>.json             DVC metrics of one run
    metrics/<stage>/<variant>-<seed>-train.csv        loss history (training steps); `-val.csv`: validations
    metrics/<name>.json                               stage-level metrics (prepare, tokenize, benchmark, compare)
    checkpoints/<stage>/<variant>/<seed>/             resumable Lightning checkpoints + run.json (not a DVC output)

Same inputs, same bytes: on one machine and software stack, everything under `metrics/` and every output but
`artifacts/timing/` (and the benchmark's and compare's measurements of speed) depends only on the code, the params
and the inputs. Timings are apart so that a re-run, a resumed run and a run beside busy processes write the same
metrics. Checkpoints are not DVC outputs: DVC never sees them, so they cannot make a finished stage look changed
(in the workspace, in `dvc exp run --temp` or in a clone sharing the cache); the stage itself decides from their
`run.json` fingerprint whether to resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = "artifacts"
METRICS = "metrics"
CHECKPOINTS = "checkpoints"
TIMING = "timing"
EVAL_DIR = "eval"  # artifacts/eval/...: the evaluate stage's output folder keeps its short name


def run_label(variant: str, seed: int) -> str:
    """`<variant>-<seed>`: the DVC matrix suffix (`pretrain@t5-0`) and the file stem of a run's metrics."""
    return f"{variant}-{seed}"


def stage_metrics(root: Path, name: str) -> Path:
    """`metrics/<name>.json` of a stage that runs once (prepare, tokenize, benchmark, compare)."""
    return root / METRICS / f"{name}.json"


def stage_timing(root: Path, name: str) -> Path:
    """`artifacts/timing/<name>.json` of a stage that runs once (prepare, tokenize)."""
    return root / ARTIFACTS / TIMING / f"{name}.json"


@dataclass(frozen=True)
class RunPaths:
    """The paths of one (stage, variant, seed) run under the project root `root`."""

    root: Path
    stage: str
    variant: str
    seed: int = 0  # older callers (one seed) leave it out

    @property
    def label(self) -> str:
        """`<variant>-<seed>`."""
        return run_label(self.variant, self.seed)

    @property
    def out(self) -> Path:
        """`artifacts/<stage>/<variant>/<seed>` (`artifacts/eval/...` for the evaluate stage)."""
        folder = EVAL_DIR if self.stage == "evaluate" else self.stage
        return self.root / ARTIFACTS / folder / self.variant / str(self.seed)

    @property
    def final(self) -> Path:
        """Consolidated weights of a training run."""
        return self.out / "final"

    @property
    def checkpoints(self) -> Path:
        """`checkpoints/<stage>/<variant>/<seed>`: resumable checkpoints of a training run (not a DVC output)."""
        return self.root / CHECKPOINTS / self.stage / self.variant / str(self.seed)

    @property
    def timing(self) -> Path:
        """`artifacts/timing/<stage>/<variant>-<seed>.json`: the run's timings (not reproducible, unlike metrics)."""
        return self.root / ARTIFACTS / TIMING / self.stage / f"{self.label}.json"

    @property
    def metrics(self) -> Path:
        """`metrics/<stage>/<variant>-<seed>.json`."""
        return self.root / METRICS / self.stage / f"{self.label}.json"

    def history(self, split: str) -> Path:
        """`metrics/<stage>/<variant>-<seed>-<split>.csv` (`split`: train or val)."""
        return self.root / METRICS / self.stage / f"{self.label}-{split}.csv"

    def dvc_stage(self) -> str:
        """The DVC stage name that produces these paths, e.g. `pretrain@reformer-1`."""
        return f"{self.stage}@{self.label}"
