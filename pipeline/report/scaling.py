"""Scaling: final pretraining loss against training compute, one curve per family through its sizes, and which
family is ahead at each compute level (Tay et al. 2022 compare architectures by such curves, not by one point).

A family's curve is its variants (sizes) ordered by compute; it needs two sizes or more. Two families are compared at
a compute level where a variant of each lies within `MATCH_FACTOR` in FLOPs; one is named ahead only where the 95%
intervals of the two mean losses do not overlap. A run's FLOPs: what it saved itself, or its target tokens times the
family's own accounting (`FamilySpec.training_flops`) per target token.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Config
from pipeline.report.stats import t_interval

if TYPE_CHECKING:
    from pipeline.report.analysis import Analysis

MATCH_FACTOR = 2.0  # two sizes of different families are "the same compute level" within this factor of FLOPs


SCALING_EXAMPLE = (
    "models:\n"
    "  {family}: ...            # as it is\n"
    "  {family}_small:          # the same family one size up: every field as in `{family}`, null = the preset's\n"
    "    family: {family}\n"
    "    preset: small\n"
    "    ...\n"
)


def vocab_size(cfg: Config, data: dict[str, Any]) -> int:
    vocab = data["tokenize"].get("vocab_size", cfg.tokenizer.vocab_size)
    return -(-int(vocab) // 128) * 128


def flops_per_target_token(cfg: Config, variant: str, vocab_size: int) -> float:
    """Training FLOPs per target token of `variant` under the pretraining objective, from the family's own
    accounting (`FamilySpec.training_flops`, a function of the config) at the configured shapes."""
    from models import spec
    from pipeline.data.objectives import span_corruption_lengths

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
                    per_token[variant] = flops_per_target_token(cfg, variant, vocab_size(cfg, data))
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
