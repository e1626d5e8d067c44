"""Fine-tuning stage: `python -m pipeline.finetune --model <variant> --seed <seed>`.

Outputs: see `pipeline/training/train.py`.

Starts from the variant's pretrain output of the same seed (or from scratch, or from an original checkpoint of
the family: `finetune.init`) and trains on the text-to-text task mixture of `finetune.tasks` with
`finetune.mixing` rates.
"""

from __future__ import annotations

from pipeline.training.entry import training_stage


def main(argv: list[str] | None = None) -> int:
    return training_stage("finetune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
