"""Every chart of the pipeline, each drawn by one function that the stage producing it and the report share.

- `loss_curves`: pretraining and fine-tuning loss per variant (mean over seeds, band = min..max over seeds);
- `benchmark_chart`: speed or memory versus sequence length, or memory versus depth, with the spread of the
  repeated measurements as error bars (`BENCHMARK_CHARTS` names them);
- `confusion_matrix` / `confusion_grid`: one confusion heat map, or one per (task, variant);
- `quality_vs_length`: a task metric per variant at each trained length, with its interval;
- `scaling_curves`: final loss against training FLOPs, one curve per model family through its sizes.

matplotlib runs headless (Agg); every function writes one PNG to `path`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]

# file name -> (row kind, x axis, figure key, y label, title)
BENCHMARK_CHARTS: dict[str, tuple[str, str, str, str, str]] = {
    "speed_vs_length.png": (
        "length",
        "seq_length",
        "tokens_per_s",
        "input tokens per second of a training step\n(higher is better)",
        "Speed",
    ),
    "memory_vs_length.png": ("length", "seq_length", "step_mb", "memory of a training step, MiB", "Memory"),
    "memory_vs_depth.png": ("depth", "num_layers", "step_mb", "memory of a training step, MiB", "Memory"),
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per name, in the order given. The report builds one palette from the params' variant order and
    hands it to every chart, so a variant keeps its colour in all of them."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _palette(palette: Mapping[str, str] | None, names: Sequence[str]) -> dict[str, str]:
    """`palette` for the names it has, then the unused colours, in order, for any name it lacks."""
    out = dict(palette or {})
    spare = [c for c in PALETTE if c not in out.values()] or PALETTE
    for i, name in enumerate(n for n in names if n not in out):
        out[name] = spare[i % len(spare)]
    return out


def _save(fig: Any, path: Path, dpi: int = 100) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    _plt().close(fig)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def loss_curves(
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[Sequence[float]]]]],
    path: Path,
    palette: Mapping[str, str] | None = None,
) -> None:
    """`curves[stage][variant][kind]` = one list of (step, loss) points per seed, kind `train` or `val`.

    One panel per stage; solid lines are training loss, dashed validation loss, each the mean over the seeds
    at the steps every seed logged, with a band from the lowest to the highest seed.
    """
    import numpy as np

    plt = _plt()
    stages = list(curves)
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5.5 * max(len(stages), 1), 4), squeeze=False)
    names = list(dict.fromkeys(v for stage in curves.values() for v in stage))
    palette = _palette(palette, names)
    for ax, stage in zip(axes[0], stages, strict=False):
        drawn = False
        for variant in names:
            for kind, style in (("train", "-"), ("val", "--")):
                runs = [
                    dict((float(s), float(v)) for s, v in run) for run in curves[stage].get(variant, {}).get(kind, [])
                ]
                runs = [r for r in runs if r]
                if not runs:
                    continue
                steps = sorted(set.intersection(*(set(r) for r in runs)))
                if not steps:
                    continue
                values = np.array([[r[s] for s in steps] for r in runs])  # (seeds, steps)
                label = f"{variant} {kind}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
                marker = "o" if kind == "val" else None
                ax.plot(steps, values.mean(0), style, color=palette[variant], marker=marker, label=label)
                if len(runs) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=palette[variant], alpha=0.15)
                drawn = True
        ax.set_title(f"{stage} loss (nats per target token)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "no loss history")
    _save(fig, path)


def _variant(row: Mapping[str, Any]) -> str:
    return str(row.get("variant") or row.get("family"))


def benchmark_chart(
    rows: Sequence[Mapping[str, Any]], name: str, path: Path, palette: Mapping[str, str] | None = None
) -> None:
    """One of `BENCHMARK_CHARTS` from the benchmark's rows, every variant on one chart (log-log against length).

    A row's figure `<key>` is drawn at its x; `<key>_low`/`<key>_high` (the spread of the repeats), where
    present, become error bars. Rows without the figure (skipped, failed) are left out.
    """
    import numpy as np

    plt = _plt()
    kind, axis, key, ylabel, title = BENCHMARK_CHARTS[name]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(_variant(r) for r in rows if r.get("kind") == kind))
    palette = _palette(palette, names)
    for variant in names:
        pts = sorted(
            (r[axis], r[key], r.get(f"{key}_low", r[key]), r.get(f"{key}_high", r[key]))
            for r in rows
            if r.get("kind") == kind and _variant(r) == variant and r.get(key) is not None
        )
        if not pts:
            continue
        xs, ys, lo, hi = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
        yerr = np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)])
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, color=palette[variant], label=variant)
    if kind == "length":
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (input tokens; targets L/4)")
        ax.set_title(f"{title} vs sequence length")
    else:
        length = next((r["seq_length"] for r in rows if r.get("kind") == kind), "?")
        ax.set_xlabel("layers per stack")
        ax.set_title(f"{title} vs depth (length {length})")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        _no_data(ax, "nothing measured")
    _save(fig, path)


def _draw_confusion(ax: Any, labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> Any:
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    peak = max((max(r) for r in matrix if r), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                color = "white" if count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    return image


def confusion_matrix(labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str, path: Path) -> None:
    """One confusion matrix as a heat map with the counts in the cells (rows: actual, columns: predicted)."""
    plt = _plt()
    size = max(3.5, 0.45 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    image = _draw_confusion(ax, labels, matrix, title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def confusion_grid(panels: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path) -> None:
    """`panels[task][variant]` = {"labels", "matrix"}: one row per task, one column per variant."""
    plt = _plt()
    tasks = sorted(panels)
    names = sorted({v for t in panels.values() for v in t})
    if not tasks or not names:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        _no_data(ax, "no classification task in finetune.tasks")
        _save(fig, path, dpi=90)
        return
    fig, axes = plt.subplots(len(tasks), len(names), figsize=(5.5 * len(names), 4.8 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, variant in enumerate(names):
            cm = panels[task].get(variant)
            if not cm:
                axes[i][j].axis("off")
                continue
            _draw_confusion(axes[i][j], cm["labels"], cm["matrix"], f"{variant}: {task}")
    _save(fig, path, dpi=90)


def attention_grid(section: Mapping[str, Any], path: Path) -> None:
    """The train x evaluation table (`analysis.attention_table`) as one heat map per task: rows the variants as
    trained, columns the evaluation-time attention settings, each cell the mean with its 95% interval. With no
    setting in `evaluate.attention`, a chart that says so."""
    import numpy as np

    plt = _plt()
    tasks = list(section.get("tasks", {})) if section else []
    if not tasks:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        _no_data(ax, "no evaluation-time attention settings (evaluate.attention)")
        _save(fig, path, dpi=90)
        return
    columns = list(section["columns"])
    rows = max(len(t["rows"]) for t in section["tasks"].values())
    size = (1.3 * len(columns) + 2.5, len(tasks) * (0.9 * rows + 1.4))
    fig, axes = plt.subplots(len(tasks), 1, figsize=size, squeeze=False)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        table = section["tasks"][task]
        variants = list(table["rows"])
        means = np.array([[table["rows"][v][c].mean if c in table["rows"][v] else np.nan for c in columns]
                          for v in variants])  # fmt: skip
        image = ax.imshow(means, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for i, v in enumerate(variants):
            for j, c in enumerate(columns):
                iv = table["rows"][v].get(c)
                if iv is None:
                    continue
                text = f"{iv.mean:.3f}" + (f"\n[{iv.low:.2f}, {iv.high:.2f}]" if iv.has_interval else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if iv.mean > 0.6 else "white")  # fmt: skip
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(variants)), variants)
        ax.set_xlabel("evaluated with")
        ax.set_ylabel("trained as")
        ax.set_title(f"{task}: {table['metric'].replace('_', ' ')}, trained x evaluated")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def quality_vs_length(
    points: Mapping[str, Sequence[Mapping[str, float]]],
    ylabel: str,
    title: str,
    path: Path,
    palette: Mapping[str, str] | None = None,
) -> None:
    """`points[variant]` = [{"length", "mean", "low", "high"}...]: a metric against the trained length, with its
    interval as error bars and, where given, a `baseline` per length as a dotted grey line."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    palette = _palette(palette, list(points))
    baseline: dict[float, float] = {}
    for variant, rows in points.items():
        rows = sorted(rows, key=lambda r: r["length"])
        if not rows:
            continue
        xs = np.array([r["length"] for r in rows], dtype=float)
        ys = np.array([r["mean"] for r in rows], dtype=float)
        lo = np.array([r.get("low", r["mean"]) if r.get("low") is not None else r["mean"] for r in rows])
        hi = np.array([r.get("high", r["mean"]) if r.get("high") is not None else r["mean"] for r in rows])
        yerr = np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)])
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, color=palette[variant], label=variant)
        baseline.update({r["length"]: r["baseline"] for r in rows if r.get("baseline") is not None})
    if baseline:
        bx = sorted(baseline)
        ax.plot(bx, [baseline[x] for x in bx], ":", color="gray", label="trivial baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        _no_data(ax, "nothing measured")
    _save(fig, path)


def scaling_curves(
    points: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, palette: Mapping[str, str] | None = None
) -> None:
    """`points[family]` = [{"variant", "flops", "mean", "low", "high"}...]: final validation loss against training
    FLOPs (log scale), one line per family through its sizes, the interval over seeds as error bars and each
    point labelled with its variant. A family with one size is a lone point; no family: a chart that says so."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    palette = _palette(palette, list(points))
    for family, rows in points.items():
        rows = sorted(rows, key=lambda r: r["flops"])
        if not rows:
            continue
        xs = np.array([r["flops"] for r in rows], dtype=float)
        ys = np.array([r["mean"] for r in rows], dtype=float)
        lo = np.array([r["mean"] if r.get("low") is None else r["low"] for r in rows], dtype=float)
        hi = np.array([r["mean"] if r.get("high") is None else r["high"] for r in rows], dtype=float)
        yerr = np.vstack([np.clip(ys - lo, 0, None), np.clip(hi - ys, 0, None)])
        label = family + ("" if len(rows) > 1 else " (one size)")
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, color=palette[family], label=label)
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(str(r["variant"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("final validation loss (nats per target token)")
    ax.set_title("Pretraining loss vs compute, per family")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:
        _no_data(ax, "no pretraining run with a loss and a compute figure")
    _save(fig, path)
