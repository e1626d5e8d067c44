"""Stage `compare`: the verdict with its error bars, `reports/comparison.md` with its plots, and MLflow.

    python -m pipeline.compare

Reads what the other stages wrote for every variant V of `models:` and seed S of `seeds:` (nothing is
recomputed, so the stage takes seconds; paths from `pipeline/paths.py`): `metrics/{prepare,tokenize}.json`,
`metrics/{pretrain,finetune}/V-S.json` and their `-train.csv`/`-val.csv` loss histories,
`artifacts/timing/{pretrain,finetune}/V-S.json` (wall time), `metrics/evaluate/V-S.json`,
`artifacts/eval/V/S/examples.json` (per-example predictions and scores, the tasks' trivial baselines),
`artifacts/eval/V/S/confusion_<task>.json` and `samples.json`, `metrics/benchmark.json` and
`artifacts/benchmark/results.json`, and `metrics/lengths/V-S.json` with `artifacts/lengths/V/S/examples.json`
(runs of the `lengths` stage that are missing are named in the report, not an error).

The statistics (`pipeline/stats.py`):
- every metric of a run is summarised over the seeds: mean and 95% Student-t interval;
- task metrics also vary with the finite test set: their interval is the union of the t-interval over the
  seeds' scores and a two-level bootstrap (seeds, then test examples), the more cautious of the two;
- every difference between two variants is paired: by seed (t over per-seed differences) and, for task metrics,
  by test example (both variants answered the same examples);
- a winner is named only where the interval of the difference excludes zero; with one seed no winner is named
  and no interval shown (the report says so);
- scaling: where a family has two sizes or more (variants of one family, different presets), its final
  pretraining validation loss (mean and interval over seeds) is drawn against training FLOPs (saved by the run, or
  its target tokens times the model's `training_flops` per token, through the models registry), and two families
  are compared at each compute level where both have a size within a factor 2 of FLOPs: one is ahead only where
  the two intervals do not overlap;
- quality versus length at matched compute: at each length of `lengths.seq_lengths` the task's accuracy gets the
  same statistics as a task row (bootstrap over seeds and test examples, paired differences, baselines, collapse),
  beside the efficiency indicators of each variant over the seeds (parameters, FLOPs per token, steps and FLOPs
  in the budget, training seconds, measured tokens/s, peak memory);
- each task row shows its trivial baselines; a variant whose predictions are constant, or whose score is not
  beyond the best baseline with its interval, is flagged collapsed (table, verdict, `metrics/compare.json`) and
  loses every comparison; the test loss is held against the unigram entropy of the targets.

Writes `reports/comparison.md` (rendered from `pipeline/templates/comparison.md.j2`) and its charts
(`pipeline/charts.py`): `loss_curves.png`, `speed_vs_length.png`, `memory_vs_length.png`, `memory_vs_depth.png`,
`confusion_matrices.png`, `scaling_curves.png`, `quality_vs_length.png`; `metrics/compare.json` (means,
intervals, baselines, collapse flags, verdicts, the crossovers, the scaling curves, quality versus length); and one
MLflow run `comparison` (tag stage=compare) whose description is the report and whose artifacts are the report and
the charts.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import atomic_output, publish, read_numeric_csv, repo_root, run_stage, stage_parser
from pipeline.common import read_json as load_json
from pipeline.config import Config
from pipeline.paths import RunPaths, stage_metrics
from pipeline.stats import (
    Collapse,
    Interval,
    Verdict,
    bootstrap_difference,
    bootstrap_interval,
    check_collapse,
    decide,
    difference_interval,
    t_interval,
)

log = logging.getLogger("pipeline.compare")

REPORT_DIR = Path("reports")
# one definition per label: each speed figure of the report says what it counts
PRETRAIN_SPEED = "pretraining speed: input + target tokens per second of training (validation excluded)"
BENCH_SPEED = "input tokens per second of one training step (benchmark, random tokens)"
LENGTHS_SPEED = "input positions per second of training at this length (padding included)"
TEMPLATE = "comparison.md.j2"
COLLAPSED = "**collapsed**"
LAYOUTS = {
    "encoder_decoder": "encoder-decoder",
    "causal_lm": "causal LM (decoder-only)",
    "prefix_lm": "prefix LM (decoder-only, bidirectional prefix)",
}

# how the fine-tuning runs start, for the report's setup line
FINETUNE_INIT = {
    "pretrained": "from each run's own pretrained weights",
    "scratch": "from a fresh initialisation (the same for every family)",
    "checkpoint": "from an original checkpoint",
}


# -------------------------------------------------------------------------------------------- inputs


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


# ------------------------------------------------------------------------------------------- analysis


def _format(iv: Interval | None, digits: int, show_interval: bool) -> str:
    if iv is None:
        return "—"
    if iv.has_interval and abs(iv.high - iv.low) <= 1e-9 * max(1.0, abs(iv.mean)):  # the same in every seed
        show_interval = False
    if digits == 0:
        if show_interval and iv.has_interval:
            return f"{iv.mean:,.0f} [{iv.low:,.0f}, {iv.high:,.0f}]"
        return f"{iv.mean:,.0f}"
    return iv.format(digits) if show_interval else f"{iv.mean:.{digits}f}"


@dataclass
class Row:
    """One line of a table: each variant's value, the trivial baseline, collapse flags and pairwise verdicts."""

    key: str
    label: str
    direction: str  # "higher" or "lower" is better; "" for a descriptive row (no verdict)
    values: dict[str, Interval]
    show_interval: bool
    digits: int = 3
    baseline: float | None = None
    baseline_label: str = ""
    baselines: dict[str, float] = field(default_factory=dict)
    collapse: dict[str, Collapse] = field(default_factory=dict)
    verdicts: list[tuple[str, str, Verdict]] = field(default_factory=list)
    task: str = ""
    metric_label: str = ""
    matched: dict[tuple[str, str], str] = field(default_factory=dict)
    """Per compared pair: what was matched and what differs by more than `MISMATCH` (`comparability`)."""

    def collapsed(self, variant: str) -> bool:
        return variant in self.collapse and self.collapse[variant].collapsed

    def cell(self, variant: str) -> str:
        text = _format(self.values.get(variant), self.digits, self.show_interval)
        return f"{text} {COLLAPSED}" if self.collapsed(variant) else text

    def baseline_cell(self) -> str:
        if self.baseline is None:
            return "—"
        return f"{self.baseline:.{self.digits}f}" + (f" ({self.baseline_label})" if self.baseline_label else "")

    def verdict_text(self, a: str, b: str, verdict: Verdict) -> str:
        """The verdict with what was matched for this pair (and what was not, where it differs by > 1.5x)."""
        note = self.matched.get((a, b))
        return f"{verdict.text} ({note})" if note else verdict.text

    def verdict_cell(self) -> str:
        if not self.direction or not self.verdicts:
            return "—"
        return "; ".join(self.verdict_text(a, b, v) for a, b, v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "higher_is_better": None if not self.direction else self.direction == "higher",
            "variants": {
                v: {
                    **iv.to_dict(),
                    "collapsed": self.collapsed(v),
                    "collapse_reason": self.collapse.get(v, Collapse(False)).reason,
                }
                for v, iv in self.values.items()
            },
            "baseline": self.baseline,
            "baselines": self.baselines,
            "verdicts": {
                f"{a} vs {b}": {**v.to_dict(), "matched": self.matched.get((a, b), "")} for a, b, v in self.verdicts
            },
        }


def union(a: Interval, b: Interval) -> Interval:
    """The interval covering both (same point estimate): the more cautious of two ways of measuring it."""
    if not (a.has_interval and b.has_interval):
        return a if a.has_interval else b
    return Interval(a.mean, min(a.low, b.low), max(a.high, b.high), a.n, f"{a.method} and {b.method}")  # type: ignore[type-var]


def no_interval(iv: Interval) -> Interval:
    """The same estimate without its interval (one seed: the seed-to-seed variation is unknown)."""
    return Interval(iv.mean, None, None, 1, "one seed: no interval")


def seed_row(
    key: str,
    label: str,
    per_variant: dict[str, dict[int, float]],
    direction: str,
    pairs: list[tuple[str, str]],
    digits: int = 3,
    baseline: float | None = None,
    baseline_label: str = "",
) -> Row:
    """A metric measured once per run: t-interval over seeds, paired-by-seed differences."""
    values = {v: t_interval(list(s.values())) for v, s in per_variant.items() if s}
    multi = all(iv.n >= 2 for iv in values.values()) and bool(values)
    collapse: dict[str, Collapse] = {}
    if baseline is not None and direction:
        collapse = {v: check_collapse(iv, baseline, direction == "higher") for v, iv in values.items()}
    verdicts = []
    if direction:
        flags = {v: c.collapsed for v, c in collapse.items()}
        for a, b in pairs:
            if a in values and b in values:
                diff = difference_interval(per_variant[a], per_variant[b])
                verdicts.append((a, b, decide(a, b, diff, direction == "higher", flags, digits or 0)))
    return Row(key, label, direction, values, multi, digits, baseline, baseline_label, {}, collapse, verdicts)


def task_row(
    task: str,
    metric: str,
    beam: int,
    runs: dict[str, dict[int, dict[str, Any]]],
    baselines: dict[str, float],
    pairs: list[tuple[str, str]],
    examples_only: bool = False,
) -> Row:
    """A task metric at one beam size: `runs[variant][seed]` = {"scores": per-example, "predictions": ...}.

    With one seed the seed-to-seed variation is unknown: no interval and no winner, unless `examples_only`, where
    the interval is the bootstrap over the test examples alone (the section says so: it holds for the trained
    models of that seed, not for a re-training)."""
    values: dict[str, Interval] = {}
    multi = bool(runs) and all(len(by_seed) >= 2 for by_seed in runs.values())
    intervals = multi or (examples_only and bool(runs))
    for v, by_seed in runs.items():
        scores = [np.asarray(r["scores"], dtype=float) for r in by_seed.values()]
        iv = bootstrap_interval(scores)
        if len(scores) >= 2:
            iv = union(iv, t_interval([s.mean() for s in scores]))
        if iv.has_interval:  # scores live in [0, 1]: so does their interval
            iv = Interval(iv.mean, max(iv.low, 0.0), min(iv.high, 1.0), iv.n, iv.method)  # type: ignore[type-var]
        values[v] = iv
    baseline = max(baselines.values()) if baselines else None
    best = max(baselines, key=baselines.get) if baselines else ""  # type: ignore[arg-type]
    collapse = {
        v: check_collapse(values[v], baseline, True, [r["predictions"] for r in by_seed.values()])
        for v, by_seed in runs.items()
    }
    flags = {v: c.collapsed for v, c in collapse.items()}
    verdicts = []
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        sa = {s: r["scores"] for s, r in runs[a].items()}
        sb = {s: r["scores"] for s, r in runs[b].items()}
        diff = bootstrap_difference(sa, sb)
        if multi:
            means = lambda d: {s: float(np.mean(x)) for s, x in d.items()}  # noqa: E731
            diff = union(diff, difference_interval(means(sa), means(sb)))
        elif not intervals:
            diff = no_interval(diff)
        verdicts.append((a, b, decide(a, b, diff, True, flags)))
    label = f"{metric.replace('_', ' ')}, " + ("greedy" if beam == 1 else f"beam {beam}")
    return Row(
        f"{task}/{metric}_beam{beam}", f"{task}: {label}", "higher", values, intervals, 3, baseline,
        best.replace("_", " "), baselines, collapse, verdicts, task, label,
    )  # fmt: skip


@dataclass
class Analysis:
    """Everything the report and `metrics/compare.json` say."""

    variants: list[str]
    seeds: list[int]
    rows: list[Row]
    task_rows: list[Row]
    greedy_beam: int
    scaling: dict[str, Any] = field(default_factory=dict)
    """Loss against training compute per family (`scaling`); empty until `analyze` fills it."""
    lengths: dict[str, Any] = field(default_factory=dict)
    """Quality versus length at matched compute (`quality_vs_length`); empty until `analyze` fills it."""
    comparability: dict[str, Any] = field(default_factory=dict)
    """What the training-side verdicts matched and what differs (`comparability`)."""


def _per_seed(data: dict[str, Any], getter: Callable[[dict[str, Any]], Any]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for variant, by_seed in data["runs"].items():
        values = {}
        for seed, run in by_seed.items():
            try:
                value = getter(run)
            except (KeyError, TypeError, ZeroDivisionError):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
                values[seed] = float(value)
        out[variant] = values
    return out


def analyze(cfg: Config, data: dict[str, Any]) -> Analysis:
    """The statistics of every row (see the module docstring)."""
    variants = list(data["runs"])
    pairs = list(itertools.combinations(variants, 2))
    per = lambda getter: _per_seed(data, getter)  # noqa: E731
    unigram = [r["eval"].get("unigram_loss") for v in data["runs"].values() for r in v.values()]
    unigram = [u for u in unigram if isinstance(u, int | float)]
    rows = [
        seed_row("parameters", "parameters (total)", per(lambda r: r["pretrain"]["parameters"]), "", pairs, 0),
        seed_row(
            "non_embedding_parameters",
            "parameters (non-embedding)",
            per(lambda r: r["pretrain"]["non_embedding_parameters"]),
            "",
            pairs,
            0,
        ),  # fmt: skip
        seed_row(
            "pretrain_tokens", "pretraining tokens seen (targets)", per(lambda r: r["pretrain"]["tokens"]), "", pairs, 0
        ),
        seed_row(
            "pretrain_wall_time_s",
            "pretraining wall time (s)",
            per(lambda r: r["pretrain_timing"]["wall_time_s"]),
            "lower",
            pairs,
            1,
        ),  # fmt: skip
        seed_row(
            "pretrain_tokens_per_s",
            PRETRAIN_SPEED,
            per(lambda r: r["pretrain_timing"]["tokens_per_s"]),
            "higher",
            pairs,
            0,
        ),  # fmt: skip
        seed_row(
            "pretrain_val_loss",
            "final pretraining validation loss",
            per(lambda r: r["pretrain"]["val_loss"]),
            "lower",
            pairs,
        ),
        seed_row(
            "test_loss",
            "test loss (pretraining objective, nats/token)",
            per(lambda r: r["eval"]["test_loss"]),
            "lower",
            pairs,
            3,
            float(np.mean(unigram)) if unigram else None,
            "unigram model's test loss",
        ),  # fmt: skip
        seed_row(
            "finetune_tokens", "fine-tuning tokens seen (targets)", per(lambda r: r["finetune"]["tokens"]), "", pairs, 0
        ),
        seed_row(
            "finetune_wall_time_s",
            "fine-tuning wall time (s)",
            per(lambda r: r["finetune_timing"]["wall_time_s"]),
            "lower",
            pairs,
            1,
        ),  # fmt: skip
        seed_row(
            "finetune_val_loss",
            "final fine-tuning validation loss",
            per(lambda r: r["finetune"]["val_loss"]),
            "lower",
            pairs,
        ),
    ]
    rows = [r for r in rows if r.values]
    beams = sorted(cfg.evaluate.num_beams)
    task_rows = []
    tasks = list(dict.fromkeys(t for by_seed in data["runs"].values() for r in by_seed.values() for t in r["examples"]))
    for task in tasks:
        for beam in beams:
            runs: dict[str, dict[int, dict[str, Any]]] = {}
            baselines: dict[str, float] = {}
            metric = ""
            for variant, by_seed in data["runs"].items():
                for seed, run in by_seed.items():
                    entry = run["examples"].get(task)
                    if not entry or str(beam) not in entry["beams"]:
                        continue
                    metric = entry["metric"]
                    baselines = entry.get("baselines", baselines)
                    runs.setdefault(variant, {})[seed] = entry["beams"][str(beam)]
            if runs:
                task_rows.append(task_row(task, metric, beam, runs, baselines, pairs))
    analysis = Analysis(variants, list(data["seeds"]), rows, task_rows, beams[0])
    analysis.scaling = scaling(cfg, data, analysis)
    analysis.comparability = comparability(cfg, data, pairs)
    for row in [*rows, *task_rows]:
        if row.direction:
            row.matched = analysis.comparability["notes"]
    analysis.lengths = quality_vs_length(cfg, data.get("lengths", {}), variants)
    return analysis


MISMATCH = 1.5  # total parameters or training FLOPs further apart than this factor are named in every verdict


def mismatches(a: str, b: str, figures: dict[str, dict[str, float]]) -> list[str]:
    """`figures[name][variant]` -> the names further apart than `MISMATCH` between `a` and `b`, with the factor."""
    out = []
    for name, per in figures.items():
        x, y = per.get(a), per.get(b)
        if x and y and max(x, y) / min(x, y) > MISMATCH:
            out.append(f"{name} {max(x, y) / min(x, y):.2f}x apart ({a} {_short(x)}, {b} {_short(y)})")
    return out


def _short(x: float) -> str:
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}".replace("e+0", "e").replace("e+", "e")


def comparability(cfg: Config, data: dict[str, Any], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """What the training-side comparisons matched, and what they did not: every variant trained on the same data
    with the same steps, batch and objective (so the same tokens), not the same parameters or FLOPs. Per pair, a
    note for the verdicts naming total parameters or pretraining FLOPs that differ by more than `MISMATCH`."""
    params = {v: float(np.mean([r["pretrain"]["parameters"] for r in by_seed.values()]))
              for v, by_seed in data["runs"].items()}  # fmt: skip
    flops = {v: float(np.mean([f for f, _ in by_seed.values()])) for v, by_seed in run_flops(cfg, data).items()}
    figures = {"total parameters": params, "pretraining FLOPs": flops}
    basis = "matched: data, steps and batch, so tokens"
    notes = {}
    for a, b in pairs:
        apart = mismatches(a, b, figures)
        notes[(a, b)] = basis + ("; not matched: " + "; ".join(apart) if apart else "")
    return {"basis": basis, "parameters": params, "pretraining_flops": flops, "notes": notes}


# ------------------------------------------------------------------------------------------- scaling

MATCH_FACTOR = 2.0  # two sizes of different families are "the same compute level" within this factor of FLOPs
SCALING_EXAMPLE = (
    "models:\n"
    "  {family}: ...            # as it is\n"
    "  {family}_small:          # the same family one size up: every field as in `{family}`, null = the preset's\n"
    "    family: {family}\n"
    "    preset: small\n"
    "    ...\n"
)


def flops_per_target_token(cfg: Config, variant: str, vocab_size: int) -> float:
    """Training FLOPs per target token of `variant` under the pretraining objective, from the family's own
    accounting (`FamilySpec.training_flops`, a function of the config) at the configured shapes."""
    from models import spec
    from pipeline.objectives import span_corruption_lengths

    p = cfg.pretrain
    config = cfg.model_config(variant, vocab_size)
    flops = spec(cfg.family(variant)).training_flops
    if p.objective == "span_corruption":
        _, targets = span_corruption_lengths(p.input_length, p.noise_density, p.mean_noise_span_length)
        return flops(config, 1, p.input_length, targets) / targets
    # decoder-only: every position is a target (causal LM), or those after a prefix drawn uniformly (prefix LM)
    targets = p.input_length if p.objective == "causal_lm" else p.input_length / 2 + 1
    return flops(config, 1, p.input_length, 0) / targets


def run_flops(cfg: Config, data: dict[str, Any]) -> dict[str, dict[int, tuple[float, str]]]:
    """Training compute of every pretraining run: (FLOPs, where the figure comes from).

    A FLOPs figure the run saved itself (`flops` or `training_flops` in `metrics/pretrain/V-S.json`) is used as
    is; otherwise the run's target tokens times `flops_per_target_token`.
    """
    out: dict[str, dict[int, tuple[float, str]]] = {}
    per_token: dict[str, float] = {}
    for variant, by_seed in data["runs"].items():
        for seed, run in by_seed.items():
            m = run["pretrain"]
            saved = next((m[k] for k in ("flops", "training_flops") if isinstance(m.get(k), int | float)), None)
            if saved is not None:
                out.setdefault(variant, {})[seed] = (float(saved), "saved by the run")
            elif isinstance(m.get("tokens"), int | float):
                if variant not in per_token:
                    per_token[variant] = flops_per_target_token(cfg, variant, _vocab_size(cfg, data))
                flops = float(m["tokens"]) * per_token[variant]
                out.setdefault(variant, {})[seed] = (flops, "target tokens x the model's training FLOPs per token")
    return out


def _fmt_flops(x: float) -> str:
    return f"{x:.2e}".replace("e+", "e")


def scaling(cfg: Config, data: dict[str, Any], analysis: Analysis) -> dict[str, Any]:
    """Final pretraining validation loss against training compute, per family, and which family is ahead at each
    compute level (Tay et al. 2022 compare architectures by such curves, not by one point).

    A family's curve is its variants (sizes) ordered by compute; it needs two sizes or more. Two families are
    compared at a compute level where a variant of each lies within `MATCH_FACTOR` in FLOPs; one is named ahead
    only where the 95% intervals of the two mean losses do not overlap.
    """
    by_key = {r.key: r for r in analysis.rows}
    loss_row = by_key.get("pretrain_val_loss")
    flops = run_flops(cfg, data)
    families: dict[str, list[dict[str, Any]]] = {}
    for variant in analysis.variants:
        if loss_row is None or variant not in loss_row.values or variant not in flops:
            continue
        iv = loss_row.values[variant]
        compute = t_interval([f for f, _ in flops[variant].values()])
        families.setdefault(cfg.family(variant), []).append(
            {"variant": variant, "flops": compute.mean, "flops_source": next(iter(flops[variant].values()))[1],
             "loss": iv, "mean": iv.mean, "low": iv.low, "high": iv.high}
        )  # fmt: skip
    for points in families.values():
        points.sort(key=lambda pt: pt["flops"])
    curves = {f: pts for f, pts in families.items() if len(pts) >= 2}
    levels: list[dict[str, Any]] = []
    for fa, fb in itertools.combinations(sorted(curves), 2):
        for a in curves[fa]:
            b = min(curves[fb], key=lambda pt: abs(np.log(pt["flops"] / a["flops"])))
            if max(a["flops"], b["flops"]) / min(a["flops"], b["flops"]) > MATCH_FACTOR:
                continue
            if any(lv["variants"] == {fa: a["variant"], fb: b["variant"]} for lv in levels):
                continue
            levels.append(_level(fa, a, fb, b))
    levels.sort(key=lambda lv: lv["flops"])
    note, example = "", ""
    if not curves:
        family = next(iter(families), cfg.family(analysis.variants[0]))
        note = (
            "Scaling curves need two or more sizes per family (here every family has one). Add a larger variant of "
            "each family to `models:` in params.yaml, for example:"
        )
        example = SCALING_EXAMPLE.format(family=family)
    if curves and len(curves) < 2:
        note = "Only one family has two sizes or more: its curve is drawn, no family is compared with another."
    elif len(curves) >= 2 and not levels:
        note = f"No two families have sizes within a factor {MATCH_FACTOR:g} of each other's training FLOPs."
    sources = sorted({pt["flops_source"] for pts in families.values() for pt in pts})
    return {
        "families": families,
        "curves": curves,
        "levels": levels,
        "note": note,
        "example": example,
        "sources": sources,
    }


def _level(fa: str, a: dict[str, Any], fb: str, b: dict[str, Any]) -> dict[str, Any]:
    """Family `fa` (variant `a`) against family `fb` (variant `b`) at about the same training compute."""
    ia, ib = a["loss"], b["loss"]
    where = (
        f"at ~{_fmt_flops((a['flops'] * b['flops']) ** 0.5)} FLOPs ({a['variant']} {_fmt_flops(a['flops'])}, "
        f"{b['variant']} {_fmt_flops(b['flops'])})"
    )
    ahead = None
    if not (ia.has_interval and ib.has_interval):
        text = f"{where}: no winner named, one seed gives no interval (loss {ia.mean:.3f} vs {ib.mean:.3f})"
    elif ia.high < ib.low or ib.high < ia.low:
        ahead, behind = (fa, fb) if ia.mean < ib.mean else (fb, fa)
        (lo, vlo), (hi, vhi) = sorted([(ia, a["variant"]), (ib, b["variant"])], key=lambda x: x[0].mean)
        text = f"{where}: {ahead} ahead, loss {lo.format()} ({vlo}) against {hi.format()} ({vhi}, {behind})"
    else:
        text = f"{where}: no significant difference (loss {ia.format()} vs {ib.format()}, the intervals overlap)"
    return {
        "flops": (a["flops"] * b["flops"]) ** 0.5,
        "variants": {fa: a["variant"], fb: b["variant"]},
        "ahead": ahead,
        "text": text,
    }


def scaling_metrics(section: dict[str, Any]) -> dict[str, Any]:
    """The scaling section as plain data for `metrics/compare.json`."""
    return {
        "families": {
            f: [
                {
                    "variant": p["variant"],
                    "flops": p["flops"],
                    "flops_source": p["flops_source"],
                    "val_loss": p["loss"].to_dict(),
                }
                for p in pts
            ]
            for f, pts in section["families"].items()
        },  # fmt: skip
        "curves": sorted(section["curves"]),
        "levels": [{k: lv[k] for k in ("flops", "variants", "ahead", "text")} for lv in section["levels"]],
        "note": section["note"],
    }


# ------------------------------------------------------------------------------ quality versus length

# the efficiency indicators recorded per length (Dehghani et al. 2021): metrics key -> (label, format)
LENGTH_FIGURES: dict[str, tuple[str, str]] = {
    "parameters": ("parameters", "{:,.0f}"),
    "flops_per_token": ("training FLOPs of a step per input position at this length", "{:.3g}"),
    "steps": ("optimizer steps in the budget", "{:,.0f}"),
    "flops": ("training FLOPs spent", "{:.3g}"),
    "train_seconds": ("training wall time (s)", "{:,.1f}"),
    "tokens_per_s": (LENGTHS_SPEED, "{:,.0f}"),
    "peak_memory_mb": ("peak memory (MiB)", "{:,.0f}"),
}


def quality_vs_length(cfg: Config, runs: dict[str, dict[int, dict[str, Any]]], variants: list[str]) -> dict[str, Any]:
    """The task metric at each trained length under the same budget for every variant, with the efficiency
    indicators side by side: per length one task row (bootstrap over test examples and seeds, paired
    differences, baselines, collapse: `task_row`) and each figure of `LENGTH_FIGURES` over the seeds."""
    s = cfg.lengths
    pairs = list(itertools.combinations(variants, 2))
    missing = [f"lengths@{v}-{seed}" for v in variants for seed in s.seeds if seed not in runs.get(v, {})]
    kinds = {run.get("budget_kind") for by_seed in runs.values() for run in by_seed.values()}
    kind = kinds.pop() if len(kinds) == 1 else s.budget.kind
    levels = []
    for length in s.seq_lengths:
        key = str(length)
        per: dict[str, dict[int, dict[str, Any]]] = {}
        figures: dict[str, dict[str, dict[int, float]]] = {}
        baselines: dict[str, float] = {}
        metric, budgets, dropped = "", set(), {}
        for variant in variants:
            for seed, run in runs.get(variant, {}).items():
                entry, m = run.get("examples", {}).get(key), run.get("lengths", {}).get(key)
                if not entry or not m:
                    continue
                metric = entry["metric"]
                baselines = entry.get("baselines") or baselines
                per.setdefault(variant, {})[seed] = {"scores": entry["scores"], "predictions": entry["predictions"]}
                budgets.add(m.get("budget"))
                dropped = m.get("dropped_too_long", dropped)
                for fig in LENGTH_FIGURES:
                    if isinstance(m.get(fig), int | float):
                        figures.setdefault(variant, {}).setdefault(fig, {})[seed] = float(m[fig])
        if not per:
            continue
        row = task_row(s.task, metric, 1, per, baselines, pairs, examples_only=True)
        summary = {v: {f: t_interval(list(x.values())) for f, x in figs.items()} for v, figs in figures.items()}
        means = {f: {v: summary[v][f].mean for v in summary if f in summary[v]} for f in ("parameters", "flops")}
        steps = {v: summary[v]["steps"].mean for v in summary if "steps" in summary[v]}
        for a, b in pairs:
            basis = "matched: training FLOPs" if kind == "flops" else "matched: training wall-clock"
            apart = mismatches(a, b, {"total parameters": means["parameters"]} if kind == "flops" else
                               {"total parameters": means["parameters"], "training FLOPs": means["flops"]})  # fmt: skip
            if a in steps and b in steps:
                basis += f"; steps {steps[a]:,.0f} ({a}) vs {steps[b]:,.0f} ({b})"
            row.matched[(a, b)] = basis + ("; not matched: " + "; ".join(apart) if apart else "")
        levels.append(
            {
                "length": length,
                "budget": budgets.pop() if len(budgets) == 1 else None,
                "row": row,
                "figures": summary,
                "dropped": dropped,
                "text": f"length {length}: " + _verdicts(row),
            }
        )
    unit = "FLOPs (each variant's own accounting)" if kind == "flops" else "seconds of training wall-clock"
    return {"task": s.task, "budget_kind": kind, "unit": unit, "levels": levels, "missing": missing}


def lengths_cells(section: dict[str, Any], variants: list[str]) -> list[dict[str, Any]]:
    """Rows of the efficiency table: one per length and variant, a formatted cell per figure of `LENGTH_FIGURES`
    (mean over seeds, with its interval where the seeds differ)."""
    out = []
    for level in section["levels"]:
        for v in variants:
            figures = level["figures"].get(v)
            if not figures:
                continue
            cells = {}
            for fig, (_, fmt) in LENGTH_FIGURES.items():
                iv = figures.get(fig)
                if iv is None:
                    continue
                spread = iv.has_interval and abs(iv.high - iv.low) > 1e-9 * max(1.0, abs(iv.mean))
                cells[fig] = fmt.format(iv.mean) + (f" [{fmt.format(iv.low)}, {fmt.format(iv.high)}]" if spread else "")
            out.append({"length": level["length"], "variant": v, "cells": cells})
    return out


def lengths_metrics(section: dict[str, Any]) -> dict[str, Any]:
    """The section as plain data for `metrics/compare.json`."""
    return {
        "task": section["task"],
        "budget_kind": section["budget_kind"],
        "missing": section["missing"],
        "levels": [
            {
                "length": lv["length"],
                "budget": lv["budget"],
                "quality": lv["row"].to_dict(),
                "figures": {v: {f: iv.to_dict() for f, iv in figs.items()} for v, figs in lv["figures"].items()},
                "dropped_too_long": lv["dropped"],
            }
            for lv in section["levels"]
        ],
    }


def lengths_chart_points(section: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """`charts.quality_vs_length` points: each variant's metric per length (interval only with several seeds)."""
    points: dict[str, list[dict[str, Any]]] = {}
    for level in section["levels"]:
        row = level["row"]
        for v, iv in row.values.items():
            show = row.show_interval and iv.has_interval
            points.setdefault(v, []).append(
                {"length": level["length"], "mean": iv.mean, "low": iv.low if show else None,
                 "high": iv.high if show else None, "baseline": row.baseline}
            )  # fmt: skip
    return points


# --------------------------------------------------------------------------------------------- report


def _vocab_size(cfg: Config, data: dict[str, Any]) -> int:
    vocab = data["tokenize"].get("vocab_size", cfg.tokenizer.vocab_size)
    return -(-int(vocab) // 128) * 128


def layouts(cfg: Config, data: dict[str, Any]) -> dict[str, str]:
    """Each variant's actual layout in words (from its resolved config, not assumed)."""
    out = {}
    for variant in cfg.models:
        layout = getattr(cfg.model_config(variant, _vocab_size(cfg, data)), "layout", "encoder_decoder")
        out[variant] = LAYOUTS.get(layout, layout)
    return out


def efficiency(cfg: Config, data: dict[str, Any], analysis: Analysis) -> list[tuple[str, dict[str, str]]]:
    """Parameters, FLOPs per token, measured tokens/s and peak memory per variant, side by side (Dehghani et
    al. 2021: no single one of them is the cost)."""
    from models import build_model, spec
    from pipeline.objectives import span_corruption_lengths

    p = cfg.pretrain
    inputs, targets = p.input_length, 0
    if p.objective == "span_corruption":
        inputs, targets = span_corruption_lengths(p.input_length, p.noise_density, p.mean_noise_span_length)
    rows: dict[str, dict[str, str]] = {
        "parameters: total (non-embedding)": {},
        f"training FLOPs of a pretraining step per input token (M; {inputs} input, {targets} target tokens)": {},
    }
    flops_key = list(rows)[1]
    for variant in analysis.variants:
        config = cfg.model_config(variant, _vocab_size(cfg, data))
        model = build_model(cfg.family(variant), config)
        enc_dec = getattr(config, "layout", "encoder_decoder") == "encoder_decoder"
        rows["parameters: total (non-embedding)"][variant] = (
            f"{model.num_parameters():,} ({model.num_parameters(non_embedding=True):,})"
        )
        flops_of = spec(cfg.family(variant)).training_flops
        flops = flops_of(config, 1, inputs, targets) if enc_dec else flops_of(config, 1, p.input_length, 0)
        rows[flops_key][variant] = f"{flops / (inputs if enc_dec else p.input_length) / 1e6:,.2f}"
        del model
    by_key = {r.key: r for r in analysis.rows}
    if "pretrain_tokens_per_s" in by_key:
        r = by_key["pretrain_tokens_per_s"]
        rows[r.label] = {v: r.cell(v) for v in r.values}
    measured = [x for x in data["benchmark_rows"] if x.get("kind") == "length" and x.get("peak_mb") is not None]
    for variant in analysis.variants:
        mine = sorted((x for x in measured if _row_variant(x) == variant), key=lambda x: x["seq_length"])
        if mine:
            ends = [mine[0]] if len(mine) == 1 else [mine[0], mine[-1]]
            rows.setdefault("peak memory of a training step (benchmark, MiB)", {})[variant] = ", ".join(
                f"{x['step_mb']:,.0f} at length {x['seq_length']}" for x in ends
            )
    return list(rows.items())


def _row_variant(row: dict[str, Any]) -> str:
    return str(row.get("variant") or row.get("family"))


def crossover_text(summary: dict[str, Any]) -> list[str]:
    """Sentences on each crossover with its uncertainty (from `metrics/benchmark.json`)."""
    lines = []
    for item in summary.get("crossovers", []):
        lines.append(item["sentence"])
    if not lines:
        for what, key in (
            ("trains faster than", "speed_crossover_length"),
            ("needs less memory than", "memory_crossover_length"),
        ):
            value = summary.get(key)
            lines.append(
                f"Crossover ({what} the reference): "
                + ("not reached in the measured range" if value is None else f"from length {value}")
            )
    return lines


def benchmark_section(data: dict[str, Any], variants: list[str], cfg: Config) -> dict[str, Any]:
    """The speed/memory table (median with the spread of the repeats), crossovers, what was dropped."""
    rows = [r for r in data["benchmark_rows"] if r.get("kind") == "length"]
    names = [v for v in variants if any((r.get("variant") or r.get("family")) == v for r in rows)]
    lengths = sorted({r["seq_length"] for r in rows})

    def figure(r: dict[str, Any] | None, key: str) -> str:
        if not r or r.get(key) is None:
            return "—"
        lo, hi = r.get(f"{key}_low"), r.get(f"{key}_high")
        return f"{r[key]:,.0f}" + (f" ({lo:,.0f}–{hi:,.0f})" if lo is not None and hi is not None else "")

    table = []
    for n in lengths:
        at = {(r.get("variant") or r.get("family")): r for r in rows if r["seq_length"] == n}
        cells = [figure(at.get(v), "tokens_per_s") for v in names] + [figure(at.get(v), "step_mb") for v in names]
        table.append(f"| {n} | " + " | ".join(cells) + " |")
    dropped = sorted(
        {f"{r.get('variant') or r.get('family')} at {r['seq_length']} ({r.get('error') or r.get('skipped')})"
         for r in data["benchmark_rows"] if "error" in r or "skipped" in r}
    )  # fmt: skip
    summary = data["benchmark"]
    repeats = cfg.benchmark.repeats
    intro = (
        f"One training step (AdamW, batch {cfg.benchmark.batch_size}, L input and L/4 target tokens, random tokens), "
        f"each measurement in its own process, {repeats} timed repeats after a warmup: the median, with the range of "
        "the repeats in parentheses. Memory is the step's own peak above the loaded model and optimizer. Speed on "
        f"random tokens says nothing about quality. Time budget of the stage: {cfg.benchmark.time_budget_s:.0f} s."
    )
    return {
        "variants": names,
        "table": table,
        "dropped": "; ".join(dropped),
        "sentences": crossover_text(summary),
        "intro": intro,
    }


def lra_section(cfg: Config, analysis: Analysis) -> dict[str, Any]:
    """Our LRA ListOps accuracy (when `lra_listops` ran) beside the published numbers."""
    ours: dict[str, str] = {}
    row = next(
        (r for r in analysis.task_rows if r.task == "lra_listops" and r.key.endswith(f"_beam{analysis.greedy_beam}")),
        None,
    )
    if row is not None:
        ours = {
            v: f"{100 * iv.mean:.2f}%"
            + (f" [{100 * iv.low:.2f}, {100 * iv.high:.2f}]" if row.show_interval and iv.has_interval else "")
            for v, iv in row.values.items()
        }
        sentence = (
            "`lra_listops` ran in this pipeline (greedy decoding of the class digit). The published numbers come from "
            "encoder-only classifiers trained much longer on sequences of up to 2K tokens: compare only at that budget "
            "(`configs/lra_listops.yaml`)."
        )
    else:
        sentence = (
            "Not run at this budget: the default fine-tuning tasks are short. `configs/lra_listops.yaml` is the params "
            "preset for a GPU cluster that fine-tunes and evaluates on the LRA ListOps task (96K/2K/2K examples of 500 "
            "to 2000 tokens); its report prints its accuracy here, beside the published numbers."
        )
    return {"published": published_results(cfg, analysis.variants, "lra_listops"), "ours": ours, "sentence": sentence}


def published_results(cfg: Config, variants: list[str], task: str) -> dict[str, float]:
    """The published `task` scores of the variants' families (their specs' `published`), label -> score."""
    import models

    out: dict[str, float] = {}
    for family in dict.fromkeys(cfg.family(v) for v in variants):
        out.update(models.spec(family).published.get(task, {}))
    return out


def attention_caveat(cfg: Config, variants: list[str]) -> str:
    """Which variants use a sub-quadratic attention (their family spec's `efficient_attention`), which saves
    nothing at the training lengths: "`v`'s LSH and local attention save nothing", or "" when none does."""
    import models

    savers = []
    for v in variants:
        describe = models.spec(cfg.family(v)).efficient_attention
        text = describe(cfg.model_config(v)) if describe else None
        if text:
            savers.append(f"`{v}`'s {text}")
    return f", where {', '.join(savers)} save{'s' if len(savers) == 1 else ''} nothing" if savers else ""


def short_answer(analysis: Analysis, bench: dict[str, Any]) -> list[str]:
    """The bullet points of "The answer in short"."""
    lines = []
    by_key = {r.key: r for r in analysis.rows}
    if "test_loss" in by_key:
        r = by_key["test_loss"]
        lines.append("**Quality at this budget** (test loss under the pretraining objective): " + _verdicts(r))
    for r in analysis.task_rows:
        if r.key.endswith(f"_beam{analysis.greedy_beam}"):
            lines.append(f"**{r.task}** ({r.metric_label}): " + _verdicts(r))
    if analysis.lengths.get("levels"):
        section = analysis.lengths
        lines.append(
            f"**Quality versus length at matched compute** (`{section['task']}`, the same budget in "
            f"{section['unit']} for every variant): " + " ".join(lv["text"] for lv in section["levels"])
        )
    lines += bench["sentences"]
    return lines


def _verdicts(row: Row) -> str:
    if row.values and all(row.collapsed(v) for v in row.values):
        reasons = "; ".join(f"{v}: {row.collapse[v].reason}" for v in row.values)
        return f"no answer: every variant collapsed ({reasons})."
    parts = [row.verdict_text(a, b, v) for a, b, v in row.verdicts] or ["one variant only: nothing to compare"]
    collapsed = [f"{v} collapsed ({row.collapse[v].reason})" for v in row.values if row.collapsed(v)]
    above = [v for v in row.values if row.baseline is not None and not row.collapsed(v)]
    tail = ""
    if row.baseline is not None and above:
        tail = f"; beyond the trivial baseline ({row.baseline:.3f}, {row.baseline_label}): {', '.join(above)}"
    return "; ".join(parts) + (f" — {'; '.join(collapsed)}" if collapsed else "") + tail + "."


def render_report(cfg: Config, data: dict[str, Any], analysis: Analysis) -> str:
    """`reports/comparison.md` from the template."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters["md"] = _md
    p, f, e = cfg.pretrain, cfg.finetune, cfg.evaluate
    multi = len(analysis.seeds) >= 2
    bench = benchmark_section(data, analysis.variants, cfg)
    prep, tok = data["prepare"], data["tokenize"]
    lay = layouts(cfg, data)
    setup = [
        "Models: "
        + "; ".join(
            f"`{v}` = family `{cfg.family(v)}`, preset `{cfg.models[v].preset}`, {lay[v]}" for v in analysis.variants
        )
        + f"; one SentencePiece vocabulary ({tok.get('vocab_size', cfg.tokenizer.vocab_size):,} pieces incl. "
        f"{cfg.tokenizer.num_sentinels} sentinels).",
        f"Seeds: {analysis.seeds} (each changes initialisation, data order and LSH rotations; the data split and the "
        f"tokenizer use `seed: {cfg.seed}`).",
        f"Data: source `{cfg.data.source}`"
        + (", " + _documents(prep) if prep else "")
        + "; split by document.",  # fmt: skip
        f"Pretraining: `{p.objective}`, {p.max_steps} steps x batch {p.batch_size} x {p.input_length} input tokens, "
        f"{p.optimizer.name} lr {p.optimizer.lr} ({p.optimizer.schedule}), the same for every variant.",
        f"Fine-tuning: tasks {', '.join(f'`{t}`' for t in f.tasks)} mixed `{f.mixing}`, {f.max_steps} steps x batch "
        f"{f.batch_size}, lr {f.optimizer.lr} ({f.optimizer.schedule}), "
        f"{FINETUNE_INIT.get(f.init, 'from')} (`finetune.init: {f.init}`).",
        f"Evaluation: `{e.split}` split, the same {e.max_examples_per_task} (at most) examples per task for every run, "
        f"beams {list(e.num_beams)}, up to {e.max_new_tokens} new tokens.",
    ]
    seeds_sentence = (
        f"{len(analysis.seeds)} seeds per variant: means with 95% intervals."
        if multi
        else f"**One seed** ({analysis.seeds}): no interval is shown and no winner is named, because the "
        "seed-to-seed variation is unknown; collapse is still judged against the baselines on the test examples."
    )
    samples = _samples(data, analysis)
    collapse_notes = [
        f"`{v}` on {r.task} ({r.metric_label}): {r.collapse[v].reason}"
        for r in analysis.task_rows for v in r.values if r.collapsed(v)
    ]  # fmt: skip
    collapse_notes += [
        f"`{v}` {r.label}: {r.collapse[v].reason}" for r in analysis.rows for v in r.values if r.collapsed(v)
    ]
    caveats = [
        "Tiny models and a tiny budget: the numbers show which variant learns faster at the very start of training, "
        "not which is better at convergence or at scale.",
        f"Training runs at length {p.input_length}/{f.input_length}{attention_caveat(cfg, analysis.variants)}; the "
        "benchmark's lengths measure cost, not quality. " + lengths_caveat(cfg, analysis.lengths),
        "Timings come from the machine that ran the pipeline; shared cores are noisy (hence the spread).",
        "Intervals are 95% intervals; with few seeds they are wide, and a verdict of no significant difference is "
        "not evidence that the variants are equal.",
    ]
    template = env.get_template(TEMPLATE)
    return template.render(
        title="Model variants compared: " + " versus ".join(analysis.variants),
        seeds_sentence=seeds_sentence,
        short=short_answer(analysis, bench),
        setup=setup,
        variants=analysis.variants,
        multi_seed=multi,
        interval_note="t over seeds; task metrics: also bootstrap over test examples, the wider of the two",
        collapse_marker=COLLAPSED,
        rows=analysis.rows,
        task_rows=analysis.task_rows,
        examples_note=f"at most {e.max_examples_per_task} per task, the same for every run",
        beams=", ".join(str(b) for b in sorted(e.num_beams)) + " (1: greedy)",
        baseline_legend="majority class and chance for classification, copy-the-input and most-frequent-output for "
        "generation; the cell shows the best of them",
        collapse_notes=collapse_notes,
        samples=samples,
        sample_seed=analysis.seeds[0],
        lra=lra_section(cfg, analysis),
        bench=bench,
        efficiency=efficiency(cfg, data, analysis),
        scaling=analysis.scaling,
        lengths=lengths_report(cfg, analysis),
        caveats=caveats,
    )


def lengths_report(cfg: Config, analysis: Analysis) -> dict[str, Any]:
    """What the report's "Quality versus length at matched compute" section shows."""
    from pipeline.budget import describe_budget

    s, section = cfg.lengths, analysis.lengths
    intro = (
        f"Task `{s.task}` scaled to fill each length ({s.fill[0]:g} to {s.fill[1]:g} of it in the task's unit; "
        f"longer inputs dropped, never truncated), trained at every length from each run's "
        f"{'pretrained weights' if s.init == 'pretrained' else 'fresh initialisation'} (`lengths.init`) with batch "
        f"{s.batch_size}, lr {s.optimizer.lr} ({s.optimizer.schedule}), **compute matched: {describe_budget(s)}** "
        f"(`lengths.budget`); seeds {list(s.seeds)} (`lengths.seeds`); then at most {s.eval_examples} test examples "
        "per length, the same for every run, decoded greedily."
    )
    if section.get("budget_kind") == "flops":
        intro += (
            " A variant whose step costs fewer FLOPs at a length takes more steps: the quality difference is the "
            "difference at equal training compute (each verdict says what was matched and what was not)."
        )
    else:
        intro += " A wall-clock budget depends on the machine and its load; the FLOPs each run reached are shown."
    variants = analysis.variants
    collapsed_everywhere = bool(section.get("levels")) and all(
        lv["row"].collapsed(v) for lv in section["levels"] for v in lv["row"].values
    )
    if len(s.seeds) == 1:
        interval_note = (
            f"bootstrap over the test examples only: one training seed per variant (`lengths.seeds: {list(s.seeds)}`)"
            ", so it says how sure the score of these trained models is, not how much a re-training would move it"
        )
    else:
        interval_note = "bootstrap over seeds and test examples, and t over seeds: the wider"
    return {
        "ran": bool(section.get("levels")),
        "interval_note": interval_note,
        "intro": intro,
        "levels": section.get("levels", []),
        "cells": lengths_cells(section, variants) if section.get("levels") else [],
        "figures": list(LENGTH_FIGURES),
        "figure_labels": [label for label, _ in LENGTH_FIGURES.values()],
        "missing": section.get("missing", []),
        "collapsed_everywhere": collapsed_everywhere,
    }


def lengths_caveat(cfg: Config, section: dict[str, Any]) -> str:
    """The caveat on what the quality-versus-length measurement can and cannot say at this budget."""
    if not section.get("levels"):
        return "Quality versus length at matched compute was not measured in this run (no `lengths` results)."
    lengths = ", ".join(str(lv["length"]) for lv in section["levels"])
    text = f"Quality versus length at matched compute is measured on `{section['task']}` at lengths {lengths}"
    if all(lv["row"].collapsed(v) for lv in section["levels"] for v in lv["row"].values):
        return text + (
            ", but every variant collapsed at every length: the budget is too small to learn the task, so the "
            "section shows cost, not quality (raise `lengths.budget.value`, or run `configs/lra_listops.yaml`)."
        )
    return text + "; a verdict there holds at that budget only."


def _documents(prep: dict[str, Any]) -> str:
    counts = {split: prep.get(split, {}).get("documents", 0) for split in ("train", "validation", "test")}
    return f"{prep.get('documents_kept', 0):,} documents (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")"


def _md(text: Any, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return (text[:limit] + " ...") if len(text) > limit else (text or "*(empty)*")


def _samples(data: dict[str, Any], analysis: Analysis, per_task: int = 3) -> dict[str, list[dict[str, Any]]]:
    """The first examples of each task with every variant's greedy answer (first seed)."""
    seed = analysis.seeds[0]
    key = f"beam{analysis.greedy_beam}"
    out: dict[str, list[dict[str, Any]]] = {}
    for variant in analysis.variants:
        for task, items in data["runs"][variant][seed].get("samples", {}).items():
            rows = out.setdefault(task, [])
            for i, item in enumerate(items[:per_task]):
                if i >= len(rows):
                    rows.append({"input": item["input"], "reference": item["reference"], "predictions": {}})
                rows[i]["predictions"][variant] = item.get(key, "")
    return out


def headline(analysis: Analysis, data: dict[str, Any]) -> dict[str, Any]:
    """`metrics/compare.json`: every row's statistics, collapse flags and verdicts, and the crossovers."""
    bench = data["benchmark"]
    return {
        "seeds": analysis.seeds,
        "metrics": {r.key: r.to_dict() for r in [*analysis.rows, *analysis.task_rows]},
        "collapsed": sorted(
            {f"{v}: {r.key}" for r in [*analysis.rows, *analysis.task_rows] for v in r.values if r.collapsed(v)}
        ),
        "crossovers": bench.get("crossovers", []),
        "scaling": scaling_metrics(analysis.scaling),
        "lengths": lengths_metrics(analysis.lengths),
    }


# --------------------------------------------------------------------------------------------- charts


def draw_charts(data: dict[str, Any], analysis: Analysis, out: Path) -> list[str]:
    """Every chart of the report into `out` (atomically, one by one); returns the file names."""
    from pipeline import charts

    curves = {
        stage: {
            v: {kind: [[(r["step"], r["loss"]) for r in run[f"{stage}_curves"][kind] if "step" in r and "loss" in r]
                       for run in data["runs"][v].values()] for kind in ("train", "val")}
            for v in analysis.variants
        }
        for stage in ("pretrain", "finetune")
    }  # fmt: skip
    panels: dict[str, dict[str, Any]] = {}
    for v in analysis.variants:
        tasks = {t for run in data["runs"][v].values() for t in run["confusion"]}
        for task in tasks:
            mats = [run["confusion"][task] for run in data["runs"][v].values() if task in run["confusion"]]
            panels.setdefault(task, {})[v] = sum_confusions(mats)
    palette = charts.colors(analysis.variants)  # one colour per variant, the same in every chart
    family_palette = charts.colors(list(analysis.scaling.get("families", {})))
    figures: dict[str, Callable[[Path], None]] = {
        "loss_curves.png": lambda path: charts.loss_curves(curves, path, palette),
        **{
            name: (lambda path, n=name: charts.benchmark_chart(data["benchmark_rows"], n, path, palette))
            for name in charts.BENCHMARK_CHARTS
        },
        "confusion_matrices.png": lambda path: charts.confusion_grid(panels, path),
        "scaling_curves.png": lambda path: charts.scaling_curves(
            analysis.scaling.get("families", {}), path, family_palette
        ),
        "quality_vs_length.png": lambda path: charts.quality_vs_length(
            lengths_chart_points(analysis.lengths),
            "accuracy (greedy)",
            f"{analysis.lengths.get('task', '')}: quality vs length, same budget per length",
            path,
            palette,
        ),
    }
    for name, draw in figures.items():
        with atomic_output(out / name) as tmp:
            draw(tmp)
    return list(figures)


# ---------------------------------------------------------------------------------------------- stage


def log_to_mlflow(cfg: Config, root: Path, report_dir: Path, metrics: dict[str, Any], report: str) -> str | None:
    """The comparison run: description = the report, artifacts = report and plots, tags naming the runs compared."""
    from pipeline.tracking import TrackedRun, check_tracking_uri, git_revision, tracked_run, tracking_uri

    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)
    run = TrackedRun(uri, cfg.mlflow.experiment, system_metrics=False)
    tags = {
        "stage": "compare",
        "variant": "all",
        "family": "all",
        "seed": "all",
        "git_revision": git_revision(root),
        "mlflow.note.content": report,
    }
    from pipeline.mlflow_logging import context_tags  # the DVC experiment, nested under the execution's parent

    tags.update(context_tags(uri, cfg.mlflow.experiment, tags["git_revision"], preset=cfg.preset))
    for variant in cfg.models:
        for seed in cfg.seeds:
            for stage in ("pretrain", "finetune"):
                paths = RunPaths(root, stage, variant, seed)
                run_id = _optional_json(paths.timing).get("mlflow_run_id")
                if run_id:
                    tags[f"{stage}_{paths.label}_run_id"] = run_id
    flat = {}
    for key, row in metrics["metrics"].items():
        for v, stats in row["variants"].items():
            flat[f"compare/{key}/{v}/mean"] = stats["mean"]
            flat[f"compare/{key}/{v}/collapsed"] = float(stats["collapsed"])
    with tracked_run(run, "comparison", tags):
        run.log_metrics({k.replace("@", "_"): float(v) for k, v in flat.items() if isinstance(v, int | float)})
        run.log_artifacts(report_dir, "report")
    return run.run_id


def compare(cfg: Config, root: Path) -> dict[str, Any]:
    """The whole stage: gather, analyse, render, draw, write, log."""
    from pipeline.tracking import check_tracking_uri, tracking_uri

    start = time.perf_counter()
    check_tracking_uri(tracking_uri(cfg.mlflow.tracking_uri, root), cfg.mlflow.connect_timeout_s)  # fail fast
    data = gather(cfg, root)
    analysis = analyze(cfg, data)
    report = render_report(cfg, data, analysis)
    metrics = headline(analysis, data)
    out = root / REPORT_DIR
    names = draw_charts(data, analysis, out)
    with publish() as pub, tempfile.TemporaryDirectory() as staging:  # report, metrics, MLflow run: together
        pub.write_text(out / "comparison.md", report)
        pub.write_json(stage_metrics(root, "compare"), metrics)
        for name in names:  # the MLflow run carries exactly the report and its plots
            shutil.copy2(out / name, Path(staging) / name)
        (Path(staging) / "comparison.md").write_text(report, encoding="utf-8")
        run_id = log_to_mlflow(cfg, root, Path(staging), metrics, report)
    log.info("compare: reports/comparison.md written, MLflow run %s (%.1f s)", run_id, time.perf_counter() - start)
    return metrics


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    return compare(cfg, repo_root())


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Side-by-side report of every variant (reports/comparison.md, MLflow)."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
