"""Pretraining stage: `python -m pipeline.pretrain --model <variant> --seed <seed>`.

Outputs: see `pipeline/training/train.py`.

Trains a freshly initialised model of the variant on the tokenized corpus with the `pretrain.objective`
(T5 span corruption by default), under the distribution strategy and launcher chosen in params.
"""

from __future__ import annotations

from pipeline.training.entry import training_stage


def main(argv: list[str] | None = None) -> int:
    return training_stage("pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
