"""Where every stage reads and writes: one place for the layout of `artifacts/` and `metrics/`.

A training or evaluation run is identified by its stage, its model variant (a key of `models:` in
`params.yaml`) and its seed (an entry of `seeds:`); `dvc.yaml` spells the same paths with `${item.model}` and
`${item.seed}`, and `tests/test_variants.py` checks the two agree.

    artifacts/<stage>/<variant>/<seed>/final/         consolidated weights + config.json (+ training.json)
    artifacts/<stage>/<variant>/<seed>/checkpoints/   resumable Lightning checkpoints + run.json
    artifacts/eval/<variant>/<seed>/                  evaluation outputs (samples, confusion matrices)
    metrics/<stage>/<variant>-<seed>.json             DVC metrics of one run
    metrics/<stage>/<variant>-<seed>-train.csv        loss history (training steps); `-val.csv`: validations
    metrics/<name>.json                               stage-level metrics (prepare, tokenize, benchmark, compare)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = "artifacts"
METRICS = "metrics"
EVAL_DIR = "eval"  # artifacts/eval/...: the evaluate stage's output folder keeps its short name


def run_label(variant: str, seed: int) -> str:
    """`<variant>-<seed>`: the DVC matrix suffix (`pretrain@t5-0`) and the file stem of a run's metrics."""
    return f"{variant}-{seed}"


def stage_metrics(root: Path, name: str) -> Path:
    """`metrics/<name>.json` of a stage that runs once (prepare, tokenize, benchmark, compare)."""
    return root / METRICS / f"{name}.json"


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
        """Resumable checkpoints of a training run (never cached by DVC)."""
        return self.out / "checkpoints"

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
