"""Stage `compare`: the answer in the forms people read, `reports/comparison.md` with its plots, and MLflow.

    python -m pipeline.compare

Reads what the other stages wrote for every variant V of `models:` and seed S of `seeds:` (nothing is
recomputed, so the stage takes seconds; paths from `pipeline/paths.py`): `metrics/{prepare,tokenize}.json`,
`metrics/{pretrain,finetune}/V-S.json` and their `-train.csv`/`-val.csv` loss histories,
`artifacts/{pretrain,finetune}/V/S/final/training.json` (wall time, throughput), `metrics/evaluate/V-S.json` and
`artifacts/eval/V/S/confusion_<task>.json`, `metrics/benchmark.json` and `artifacts/benchmark/results.json`.
Each variant's figures are the mean over its seeds (loss curves: the mean at each step; confusion matrices: the
counts summed).

Writes `reports/comparison.md` (verdict, setup, side-by-side table, task metrics, speed and memory per length,
caveats) and `reports/loss_curves.png`, `reports/speed_vs_length.png`, `reports/memory_vs_length.png`,
`reports/memory_vs_depth.png`, `reports/confusion_matrices.png`; `metrics/compare.json` (the headline numbers,
for `dvc metrics diff`); and one MLflow run `comparison` (tag stage=compare) in the pipeline's experiment whose
description is the report and whose artifacts are the report and the plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.common import StageError, atomic_output, repo_root, run_stage, stage_parser, write_json
from pipeline.config import Config
from pipeline.paths import RunPaths, stage_metrics

log = logging.getLogger("pipeline.compare")

REPORT_DIR = Path("reports")
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def color(data: dict[str, Any], variant: str) -> str:
    """A variant's colour on every chart (by its position in `models:`)."""
    return COLORS[list(data["variants"]).index(variant) % len(COLORS)]


# -------------------------------------------------------------------------------------------- inputs


def read_json(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path} not found: run `dvc repro {stage}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict[str, float]]:
    """Rows of a numeric CSV (empty cells dropped); [] when the file does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def gather_run(root: Path, variant: str, seed: int) -> dict[str, Any]:
    """What one (variant, seed) run left behind: stage metrics, timings, loss curves, evaluation, confusions."""
    run: dict[str, Any] = {}
    for stage in ("pretrain", "finetune"):
        paths = RunPaths(root, stage, variant, seed)
        run[stage] = read_json(paths.metrics, paths.dvc_stage())
        timing = paths.final / "training.json"
        run[f"{stage}_timing"] = json.loads(timing.read_text()) if timing.is_file() else {}
        run[f"{stage}_train_curve"] = read_csv(paths.history("train"))
        run[f"{stage}_val_curve"] = read_csv(paths.history("val"))
    ev = RunPaths(root, "evaluate", variant, seed)
    run["eval"] = read_json(ev.metrics, ev.dvc_stage())
    run["confusion"] = {}
    for path in sorted(ev.out.glob("confusion_*.json")):
        run["confusion"][path.stem.removeprefix("confusion_")] = json.loads(path.read_text())
    return run


def mean_over_seeds(runs: list[Any]) -> Any:
    """Numbers averaged, mappings merged key by key, loss curves averaged step by step; other values: the first."""
    first = runs[0]
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in runs):
        return sum(runs) / len(runs)
    if all(isinstance(r, dict) for r in runs):
        keys = [k for k in first if all(k in r for r in runs)]
        return {k: mean_over_seeds([r[k] for r in runs]) for k in keys}
    if all(isinstance(r, list) for r in runs) and first and all(isinstance(x, dict) and "step" in x for x in first):
        by_step: dict[float, list[dict[str, float]]] = {}
        for r in runs:
            for row in r:
                by_step.setdefault(row["step"], []).append(row)
        return [mean_over_seeds(rows) for _, rows in sorted(by_step.items()) if len(rows) == len(runs)]
    return first


def sum_confusions(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Confusion matrices of the same task summed over seeds (labels merged, in first-seen order)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(t for r in runs for t in r):
        labels = list(dict.fromkeys(lab for r in runs if task in r for lab in r[task]["labels"]))
        matrix = [[0] * len(labels) for _ in labels]
        for r in runs:
            if task not in r:
                continue
            idx = [labels.index(lab) for lab in r[task]["labels"]]
            for i, row in enumerate(r[task]["matrix"]):
                for j, count in enumerate(row):
                    matrix[idx[i]][idx[j]] += count
        out[task] = {"labels": labels, "matrix": matrix}
    return out


def gather(cfg: Config, root: Path) -> dict[str, Any]:
    """Everything the report shows: per variant, the mean over `cfg.seeds` of each run's figures."""
    data: dict[str, Any] = {"variants": {}, "seeds": list(cfg.seeds)}
    for name in ("prepare", "tokenize"):
        path = stage_metrics(root, name)
        data[name] = json.loads(path.read_text()) if path.is_file() else {}
    for variant in cfg.models:
        runs = [gather_run(root, variant, seed) for seed in cfg.seeds]
        merged = mean_over_seeds([{k: v for k, v in r.items() if k != "confusion"} for r in runs])
        merged["confusion"] = sum_confusions([r["confusion"] for r in runs])
        data["variants"][variant] = merged
    data["benchmark"] = read_json(stage_metrics(root, "benchmark"), "benchmark")
    data["benchmark_rows"] = read_json(root / "artifacts" / "benchmark" / "results.json", "benchmark")["rows"]
    return data


# -------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(data: dict[str, Any], path: Path) -> None:
    """Pretraining and fine-tuning loss of every variant on shared axes (solid: train, dashed: validation)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, ("pretrain", "finetune"), strict=True):
        for variant, fam in data["variants"].items():
            for kind, style in (("train", "-"), ("val", "--")):
                rows = [r for r in fam[f"{stage}_{kind}_curve"] if "step" in r and "loss" in r]
                if rows:
                    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
                    marker = "o" if kind == "val" else None
                    ax.plot(steps, losses, style, color=color(data, variant), marker=marker, label=f"{variant} {kind}")
        ax.set_title(f"{stage} loss (nats per target token, mean over seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


BENCHMARK_CHARTS = {
    "speed_vs_length.png": ("length", "seq_length", "tokens_per_s", "training tokens/s (higher is better)"),
    "memory_vs_length.png": ("length", "seq_length", "step_mb", "memory of a training step, MiB"),
    "memory_vs_depth.png": ("depth", "num_layers", "step_mb", "memory of a training step, MiB"),
}


def plot_benchmark(rows: list[dict[str, Any]], name: str, path: Path) -> None:
    """One of `BENCHMARK_CHARTS`: every variant on one chart (log-log against length)."""
    plt = _plt()
    kind, axis, key, ylabel = BENCHMARK_CHARTS[name]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        pts = sorted((r[axis], r[key]) for r in rows if r["kind"] == kind and r["variant"] == variant and key in r)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", color=COLORS[i % len(COLORS)], label=variant)
    if kind == "length":
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (input tokens; targets L/4)")
        ax.set_title(ylabel.split(",")[0].split(" (")[0] + " vs sequence length")
    else:
        length = next((r["seq_length"] for r in rows if r["kind"] == "depth"), "?")
        ax.set_xlabel("layers per stack")
        ax.set_title(f"memory vs depth (length {length})")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_confusions(data: dict[str, Any], path: Path) -> None:
    """Every classification task's confusion matrix (summed over seeds), one row per task, one column per variant."""
    plt = _plt()
    tasks = sorted({t for fam in data["variants"].values() for t in fam["confusion"]})
    variants = list(data["variants"])
    if not tasks:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no classification task in finetune.tasks", ha="center", va="center")
    else:
        fig, axes = plt.subplots(len(tasks), len(variants), figsize=(5.5 * len(variants), 4.8 * len(tasks)))
        axes = [[axes]] if len(tasks) == 1 and len(variants) == 1 else axes
        axes = [axes] if len(tasks) == 1 else axes
        for i, task in enumerate(tasks):
            for j, variant in enumerate(variants):
                ax = axes[i][j]
                cm = data["variants"][variant]["confusion"].get(task)
                if not cm:
                    ax.axis("off")
                    continue
                labels, matrix = cm["labels"], cm["matrix"]
                ax.imshow(matrix, cmap="Blues")
                ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
                ax.set_yticks(range(len(labels)), labels, fontsize=8)
                peak = max((max(r) for r in matrix), default=0)
                for a, row in enumerate(matrix):
                    for b, count in enumerate(row):
                        if count:
                            color = "white" if count > peak / 2 else "black"
                            ax.text(b, a, str(count), ha="center", va="center", fontsize=7, color=color)
                ax.set_title(f"{variant}: {task} (all seeds)")
                ax.set_xlabel("predicted")
                ax.set_ylabel("actual")
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------- report


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _winner(values: dict[str, float | None], higher_is_better: bool) -> str:
    known = {k: v for k, v in values.items() if v is not None}
    if len(known) < 2:
        return "—"
    ranked = sorted(known.items(), key=lambda kv: kv[1], reverse=higher_is_better)
    (best, b), (_, other) = ranked[0], ranked[1]
    if b == other:
        return "tie"
    if other:
        ratio = b / other if higher_is_better else other / b
        if ratio and abs(ratio) != float("inf"):
            return f"{best} (x{ratio:.2f})"
    return best


def task_metric_rows(data: dict[str, Any], beams: list[int]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(task, metric key, {family: value}) for each task's headline metric and each beam size."""
    from pipeline.tasks import get_task

    rows = []
    tasks = sorted({t for f in data["variants"].values() for t, v in f["eval"].items() if isinstance(v, dict)})
    for task in tasks:
        try:
            metric = get_task(task).metric
        except KeyError:
            first = next(f["eval"][task] for f in data["variants"].values() if task in f["eval"])
            metric = next(k.rsplit("_beam", 1)[0] for k in first if "_beam" in k)
        for b in beams:
            key = f"{metric}_beam{b}"
            rows.append((task, key, {v: fam["eval"].get(task, {}).get(key) for v, fam in data["variants"].items()}))
    return rows


def render_report(cfg: Config, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the headline numbers (`metrics/compare.json`)."""
    fams = data["variants"]
    ref = next(iter(fams))
    others = [v for v in fams if v != ref]
    bench = data["benchmark"]
    p, f = cfg.pretrain, cfg.finetune
    headline: dict[str, Any] = {}

    def each(getter) -> dict[str, Any]:
        out = {}
        for family, fam in fams.items():
            try:
                out[family] = getter(fam)
            except (KeyError, TypeError):
                out[family] = None
        return out

    params = each(lambda x: x["pretrain"]["parameters"])
    non_emb = each(lambda x: x["pretrain"]["non_embedding_parameters"])
    rows: list[tuple[str, dict[str, Any], str]] = [
        ("family", {k: cfg.models[k].family for k in fams}, "—"),
        ("preset", {k: cfg.models[k].preset for k in fams}, "—"),
        ("parameters (total)", params, "—"),
        ("parameters (non-embedding)", non_emb, "—"),
        ("pretraining tokens seen (targets)", each(lambda x: x["pretrain"]["tokens"]), "—"),
        ("pretraining wall time (s)", each(lambda x: x["pretrain_timing"]["wall_time_s"]), "lower"),
        ("pretraining throughput (tokens/s)", each(lambda x: x["pretrain_timing"]["tokens_per_s"]), "higher"),
        ("final pretraining train loss", each(lambda x: x["pretrain"]["train_loss"]), "lower"),
        ("final pretraining validation loss", each(lambda x: x["pretrain"]["val_loss"]), "lower"),
        ("test loss (pretraining objective)", each(lambda x: x["eval"]["test_loss"]), "lower"),
        ("test perplexity", each(lambda x: x["eval"]["test_ppl"]), "lower"),
        ("fine-tuning tokens seen (targets)", each(lambda x: x["finetune"]["tokens"]), "—"),
        ("fine-tuning wall time (s)", each(lambda x: x["finetune_timing"]["wall_time_s"]), "lower"),
        ("final fine-tuning validation loss", each(lambda x: x["finetune"]["val_loss"]), "lower"),
    ]
    for task, key, values in task_metric_rows(data, list(cfg.evaluate.num_beams)):
        rows.append((f"{task}: {key.replace('_beam', ', beam ')}", values, "higher"))
    for family in fams:
        headline[f"{family}_test_loss"] = (fams[family]["eval"] or {}).get("test_loss")
    table = ["| | " + " | ".join(fams) + " | better |", "| --- | " + " | ".join("---:" for _ in fams) + " | --- |"]
    for name, values, direction in rows:
        verdict = "—" if direction == "—" else _winner(values, direction == "higher")
        table.append(f"| {name} | " + " | ".join(_num(values.get(k)) for k in fams) + f" | {verdict} |")

    per_length = bench.get("per_length", {})
    cols = [f"{v} tokens/s" for v in fams] + [f"{v}/{ref} speed" for v in others]
    cols += [f"{v} step MiB" for v in fams] + [f"{v}/{ref} memory" for v in others]
    bench_table = ["| length | " + " | ".join(cols) + " |", "| ---: |" + " ---: |" * len(cols)]
    for n in sorted(per_length, key=int):
        e = per_length[n]
        cells = [_num(e.get(f"{v}_tokens_per_s"), 0) for v in fams]
        cells += [_num(e.get(f"speed_ratio_{v}_over_{ref}"), 2) for v in others]
        cells += [_num(e.get(f"{v}_step_mb"), 0) for v in fams]
        cells += [_num(e.get(f"memory_ratio_{v}_over_{ref}"), 2) for v in others]
        bench_table.append(f"| {n} | " + " | ".join(cells) + " |")
    notes = sorted({f"{r['variant']} at {r['seq_length']}: {r.get('error') or r.get('skipped')}" for r in
                    data["benchmark_rows"] if r["kind"] == "length" and ("error" in r or "skipped" in r)})  # fmt: skip
    speed_x, memory_x = bench.get("speed_crossover_length") or {}, bench.get("memory_crossover_length") or {}
    compared = bench.get("compared_lengths") or {}
    for v in others:
        headline[f"speed_crossover_length_{v}"] = speed_x.get(v)
        headline[f"memory_crossover_length_{v}"] = memory_x.get(v)
        headline[f"non_embedding_ratio_{v}_over_{ref}"] = (bench.get("non_embedding_ratio_over_reference") or {}).get(v)

    def crossover_sentence(variant: str, value: int | None, what: str) -> str:
        lengths = compared.get(variant) or []
        if not lengths:
            return f"`{variant}`: not measured (no length measured for both within the benchmark's time budget)"
        scope = f"lengths measured for both: {', '.join(map(str, lengths))}"
        if value is None:
            return f"`{variant}` never {what} `{ref}` ({scope})"
        if value == min(lengths):
            return f"`{variant}` {what} `{ref}` at every length measured ({scope})"
        return f"`{variant}` {what} `{ref}` from length **{value}** on ({scope})"

    test_losses = {k: (v["eval"] or {}).get("test_loss") for k, v in fams.items()}
    best_loss = _winner(test_losses, higher_is_better=False)
    task_wins = {}
    for task, _key, values in task_metric_rows(data, [min(cfg.evaluate.num_beams)]):
        task_wins[task] = _winner(values, True)
    tokens = p.max_steps * p.batch_size * p.input_length
    prep, tok = data["prepare"], data["tokenize"]

    lines = [
        f"# Model variants compared: {', '.join(fams)}",
        "",
        "Generated by `dvc repro` (stage `compare`, `pipeline/compare.py`) from the metrics of the other stages; "
        f"do not edit by hand. Every figure of a variant is the mean over seeds {data['seeds']}.",
        "",
        "## The answer in short",
        "",
        f"- **Quality at this budget** (test loss under the pretraining objective, lower is better): {best_loss}.",
        "- **Fine-tuning tasks** (greedy decoding): " + "; ".join(f"`{t}`: {w}" for t, w in task_wins.items()) + ".",
        *(f"- **Speed**: {crossover_sentence(v, speed_x.get(v), 'trains faster than')}." for v in others),
        *(f"- **Memory**: {crossover_sentence(v, memory_x.get(v), 'needs less memory than')}." for v in others),
        "- **Model sizes**, non-embedding parameters: "
        + ", ".join(f"`{v}` {_num(non_emb.get(v))}" for v in fams)
        + f" (the reference for ratios is `{ref}`, the first variant in params.yaml).",
        "",
        "## Setup",
        "",
        "- Models: "
        + ", ".join(f"`models.{v}` ({cfg.models[v].family}, preset `{cfg.models[v].preset}`)" for v in fams)
        + f"; the same SentencePiece vocabulary ({_num(tok.get('vocab_size', cfg.tokenizer.vocab_size))} pieces "
        f"incl. {cfg.tokenizer.num_sentinels} sentinels); seeds {data['seeds']}.",
        f"- Data: source `{cfg.data.source}`"
        + (
            f", {_num(prep.get('documents_kept'))} documents kept of {_num(prep.get('documents_read'))} read "
            f"(train {_num(prep.get('train', {}).get('documents'))}, validation "
            f"{_num(prep.get('validation', {}).get('documents'))}, test {_num(prep.get('test', {}).get('documents'))})"
            if prep
            else ""
        )
        + "; split by document.",
        f"- Pretraining: `{p.objective}` (noise {p.noise_density}, mean span {p.mean_noise_span_length}), "
        f"{p.max_steps} steps x batch {p.batch_size} x {p.input_length} input tokens = {tokens:,} input tokens per "
        f"run, {p.optimizer.name} lr {p.optimizer.lr} ({p.optimizer.schedule}), identical for every variant.",
        f"- Fine-tuning: tasks {', '.join(f'`{t}`' for t in f.tasks)} mixed `{f.mixing}`, {f.max_steps} steps x "
        f"batch {f.batch_size}, from each run's own pretrained weights (`finetune.init: {f.init}`).",
        f"- Evaluation: `{cfg.evaluate.split}` split, at most {cfg.evaluate.max_examples_per_task} examples per task, "
        f"beams {cfg.evaluate.num_beams}, up to {cfg.evaluate.max_new_tokens} new tokens.",
        "",
        "## Side by side",
        "",
        *table,
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Speed and memory versus sequence length",
        "",
        f"One training step (AdamW, batch {cfg.benchmark.batch_size}, L input tokens and L/4 target tokens, random "
        "tokens), each measurement in its own process; memory is the step's own peak above the loaded model and "
        f"optimizer. Ratios above 1 mean the variant is faster (speed) or uses more memory (memory) than `{ref}`.",
        "",
        *bench_table,
        "",
        *(["Not measured: " + "; ".join(notes) + ".", ""] if notes else []),
        "Crossovers against `"
        + ref
        + "`: "
        + "; ".join(f"`{v}` speed **{_num(speed_x.get(v))}**, memory **{_num(memory_x.get(v))}**" for v in others)
        + " (the shortest length from which the variant wins at every longer measured length; — means it did not "
        "happen in the measured range).",
        "",
        "![speed vs length](speed_vs_length.png) ![memory vs length](memory_vs_length.png)",
        "",
        "![memory vs depth](memory_vs_depth.png)",
        "",
        "## Confusion matrices (classification tasks, greedy decoding)",
        "",
        "![confusion matrices](confusion_matrices.png)",
        "",
        "Sample generations of each task: `artifacts/eval/<variant>/<seed>/samples.md`.",
        "",
        "## Caveats",
        "",
        f"- Tiny models and a tiny budget ({tokens:,} pretraining input tokens): the losses show which model "
        "learns faster at the very start of training, not which is better at convergence or at scale.",
        "- Pretraining and fine-tuning use short sequences (length "
        f"{p.input_length}/{f.input_length}), where efficient attention (LSH, local) brings no saving; its "
        "advantage can only show at the lengths of the benchmark, which measures speed and memory, not quality.",
        "- Timings come from the machine that ran the pipeline (shared CPU cores are noisy); compare ratios, "
        "not absolute numbers, and re-run `dvc repro benchmark` on the target hardware.",
        f"- Means over {len(data['seeds'])} seed(s); LSH attention hashes with random rotations, so its runs vary "
        "with the seed more than full attention's.",
        "- Task metrics come from at most "
        f"{cfg.evaluate.max_examples_per_task} test examples per task: differences of a few points are noise.",
        "",
        "## Reproduce and explore",
        "",
        "`dvc repro` rebuilds everything; `dvc metrics show`, `dvc plots show` (loss curves, speed and memory "
        "versus length, confusion matrices), `dvc exp run -S models.<variant>.<field>=...` then `dvc exp show` / "
        "`dvc metrics diff` compare variants; `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db` shows the "
        "runs (see `docs/results.md`).",
        "",
    ]
    return "\n".join(lines), headline


# ---------------------------------------------------------------------------------------------- stage


def log_to_mlflow(cfg: Config, root: Path, report_dir: Path, headline: dict[str, Any], report: str) -> str | None:
    """The comparison run: description = the report, artifacts = report and plots, tags naming the runs compared."""
    from pipeline.tracking import TrackedRun, check_tracking_uri, git_revision, tracking_uri

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
    for variant in cfg.models:
        for seed in cfg.seeds:
            for stage in ("pretrain", "finetune"):
                paths = RunPaths(root, stage, variant, seed)
                timing = paths.final / "training.json"
                if timing.is_file():
                    run_id = json.loads(timing.read_text()).get("mlflow_run_id")
                    if run_id:
                        tags[f"{stage}_{paths.label}_run_id"] = run_id
    run_id = run.start("comparison", tags)
    try:
        run.log_metrics({f"compare/{k}": v for k, v in headline.items() if isinstance(v, int | float)})
        run.log_artifacts(report_dir, "report")
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    return run_id


def compare(cfg: Config, root: Path) -> dict[str, Any]:
    from pipeline.tracking import check_tracking_uri, tracking_uri

    start = time.perf_counter()
    check_tracking_uri(tracking_uri(cfg.mlflow.tracking_uri, root), cfg.mlflow.connect_timeout_s)  # fail fast
    data = gather(cfg, root)
    report, headline = render_report(cfg, data)
    out = root / REPORT_DIR
    figures: dict[str, Any] = {
        "loss_curves.png": lambda path: plot_loss_curves(data, path),
        **{name: (lambda path, n=name: plot_benchmark(data["benchmark_rows"], n, path)) for name in BENCHMARK_CHARTS},
        "confusion_matrices.png": lambda path: plot_confusions(data, path),
    }
    for name, draw in figures.items():
        with atomic_output(out / name) as tmp:
            draw(tmp)
    with atomic_output(out / "comparison.md") as tmp:
        tmp.write_text(report, encoding="utf-8")
    write_json(root / "metrics" / "compare.json", headline)
    with tempfile.TemporaryDirectory() as staging:  # the MLflow run carries exactly the report and its plots
        for name in [*figures, "comparison.md"]:
            shutil.copy2(out / name, Path(staging) / name)
        run_id = log_to_mlflow(cfg, root, Path(staging), headline, report)
    log.info("compare: reports/comparison.md written, MLflow run %s (%.1f s)", run_id, time.perf_counter() - start)
    return headline


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    return compare(cfg, repo_root())


def main(argv: list[str] | None = None) -> int:
    return run_stage(body, stage_parser("Side-by-side report of every variant (reports/comparison.md, MLflow)."), argv)


if __name__ == "__main__":
    raise SystemExit(main())
