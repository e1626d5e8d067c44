"""What `compare` reads: every file the other stages wrote for each variant and seed (nothing is recomputed).

`metrics/{prepare,tokenize}.json`, `metrics/{pretrain,finetune}/V-S.json` and their `-train.csv`/`-val.csv` loss
histories, `artifacts/timing/<stage>/V-S.json` (wall time, speed), `metrics/evaluate/V-S.json`,
`artifacts/eval/V/S/examples.json` (per-example predictions and scores, the tasks' trivial baselines),
`artifacts/eval/V/S/confusion_<task>.json` and `samples.json`, `metrics/benchmark.json` and
`artifacts/benchmark/results.json`, and `metrics/lengths/V-S.json` with `artifacts/lengths/V/S/examples.json` (runs of
the `lengths` stage that are missing are named in the report, not an error). Paths: `pipeline/config/paths.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.common import read_json as load_json
from pipeline.common import read_numeric_csv
from pipeline.config import Config
from pipeline.config.paths import RunPaths, stage_metrics


def read_json(path: Path, stage: str) -> dict[str, Any]:
    """A JSON file another stage wrote; a `StageError` naming the stage to run when it is missing."""
    return load_json(path, f"run `dvc repro {stage}` first")  # missing or corrupt: a message naming the file


def _optional_json(path: Path) -> Any:
    return load_json(path, "re-run the stage that wrote it, or delete it") if path.is_file() else {}


def gather_run(root: Path, variant: str, seed: int) -> dict[str, Any]:
    """What one (variant, seed) run left behind: stage metrics, timings, loss curves, evaluation outputs."""
    run: dict[str, Any] = {}
    for stage in ("pretrain", "finetune"):
        paths = RunPaths(root, stage, variant, seed)
        run[stage] = read_json(paths.metrics, paths.dvc_stage())
        run[f"{stage}_timing"] = _optional_json(paths.timing)
        fix = f"re-run `dvc repro -f {paths.dvc_stage()}` (it rewrites the loss history)"
        run[f"{stage}_curves"] = {kind: read_numeric_csv(paths.history(kind), fix) for kind in ("train", "val")}
    ev = RunPaths(root, "evaluate", variant, seed)
    run["eval"] = read_json(ev.metrics, ev.dvc_stage())
    run["examples"] = _optional_json(ev.out / "examples.json")
    run["samples"] = _optional_json(ev.out / "samples.json")
    run["confusion"] = {
        path.stem.removeprefix("confusion_"): load_json(path, f"re-run `dvc repro -f {ev.dvc_stage()}`")
        for path in sorted(ev.out.glob("confusion_*.json"))
    }
    return run


def gather(cfg: Config, root: Path) -> dict[str, Any]:
    """Every run of every variant and seed, the stage-level metrics and the benchmark's rows."""
    data: dict[str, Any] = {"seeds": list(cfg.seeds)}
    for name in ("prepare", "tokenize"):
        data[name] = _optional_json(stage_metrics(root, name))
    data["runs"] = {v: {s: gather_run(root, v, s) for s in cfg.seeds} for v in cfg.models}
    data["benchmark"] = read_json(stage_metrics(root, "benchmark"), "benchmark")
    data["benchmark_rows"] = read_json(root / "artifacts" / "benchmark" / "results.json", "benchmark")["rows"]
    data["lengths"] = gather_lengths(root, list(cfg.models), list(cfg.lengths.seeds))
    return data


def gather_lengths(root: Path, variants: list[str], seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """What each `lengths@V-S` run wrote (`metrics/lengths/V-S.json` and its per-example `examples.json`);
    runs that did not run are absent (the report names them)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in variants:
        for seed in seeds:
            paths = RunPaths(root, "lengths", variant, seed)
            if not paths.metrics.is_file():
                continue
            run = merge_timing(read_json(paths.metrics, paths.dvc_stage()), _optional_json(paths.timing))
            run["examples"] = read_json(paths.out / "examples.json", paths.dvc_stage())
            out.setdefault(variant, {})[seed] = run
    return out


def merge_timing(result: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a `lengths` run with its timings (`artifacts/timing/lengths/V-S.json`) put back into each
    length, as the report reads them."""
    merged = {**result, "lengths": {k: dict(v) for k, v in result["lengths"].items()}}
    for length, figures in (timing.get("lengths") or {}).items():
        merged["lengths"].setdefault(length, {}).update(figures)
    if "memory_method" in timing:
        merged["memory_method"] = timing["memory_method"]
    return merged


def sum_confusions(matrices: list[dict[str, Any]]) -> dict[str, Any]:
    """Confusion matrices of one task summed over seeds (labels merged in first-seen order)."""
    labels = list(dict.fromkeys(lab for m in matrices for lab in m["labels"]))
    total = [[0] * len(labels) for _ in labels]
    for m in matrices:
        idx = [labels.index(lab) for lab in m["labels"]]
        for i, row in enumerate(m["matrix"]):
            for j, count in enumerate(row):
                total[idx[i]][idx[j]] += count
    return {"labels": labels, "matrix": total}
