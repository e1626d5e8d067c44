"""The command of the training stages, `python -m pipeline.pretrain|finetune --model V --seed S`.

Apart from `pipeline/training/train.py` so that loading and validating the params comes first: the training code imports
torch, Lightning and MLflow (about 15 s on a 2-core machine), and a config error or an unknown variant is
reported in under a second instead. (Not in `pipeline/common.py`: evaluation, comparison and the benchmark use
that module and must not reach the training code, even lazily; `tests/test_stage_exit.py` checks it.)
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.common import RESUMES, require_variant, run_stage, stage_parser


def training_stage(stage: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m pipeline.<stage> --model V --seed S` for the training stages (pretrain, finetune).

    The params are loaded and validated before the training code is imported (`pipeline/training/train.py`: torch,
    Lightning and MLflow, about 15 s on a 2-core machine), so a config error is reported in under a second."""
    parser = stage_parser(
        f"{stage.capitalize()} one model variant with one seed (outputs: pipeline/training/train.py).", per_run=True
    )

    def body(cfg: Any, args: argparse.Namespace) -> None:
        require_variant(cfg, args.model, args.seed)
        from pipeline.training.liveness import watched
        from pipeline.training.train import run_training

        with watched():  # several processes: a lost peer is named, and the ranks agree on the outcome
            run_training(cfg, stage, args.model, args.seed, argv)

    return run_stage(body, parser, argv, rerun=RESUMES)
