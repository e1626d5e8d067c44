"""`prepare` stage: read the corpus named in params, clean and split it, save it with its stats.

Outputs: `data/prepared/` (a `datasets.DatasetDict` with `train`, `validation`, `test`, column `text`, plus
`stats.json`) and `metrics/prepare.json` (documents, characters and words per split; documents dropped).
Everything is read and checked before anything is written, and both outputs are replaced atomically, so a
failed run leaves the previous outputs intact.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.common import atomic_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config
from pipeline.data import prepare_corpus, to_dataset_dict

log = logging.getLogger("pipeline.prepare")

PREPARED_DIR = "data/prepared"
METRICS_FILE = "metrics/prepare.json"


def body(cfg: Config, args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_progress_bars()
    root = repo_root()
    splits, metrics = prepare_corpus(cfg.data, cfg.seed, root)
    dataset = to_dataset_dict(splits)
    with atomic_output(root / PREPARED_DIR) as tmp:
        dataset.save_to_disk(str(tmp))
        stats = {"source": cfg.data.source, **metrics}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_json(root / METRICS_FILE, metrics)
    log.info(
        "prepared %d documents from %r: %s (%d too short, %d duplicates, %d files skipped)",
        metrics["documents_kept"],
        cfg.data.source,
        ", ".join(f"{name} {metrics[name]['documents']}" for name in splits),
        metrics["too_short"],
        metrics["duplicates_removed"],
        metrics["skipped_files"],
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Read, clean and split the corpus into data/prepared."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
