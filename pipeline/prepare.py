"""`prepare` stage: read the corpus named in params, clean and split it, save it with its stats.

Outputs: `data/prepared/` (a `datasets.DatasetDict` with `train`, `validation`, `test`, column `text`, plus
`stats.json`) and `metrics/prepare.json` (documents, characters and words per split; documents dropped).
Documents stream from the source through cleaning into Arrow files, so memory does not grow with the corpus.
Everything is written into temporary siblings and swapped into place at the end, so a failed run leaves the
previous outputs intact; temporaries left by a killed run are removed by the next one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil

from pipeline.common import atomic_output, recover_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config
from pipeline.data.corpus import preset_mismatches, write_prepared

log = logging.getLogger("pipeline.prepare")

PREPARED_DIR = "data/prepared"
METRICS_FILE = "metrics/prepare.json"


def body(cfg: Config, args: argparse.Namespace) -> None:
    import datasets

    datasets.disable_progress_bars()
    root = repo_root()
    target = root / PREPARED_DIR
    recover_output(target)
    with atomic_output(target) as tmp:
        scratch = tmp / ".scratch"  # the cleaned documents' Arrow file, removed before the swap
        scratch.mkdir(parents=True)
        metrics = write_prepared(cfg.data, cfg.seed, root, tmp, scratch)
        shutil.rmtree(scratch)
        stats = {"source": cfg.data.source, **metrics}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_json(root / METRICS_FILE, metrics)
    log.info(
        "prepared %d documents from %r: %s (%d too short, %d duplicates, %d files skipped)",
        metrics["documents_kept"],
        cfg.data.source,
        ", ".join(f"{name} {metrics[name]['documents']}" for name in ("train", "validation", "test")),
        metrics["too_short"],
        metrics["duplicates_removed"],
        metrics["skipped_files"],
    )
    preset = getattr(cfg.data, "preset", None)
    if cfg.data.source == "preset" and preset:
        current = {
            "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
            "tokenizer.num_sentinels": cfg.tokenizer.num_sentinels,
            "pretrain.input_length": cfg.pretrain.input_length,
            "pretrain.batch_size": cfg.pretrain.batch_size,
            "pretrain.max_steps": cfg.pretrain.max_steps,
        }
        differ = preset_mismatches(preset, current)
        if differ:
            log.info("data preset %s: Raffel et al. 2020 use %s (set in params.yaml)", preset, ", ".join(differ))


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Read, clean and split the corpus into data/prepared."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
