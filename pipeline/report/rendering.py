"""The report's words, tables and charts, from an `Analysis`: `reports/comparison.md` rendered from
`pipeline/report/templates/comparison.md.j2`, and its charts (`pipeline/report/charts.py`): `loss_curves.png`,
`speed_vs_length.png`, `memory_vs_length.png`, `memory_vs_depth.png`, `confusion_matrices.png`,
`scaling_curves.png`, `quality_vs_length.png`, `evaluation_attention.png`, every variant in one colour throughout.
Nothing here computes a statistic: the numbers are `pipeline/report/analysis.py`'s (and `metrics/compare.json`'s).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.common import atomic_output
from pipeline.config import Config
from pipeline.report.analysis import (
    COLLAPSED,
    LENGTH_FIGURES,
    Analysis,
    _verdicts,
    lengths_cells,
    lengths_chart_points,
)
from pipeline.report.inputs import sum_confusions
from pipeline.report.scaling import vocab_size

TEMPLATE = "comparison.md.j2"


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


def layouts(cfg: Config, data: dict[str, Any]) -> dict[str, str]:
    """Each variant's actual layout in words (from its resolved config, not assumed)."""
    out = {}
    for variant in cfg.models:
        layout = getattr(cfg.model_config(variant, vocab_size(cfg, data)), "layout", "encoder_decoder")
        out[variant] = LAYOUTS.get(layout, layout)
    return out


def efficiency(cfg: Config, data: dict[str, Any], analysis: Analysis) -> list[tuple[str, dict[str, str]]]:
    """Parameters, FLOPs per token, measured tokens/s and peak memory per variant, side by side (Dehghani et
    al. 2021: no single one of them is the cost)."""
    from models import build_model, spec
    from pipeline.data.objectives import span_corruption_lengths

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
        config = cfg.model_config(variant, vocab_size(cfg, data))
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
        lines += [f"**Quality crossover** (at matched compute), {c['text']}" for c in section.get("crossovers", [])]
    lines += bench["sentences"]
    return lines


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
        attention=attention_report(cfg, analysis),
        caveats=caveats,
    )


def attention_report(cfg: Config, analysis: Analysis) -> dict[str, Any]:
    """The "Evaluation-time attention" section: per task, each variant as trained (rows, with its own values of the
    fields the settings change) against each setting (columns), mean [95% interval] of the task metric."""
    section = analysis.attention
    if not section:
        return {"ran": False}
    fields = sorted({f for fields in section["settings"].values() for f in fields})
    legend = [
        f"`{name}`: " + ", ".join(f"{k} = {v}" for k, v in fs.items()) for name, fs in section["settings"].items()
    ]
    tasks = []
    for task, t in section["tasks"].items():
        rows = []
        for variant, row in t["rows"].items():
            config = cfg.model_config(variant)
            own = ", ".join(f"{f} {getattr(config, f)}" for f in fields if hasattr(config, f))
            cells = [row[c].format() if c in row and row[c].has_interval else
                     (f"{row[c].mean:.3f}" if c in row else "—") for c in section["columns"]]  # fmt: skip
            rows.append({"label": f"{variant} ({own})" if own else variant, "cells": cells})
        best = max(t["baselines"], key=t["baselines"].get) if t["baselines"] else ""
        baseline = f"{t['baselines'][best]:.3f} ({best.replace('_', ' ')})" if best else "—"
        tasks.append({"task": task, "metric": t["metric"].replace("_", " "), "rows": rows, "baseline": baseline})
    return {"ran": True, "columns": section["columns"], "legend": legend, "tasks": tasks}


def lengths_report(cfg: Config, analysis: Analysis) -> dict[str, Any]:
    """What the report's "Quality versus length at matched compute" section shows."""
    from pipeline.training.budget import describe_budget

    s, section = cfg.lengths, analysis.lengths
    dropout = "each model's own dropout" if s.dropout is None else f"dropout {s.dropout:g} for every variant"
    intro = (
        f"Task `{s.task}` scaled to fill each length ({s.fill[0]:g} to {s.fill[1]:g} of it in the task's unit; "
        f"longer inputs dropped, never truncated), trained at every length from each run's "
        f"{'pretrained weights' if s.init == 'pretrained' else 'fresh initialisation'} (`lengths.init`) with batch "
        f"{s.batch_size}, lr {s.optimizer.lr} ({s.optimizer.schedule}), "
        f"{dropout} (`lengths.dropout`), **compute matched: {describe_budget(s)}** "
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
        "crossovers": section.get("crossovers", []),
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


def draw_charts(data: dict[str, Any], analysis: Analysis, out: Path) -> list[str]:
    """Every chart of the report into `out` (atomically, one by one); returns the file names."""
    from pipeline.report import charts

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
        "evaluation_attention.png": lambda path: charts.attention_grid(analysis.attention, path),
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
