"""The numbers of the comparison: every row's statistics over seeds, collapse flags, verdicts and what they matched,
the scaling curves and quality versus length, as `metrics/compare.json` holds them.

The statistics (`pipeline/report/stats.py`):
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
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.report.scaling import run_flops, scaling, scaling_metrics
from pipeline.report.stats import (
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

# one definition per label: each speed figure of the report says what it counts
PRETRAIN_SPEED = "pretraining speed: input + target tokens per second of training (validation excluded)"


BENCH_SPEED = "input tokens per second of one training step (benchmark, random tokens)"


LENGTHS_SPEED = "input positions per second of training at this length (padding included)"


COLLAPSED = "**collapsed**"


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
    values = {v: t_interval(list(s.values()), lower=0.0) for v, s in per_variant.items() if s}  # all non-negative
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
    attention: dict[str, Any] = field(default_factory=dict)
    """Train x evaluation-time attention settings (`attention_table`); empty when none ran."""
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
    analysis.attention = attention_table(cfg, data, variants)
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
        summary = {  # counts, FLOPs, seconds, speeds, memory: none below 0
            v: {f: t_interval(list(x.values()), lower=0.0) for f, x in figs.items()} for v, figs in figures.items()
        }
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
    return {
        "task": s.task,
        "budget_kind": kind,
        "unit": unit,
        "levels": levels,
        "missing": missing,
        "crossovers": quality_crossovers(levels),
    }


def quality_crossovers(levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per compared pair, where the variant ahead at matched compute changes as the length grows.

    Only lengths with a winner (a significant difference, or one variant collapsed) place a crossover: it lies
    between the last length won by one variant and the next won by the other, and the lengths between them, which
    have no winner, are its uncertainty. Without a change, the text says who is ahead where, and where the
    comparison has no answer (so a crossover there is not ruled out). `between`: the two lengths around each change.
    """
    pairs: list[tuple[str, str]] = []
    for lv in levels:
        pairs += [(a, b) for a, b, _ in lv["row"].verdicts if (a, b) not in pairs]
    out = []
    for a, b in pairs:
        steps = [(lv["length"], v) for lv in levels for x, y, v in lv["row"].verdicts if (x, y) == (a, b)]
        decided = [(length, v.winner) for length, v in steps if v.winner]
        changes = [(l1, w1, l2, w2) for (l1, w1), (l2, w2) in itertools.pairwise(decided) if w1 != w2]
        where: dict[str, list[str]] = {}
        for length, v in steps:
            label = f"{v.winner} ahead" if v.winner else _NO_WINNER.get(v.kind, v.kind)
            where.setdefault(label, []).append(f"{length:,}")
        detail = "; ".join(f"{label} at {', '.join(ls)}" for label, ls in where.items())
        lo, hi = steps[0][0], steps[-1][0]
        if changes:
            parts = []
            for l1, w1, l2, w2 in changes:
                between = [f"{length:,}" for length, v in steps if l1 < length < l2]
                parts.append(
                    f"between {l1:,} and {l2:,} tokens ({w1} ahead at {l1:,}, {w2} at {l2:,}"
                    + (f"; no winner at {', '.join(between)} between them" if between else "")
                    + ")"
                )
            text = f"{a} vs {b}: the variant ahead changes " + ", and ".join(parts) + f". Per length: {detail}."
        elif decided:
            winners = {w for _, w in decided}
            (winner,) = winners
            last = decided[-1][0]
            text = f"{a} vs {b}: no crossover from {lo:,} to {hi:,} tokens: where one is ahead, it is {winner}"
            if last < hi:
                text += (
                    f"; beyond {last:,} tokens the comparison has no answer at this budget, so a crossover there "
                    "is not ruled out"
                )
            text += f". Per length: {detail}."
        else:
            text = f"{a} vs {b}: no crossover can be placed: no length from {lo:,} to {hi:,} has a winner ({detail})."
        out.append({"pair": f"{a} vs {b}", "between": [[l1, l2] for l1, _, l2, _ in changes], "text": text})
    return out


_NO_WINNER = {  # how `quality_crossovers` names a length whose verdict has no winner
    "both_collapsed": "no answer (both collapsed)",
    "not_significant": "no significant difference",
    "no_interval": "no winner (one seed)",
}


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
        "crossovers": section.get("crossovers", []),
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


AS_TRAINED = "as trained"


def attention_table(cfg: Config, data: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """Train x evaluation: for every task, each variant (rows, as it was trained) scored under each evaluation-time
    attention setting (`evaluate.attention`, columns; `as trained` first), greedy, mean over seeds with the 95%
    interval of a bootstrap over seeds and test examples (and t over seeds with two or more: the wider). Empty
    when no setting ran."""
    settings = list(cfg.evaluate.attention)
    if not settings:
        return {}
    greedy = str(min(cfg.evaluate.num_beams))
    tables: dict[str, Any] = {}
    for variant in variants:
        for run in data["runs"][variant].values():
            for task, entry in run["examples"].items():
                table = tables.setdefault(task, {"metric": entry["metric"], "baselines": entry.get("baselines", {}),
                                                 "scores": {}})  # fmt: skip
                cells = table["scores"].setdefault(variant, {})
                if greedy in entry.get("beams", {}):
                    cells.setdefault(AS_TRAINED, []).append(entry["beams"][greedy]["scores"])
                for setting, result in (entry.get("attention") or {}).items():
                    cells.setdefault(setting, []).append(result["scores"])
    out = {"columns": [AS_TRAINED, *settings], "settings": dict(cfg.evaluate.attention), "tasks": {}}
    for task, table in tables.items():
        if not any(s in cells for cells in table["scores"].values() for s in settings):
            continue
        rows = {}
        for variant, cells in table["scores"].items():
            row = {}
            for column, per_seed in cells.items():
                iv = bootstrap_interval([np.asarray(x, dtype=float) for x in per_seed])
                if len(per_seed) >= 2:
                    iv = union(iv, t_interval([float(np.mean(x)) for x in per_seed]))
                if iv.has_interval:
                    iv = Interval(iv.mean, max(iv.low, 0.0), min(iv.high, 1.0), iv.n, iv.method)  # type: ignore[type-var]
                row[column] = iv
            rows[variant] = row
        out["tasks"][task] = {"metric": table["metric"], "baselines": table["baselines"], "rows": rows}
    return out


def attention_metrics(section: dict[str, Any]) -> dict[str, Any]:
    """The train x evaluation table as plain data for `metrics/compare.json`."""
    if not section:
        return {}
    return {
        "columns": section["columns"],
        "settings": section["settings"],
        "tasks": {
            task: {
                "metric": t["metric"],
                "baselines": t["baselines"],
                "rows": {v: {c: iv.to_dict() for c, iv in row.items()} for v, row in t["rows"].items()},
            }
            for task, t in section["tasks"].items()
        },  # fmt: skip
    }


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
        "attention": attention_metrics(analysis.attention),
    }
