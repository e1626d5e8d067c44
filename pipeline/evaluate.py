"""Stage `evaluate@<variant>-<seed>`: test-split loss and perplexity, task metrics, confusion matrices.

    python -m pipeline.evaluate --model <variant> --seed <seed>

Paths come from `pipeline/config/paths.py`; V-S below is the variant and the seed.

1. The pretrained model (`artifacts/pretrain/V/S/final`) scores the test split under the pretraining
   objective, exactly as validation does during training (same packing, same corruption seeded per example,
   at most `evaluate.max_loss_batches` batches): `test_loss` (mean cross-entropy per target token, nats) and
   `test_ppl = exp(test_loss)`.
2. The fine-tuned model (`artifacts/finetune/V/S/final`) generates an answer for at most
   `evaluate.max_examples_per_task` test examples of every task in `finetune.tasks`, once per beam size in
   `evaluate.num_beams` (1 is greedy), scored with the task's metric
   (`pipeline.tasks.score`): `<task>.<metric>_beam<k>`.
3. For classification tasks (those with `classes`) the greedy predictions give a confusion matrix: a CSV of
   `actual,predicted` rows for DVC's `confusion` template and a PNG; predictions outside the classes count as
   `(other)`.
4. `num_samples` examples per task are written with their input, reference and every beam's generation.
5. The trivial baselines (`pipeline.tasks.baselines`: majority class and chance, or copy-the-input and
   most-frequent-output) as `<task>.baseline_<name>`, `<task>.constant_beam<k>` (1.0 when every prediction
   is the same), `unigram_loss` (the test targets' cross-entropy under the training targets' unigram
   distribution), and `examples.json`: every prediction with its per-example score, which `compare`
   bootstraps over.

The test examples depend only on the params' `seed` (the same for every run); the run's seed S drives the
randomness left at evaluation time (the LSH rotations).

Outputs: `artifacts/eval/V/S/` (`samples.json`, `samples.md`, `examples.json`, `confusion_<task>.csv`/`.png`,
`report.json`)
and the DVC metrics `metrics/evaluate/V-S.json`; the same numbers go to an MLflow run (`evaluate@V-S`, tags
variant/family/seed/stage) in the pipeline's experiment as `eval/test_loss`, `eval/test_ppl`,
`eval/<task>/<metric>_beam<k>`, with the output directory as artifacts.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.common import StageError, load_model_dir, publish, repo_root, require_variant, run_stage, stage_parser
from pipeline.config import Config
from pipeline.config.paths import RunPaths
from pipeline.console import progress, quiet_libraries

log = logging.getLogger("pipeline.evaluate")

OTHER = "(other)"


def load_model(paths: RunPaths, family: str) -> torch.nn.Module:
    """`models.load_pretrained(paths.final)`, checking it holds a `family` model."""
    directory = paths.final
    if not (directory / "config.json").is_file():
        raise StageError(f"{directory} has no model: run `dvc repro {paths.dvc_stage()}` first")
    loaded_family, model = load_model_dir(directory, f"re-run `dvc repro {paths.dvc_stage()}`")
    if loaded_family != family:
        raise StageError(f"{directory} holds a {loaded_family} model, expected {family} (models.{paths.variant})")
    return model


# ---------------------------------------------------------------------------------------- loss and ppl


@torch.no_grad()
def test_loss(
    model: torch.nn.Module, cfg: Config, docs: list, tokenizer: Any, train_docs: list | None = None
) -> dict[str, float]:
    """Mean per-token cross-entropy and perplexity of `model` on `docs` under the pretraining objective.

    With `train_docs`, also `unigram_loss`: the cross-entropy of the same test targets under the unigram
    distribution of as many training targets (the trivial baseline: a model that ignores its input)."""
    from pipeline.data.datamodule import Collator, FixedItems, PretrainDataset, token_losses

    p, e = cfg.pretrain, cfg.evaluate
    span_args = {}
    if p.objective == "span_corruption":
        sentinels = [tokenizer.sentinel_id(i) for i in range(cfg.tokenizer.num_sentinels)]
        span_args = dict(
            noise_density=p.noise_density,
            mean_noise_span_length=p.mean_noise_span_length,
            eos_id=tokenizer.eos_id,
            sentinel_ids=sentinels,
        )
    dataset = PretrainDataset(docs, p.objective, p.input_length, cfg.seed, **span_args)
    limit = e.max_loss_batches * e.batch_size if e.max_loss_batches > 0 else None
    items = FixedItems(dataset, limit)
    if len(items) == 0:
        raise StageError(
            f"the {e.split} split has too few tokens for one {p.input_length}-token example; use more data"
        )
    mc = model.config
    collate = Collator(mc.layout, mc.pad_token_id, mc.decoder_start_token_id)
    total, count = 0.0, 0
    targets: list[torch.Tensor] = []
    for start in progress(range(0, len(items), e.batch_size), f"{e.split} loss"):
        batch = collate([items[i] for i in range(start, min(start + e.batch_size, len(items)))])
        labels = batch.pop("labels")
        targets.append(labels[labels >= 0])
        logits = model(**batch)
        ce, _, n = token_losses(logits, labels)
        total, count = total + float(ce), count + int(n)
    loss = total / max(count, 1)
    out = {"test_loss": loss, "test_ppl": math.exp(min(loss, 50.0)), "test_tokens": count, "test_examples": len(items)}
    if train_docs is not None:
        from pipeline.report.stats import unigram_cross_entropy

        train_items = FixedItems(PretrainDataset(train_docs, p.objective, p.input_length, cfg.seed, **span_args), limit)
        train_targets = []
        for start in range(0, len(train_items), e.batch_size):
            labels = collate([train_items[i] for i in range(start, min(start + e.batch_size, len(train_items)))])[
                "labels"
            ]
            train_targets.append(labels[labels >= 0])
        out["unigram_loss"] = unigram_cross_entropy(
            torch.cat(train_targets).tolist(), torch.cat(targets).tolist(), model.config.vocab_size
        )
    return out


# ----------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_texts(model: torch.nn.Module, tokenizer: Any, inputs: list[str], num_beams: int, cfg: Config) -> list[str]:
    """Decoded generations for `inputs` (encoder-decoder: from the start token; decoder-only: the continuation)."""
    e, f = cfg.evaluate, cfg.finetune
    pad = model.config.pad_token_id
    out: list[str] = []
    for start in progress(range(0, len(inputs), e.batch_size), f"generate (beams {num_beams})"):
        ids = [row[: f.input_length] for row in tokenizer.encode(inputs[start : start + e.batch_size])]
        width = max(len(r) for r in ids)
        decoder_only = model.config.layout != "encoder_decoder"
        batch = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):  # decoder-only prompts are left-padded so continuations line up
            sl = slice(width - len(row), width) if decoder_only else slice(0, len(row))
            batch[i, sl], mask[i, sl] = torch.tensor(row), True
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=e.max_new_tokens, num_beams=num_beams)
        new = generated[:, width:] if decoder_only else generated[:, 1:]
        out += [tokenizer.decode(row.tolist()) for row in new]
    return out


def confusion_rows(classes: list[str], predictions: list[str], references: list[str]) -> list[dict[str, str]]:
    """`actual,predicted` rows (DVC's confusion template); predictions outside `classes` become `(other)`."""
    known = set(classes)
    clean = [" ".join(p.split()) for p in predictions]
    return [
        {"actual": " ".join(r.split()), "predicted": p if p in known else OTHER}
        for p, r in zip(clean, references, strict=True)
    ]


def confusion_matrix(classes: list[str], rows: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
    """Counts (actual x predicted); labels are the classes plus `(other)` when it occurs (an actual class outside
    `classes` counts as `(other)` too). Counted here rather than by torchmetrics, whose import costs the stage
    about 6 s (see `pipeline.tasks.score`); `tests/test_evaluate.py` checks it against torchmetrics."""
    labels = list(classes) + ([OTHER] if any(r["predicted"] == OTHER for r in rows) else [])
    index = {c: i for i, c in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for r in rows:
        matrix[index.get(r["actual"], len(labels) - 1)][index[r["predicted"]]] += 1
    return labels, matrix


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, cfg: Config, prepared_dir: Path, out: Path, label: str):
    """Task metrics for every beam size; writes confusion matrices into `out`; returns (metrics, samples)."""
    from pipeline.data.task_metrics import baselines, example_scores, score
    from pipeline.data.tasks import build_examples, get_task
    from pipeline.report.charts import confusion_matrix as plot_confusion
    from pipeline.report.stats import constant_predictions

    e = cfg.evaluate
    examples = build_examples(cfg.finetune.tasks, e.split, cfg.seed, prepared_dir)
    train_examples = build_examples(cfg.finetune.tasks, "train", cfg.seed, prepared_dir)
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    per_example: dict[str, dict[str, Any]] = {}
    for name, task_examples in examples.items():
        task = get_task(name)
        chosen = task_examples[: e.max_examples_per_task]
        if not chosen:
            log.warning("task %s has no %s examples; skipped", name, e.split)
            continue
        inputs, refs = [x.inputs for x in chosen], [x.targets for x in chosen]
        metrics[name] = {"examples": len(chosen)}
        trivial = baselines(task, train_examples.get(name, []), chosen)
        metrics[name].update({f"baseline_{key}": value for key, value in trivial.items()})
        per_example[name] = {"metric": task.metric, "references": refs, "baselines": trivial, "beams": {}}
        generations: dict[int, list[str]] = {}
        for beams in e.num_beams:
            start = time.perf_counter()
            generations[beams] = generate_texts(model, tokenizer, inputs, beams, cfg)
            scores = score(task.metric, generations[beams], refs)
            for key, value in scores.items():
                metrics[name][f"{key}_beam{beams}"] = value
            metrics[name][f"constant_beam{beams}"] = float(constant_predictions(generations[beams]))
            per_example[name]["beams"][str(beams)] = {
                "predictions": generations[beams],
                "scores": example_scores(task.metric, generations[beams], refs),
            }
            log.info(
                "%s %s beam %d: %s = %.4f (%d examples, %.1f s)",
                label, name, beams, task.metric, scores[task.metric], len(chosen), time.perf_counter() - start,
            )  # fmt: skip
        if task.classes:
            greedy = generations[min(e.num_beams)]
            rows = confusion_rows(task.classes, greedy, refs)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["actual", "predicted"])
            writer.writeheader()
            writer.writerows(rows)
            (out / f"confusion_{name}.csv").write_text(buf.getvalue(), encoding="utf-8")
            labels, matrix = confusion_matrix(task.classes, rows)
            (out / f"confusion_{name}.json").write_text(json.dumps({"labels": labels, "matrix": matrix}) + "\n")
            title = f"{label}: {name} (beam {min(e.num_beams)}, {len(rows)} test examples)"
            plot_confusion(labels, matrix, title, out / f"confusion_{name}.png")
        samples[name] = [
            {"input": inputs[i], "reference": refs[i], **{f"beam{b}": generations[b][i] for b in e.num_beams}}
            for i in range(min(e.num_samples, len(chosen)))
        ]
    # every prediction with its score: what compare bootstraps over (and checks for constant predictions)
    (out / "examples.json").write_text(json.dumps(per_example, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics, samples


def attention_settings(cfg: Config, family: str) -> dict[str, dict[str, Any]]:
    """The settings of `evaluate.attention` this family can run: every field one it may change after training."""
    import models

    changeable = models.spec(family).eval_time_fields
    return {name: dict(fields) for name, fields in cfg.evaluate.attention.items() if set(fields) <= changeable}


def evaluate_attention(
    model: torch.nn.Module,
    family: str,
    settings: dict[str, dict[str, Any]],
    tokenizer: Any,
    cfg: Config,
    prepared_dir: Path,
    out: Path,
    label: str,
) -> dict[str, dict[str, Any]]:
    """Every task scored greedily with `model`'s weights under each attention setting (config fields changed, the
    weights loaded as they are); per-example scores go into `out/examples.json` under `attention` (for compare's
    bootstrap); returns {setting: {task: {metric: score}}}."""
    import dataclasses

    import models
    from pipeline.data.task_metrics import example_scores, score
    from pipeline.data.tasks import build_examples, get_task

    e = cfg.evaluate
    examples = build_examples(cfg.finetune.tasks, e.split, cfg.seed, prepared_dir)
    saved = json.loads((out / "examples.json").read_text(encoding="utf-8"))
    greedy = min(e.num_beams)
    result: dict[str, dict[str, Any]] = {}
    for name, fields in settings.items():
        variant = models.build_model(family, dataclasses.replace(model.config, **fields)).eval()
        variant.load_state_dict(model.state_dict())  # the same parameters: only how attention runs differs
        result[name] = {}
        for task_name, task_examples in examples.items():
            chosen = task_examples[: e.max_examples_per_task]
            if not chosen or task_name not in saved:
                continue
            task = get_task(task_name)
            refs = [x.targets for x in chosen]
            with torch.no_grad():
                predictions = generate_texts(variant, tokenizer, [x.inputs for x in chosen], greedy, cfg)
            scores = score(task.metric, predictions, refs)
            result[name][task_name] = {f"{k}_beam{greedy}": v for k, v in scores.items()}
            per = saved[task_name].setdefault("attention", {})
            per[name] = {"predictions": predictions, "scores": example_scores(task.metric, predictions, refs)}
            log.info("%s %s under %s %s: %s = %.4f", label, task_name, name, fields, task.metric, scores[task.metric])
        del variant
    (out / "examples.json").write_text(json.dumps(saved, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def samples_markdown(label: str, samples: dict[str, list[dict[str, Any]]]) -> str:
    """The samples as a readable Markdown page."""
    lines = [f"# {label}: sample generations (test split)", ""]
    for task, rows in samples.items():
        lines += [f"## {task}", ""]
        for i, row in enumerate(rows, 1):
            lines.append(f"{i}. **input:** {_md(row['input'])}")
            lines.append(f"   - **reference:** {_md(row['reference'])}")
            for key, value in row.items():
                if key.startswith("beam"):
                    lines.append(f"   - **{key}:** {_md(value)}")
        lines.append("")
    return "\n".join(lines)


def _md(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return (text[:limit] + " ...") if len(text) > limit else (text or "*(empty)*")


# --------------------------------------------------------------------------------------------- stage


def evaluate(cfg: Config, variant: str, seed: int, root: Path) -> dict[str, Any]:
    """Run the whole evaluation of one variant and seed; writes outputs and returns the metrics."""
    from pipeline.data.datamodule import document_arrays, load_tokenized
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.tracking.runs import check_tracking_uri, close_stale_runs, tracking_uri

    require_variant(cfg, variant, seed)
    family = cfg.family(variant)
    out = RunPaths(root, "evaluate", variant, seed)
    start = time.perf_counter()
    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)  # fail fast
    close_stale_runs(uri, cfg.mlflow.experiment, {"stage": "evaluate", "variant": variant, "seed": str(seed)})
    torch.manual_seed(seed)  # LSH rotations drawn during evaluation
    tokenizer = Tokenizer.load(root / "data" / "tokenizer")
    tokenized = load_tokenized(root / "data" / "tokenized")
    docs = document_arrays(tokenized[cfg.evaluate.split])
    pretrained = load_model(RunPaths(root, "pretrain", variant, seed), family)
    train_docs = document_arrays(tokenized["train"])
    metrics: dict[str, Any] = test_loss(pretrained, cfg, docs, tokenizer, train_docs)
    log.info("%s test loss %.4f, perplexity %.2f", out.label, metrics["test_loss"], metrics["test_ppl"])
    del pretrained
    finetuned = load_model(RunPaths(root, "finetune", variant, seed), family)
    out_dir = out.out
    with publish() as pub:  # the output folder, the metrics and the MLflow run: all together or none
        tmp = pub.stage(out_dir)
        tmp.mkdir(parents=True)
        task_metrics, samples = evaluate_tasks(finetuned, tokenizer, cfg, root / "data" / "prepared", tmp, out.label)
        metrics.update(task_metrics)
        settings = attention_settings(cfg, family)
        if settings:  # the same weights under other attention settings, no retraining (the train x eval table)
            torch.manual_seed(seed)
            metrics["attention"] = evaluate_attention(
                finetuned, family, settings, tokenizer, cfg, root / "data" / "prepared", tmp, out.label
            )
        metrics["parameters"] = finetuned.num_parameters()
        metrics["non_embedding_parameters"] = finetuned.num_parameters(non_embedding=True)
        timing = {"seconds": round(time.perf_counter() - start, 1)}  # apart: metrics are the same bytes every run
        pub.write_json(out.timing, timing)
        (tmp / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "samples.md").write_text(samples_markdown(out.label, samples), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        pub.write_json(out.metrics, metrics)
        log_to_mlflow(cfg, out, family, {**metrics, **timing}, root, artifacts=tmp)
    log.info("%s evaluated in %.0f s", out.label, time.perf_counter() - start)
    return metrics


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval/test_loss`, `eval/<task>/<metric>_beam<k>` and, per evaluation-time attention setting,
    `eval/attention/<setting>/<task>/<metric>_beam<k>`: the same names for every variant."""
    out = {}
    for key, value in metrics.items():
        if key == "attention":
            for setting, tasks in value.items():
                for task, scores in tasks.items():
                    out.update({f"eval/attention/{setting}/{task}/{k}": float(v) for k, v in scores.items()})
        elif isinstance(value, dict):
            out.update({f"eval/{key}/{k}": float(v) for k, v in value.items() if isinstance(v, int | float)})
        elif isinstance(value, int | float):
            out[f"eval/{key}"] = float(value)
    return out


def log_to_mlflow(
    cfg: Config, paths: RunPaths, family: str, metrics: dict[str, Any], root: Path, artifacts: Path | None = None
) -> None:
    """One run `evaluate@<variant>-<seed>` in the pipeline's experiment with the metrics and the output folder
    (`artifacts`: where it is staged before being published; default its final place)."""
    from pipeline.tracking import logged as mlflow_logging
    from pipeline.tracking.runs import TrackedRun, check_tracking_uri, git_revision, tracked_run, tracking_uri

    uri = tracking_uri(cfg.mlflow.tracking_uri, root)
    check_tracking_uri(uri, cfg.mlflow.connect_timeout_s)
    run = TrackedRun(uri, cfg.mlflow.experiment, system_metrics=False)
    tags = {
        "variant": paths.variant,
        "family": family,
        "seed": str(paths.seed),
        "stage": "evaluate",
        "git_revision": git_revision(root),
    }
    tags.update(mlflow_logging.context_tags(uri, cfg.mlflow.experiment, tags["git_revision"], paths.seed, cfg.preset))
    with tracked_run(run, paths.dvc_stage(), tags):
        # the params this stage reads (dvc.yaml) and the evaluated model's resolved config, as training logs them
        run.log_params(mlflow_logging.stage_params(cfg.to_dict(), "evaluate", paths.variant, paths.seed, root))
        final = RunPaths(root, "finetune", paths.variant, paths.seed).final
        run.log_params(mlflow_logging.model_params_from_dir(final, paths.variant))
        run.log_params(mlflow_logging.runtime_params())  # threads, OpenMP wait, CPU product kernel
        run.log_metrics(mlflow_metrics(metrics))
        run.log_artifacts(artifacts or paths.out, "eval")


def body(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    return evaluate(cfg, args.model, args.seed, repo_root())


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "Evaluate one variant and seed: test loss/perplexity, task metrics, confusion, samples.", per_run=True
    )
    return run_stage(body, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
