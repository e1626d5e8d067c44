"""Quality versus length at matched compute: the budget accounting, the `lengths` params, the compare aggregation,
and (slow) the `lengths@<variant>-<seed>` stage run for real on the tiny project."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import models
from pipeline.config import ConfigError, config_from_dict
from pipeline.lengths import Budget, length_config
from pipeline.report.analysis import lengths_cells, lengths_chart_points, lengths_metrics, quality_vs_length
from pipeline.report.inputs import gather_lengths
from pipeline.training.budget import budget_at, budget_steps, step_flops
from tests.train_project import LENGTHS, MODELS, ROOT


def tiny_cfg(**lengths):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"] = copy.deepcopy(MODELS)
    raw["pretrain"]["input_length"], raw["finetune"]["input_length"] = 32, 64
    raw["lengths"] = {**copy.deepcopy(LENGTHS), **lengths}
    return config_from_dict(raw)


# ------------------------------------------------------------------------------------------ the budget


def test_the_same_flops_budget_gives_each_variant_the_steps_its_own_accounting_allows():
    cfg = tiny_cfg()
    budget = 1.0e8
    steps = {}
    for variant in cfg.models:
        config = cfg.model_config(variant, 256)
        model = models.build_model(cfg.family(variant), config)
        for length in (32, 64):
            per_step = step_flops(cfg.family(variant), config, 4, length, 4)
            assert per_step == model.training_flops(4, length, 4)  # encoder-decoder: the padded shapes
            n = budget_steps(budget, per_step)
            assert n * per_step <= budget < (n + 1) * per_step  # spent within the budget, one more step beyond it
            steps[variant, length] = n
    # the tiny Reformer costs more per step than the tiny T5 here, so it gets fewer steps for the same compute
    assert steps["reformer", 32] < steps["t5", 32] and steps["reformer", 64] < steps["t5", 64]
    assert steps["t5", 64] < steps["t5", 32]  # longer sequences: fewer steps in the same budget


def _default_params(**models_extra) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"].update(copy.deepcopy(models_extra))
    return raw


def test_every_budget_is_checked_with_the_params_by_the_stages_own_accounting(tmp_path):
    """An impossible budget is exit 2 from `python -m pipeline.config` (every stage validates the same way first),
    naming the variant, the length and the figures; the shipped params with a variant one or two sizes up (the
    README's scaling advice) or the README's experiment pass, because the budget does not shrink for them."""
    import subprocess
    import sys

    from pipeline.config import model_config_of
    from pipeline.training.budget import padded_vocab_size, plan

    cfg = config_from_dict(_default_params(t5_small={"family": "t5", "preset": "small"},
                                           reformer_base={"family": "reformer", "preset": "base"}))  # fmt: skip
    vocab = padded_vocab_size(cfg.tokenizer.vocab_size)
    budget = plan(cfg.lengths, {v: (s.family, model_config_of(s, vocab)) for v, s in cfg.models.items()}, vocab)
    steps = {v: [r["steps"] for r in rows] for v, rows in budget["variants"].items()}
    assert min(min(v) for v in steps.values()) >= 1 and steps["t5"] == cfg.lengths.budget.steps  # the reference
    assert steps["t5_small"][0] < steps["t5"][0] / 10  # the bigger model: fewer steps for the same FLOPs
    assert budget["budgets"][1] > budget["budgets"][0]  # the budget grows with the length
    raw = _default_params()
    raw["models"]["reformer"]["n_hashes"] = 8  # the README's first experiment
    assert config_from_dict(raw).models["reformer"].overrides["n_hashes"] == 8

    raw = _default_params(wide={"family": "t5", "preset": "tiny", "d_ff": 65536})
    raw["lengths"]["budget"].update(steps=1, min_steps=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipeline.config", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lengths.budget: models.wide gets 0 step(s) at length 128" in proc.stderr
    assert "fewer than lengths.budget.min_steps 2; raise lengths.budget.steps" in proc.stderr
    assert "models.t5 gets 1 step(s) at length 512" in proc.stderr  # every variant and length, all at once


def test_budget_params_are_one_kind_each():
    with pytest.raises(ConfigError, match="give either `steps`"):
        tiny_cfg(budget={"kind": "flops", "steps": 10, "value": 1e8})
    with pytest.raises(ConfigError, match="a seconds budget needs `value`"):
        tiny_cfg(budget={"kind": "seconds", "steps": None, "value": None})
    with pytest.raises(ConfigError, match="preset: 'huge' is not a t5 preset"):
        tiny_cfg(budget={"kind": "flops", "steps": 10, "reference": {"family": "t5", "preset": "huge"}})
    with pytest.raises(ConfigError, match="lengths.seeds: must be distinct"):
        tiny_cfg(seeds=[0, 0])


def test_budget_steps_is_exact_at_the_boundary_and_rejects_a_free_step():
    assert budget_steps(3e9, 1e9) == 3
    assert budget_steps(2.9e9, 1e9) == 2
    assert budget_steps(0.5e9, 1e9) == 0
    with pytest.raises(ValueError):
        budget_steps(1e9, 0)


def test_decoder_only_steps_are_counted_over_inputs_and_targets():
    config = models.config_class("t5").from_preset("tiny", vocab_size=256, layout="causal_lm")
    flops = models.spec("t5").training_flops
    assert step_flops("t5", config, 2, 100, 4) == flops(config, 2, 104, 0) > flops(config, 2, 100, 0)


def test_length_options_budgets_and_the_derived_config():
    cfg = tiny_cfg(budget={"kind": "flops", "value": [1e8, 3e8]})
    assert cfg.lengths.task_options_at(64) == {**LENGTHS["task_options"], "min_items": 48, "max_items": 58}
    assert [budget_at(cfg.lengths, i, 256) for i in range(2)] == [1e8, 3e8]
    derived = length_config(cfg, 64)
    assert derived.finetune.input_length == 64 and derived.finetune.tasks == {"needle": cfg.lengths.task_options_at(64)}
    assert derived.finetune.init == cfg.lengths.init and derived.evaluate.num_beams == [1]
    assert cfg.finetune.input_length == 64 and "sort" not in derived.finetune.tasks  # the original is untouched


def test_a_seconds_budget_stops_training_once_spent_and_a_flops_budget_never_does():
    trainer = SimpleNamespace(should_stop=False)
    unlimited = Budget(None)
    unlimited.on_train_start(trainer, None)
    unlimited.on_train_batch_end(trainer, None)
    assert trainer.should_stop is False
    spent = Budget(0.0)  # zero seconds: spent after the first step
    spent.on_train_start(trainer, None)
    spent.on_train_batch_end(trainer, None)
    assert trainer.should_stop is True and spent.elapsed >= 0.0


def test_lengths_params_are_checked_with_their_yaml_paths():
    with pytest.raises(ConfigError) as err:
        tiny_cfg(
            fill=[0.9, 0.5],
            seq_lengths=[64, 32],
            task_options={"max_items": 40, "fillr": 3},
            budget={"kind": "seconds", "value": [1.0]},
            optimizer={"schedule": "cosine"},
        )
    text = str(err.value)
    assert "lengths.seq_lengths: must be strictly increasing" in text
    with pytest.raises(ConfigError) as err:
        tiny_cfg(
            fill=[0.9, 0.5],
            task_options={"max_items": 40, "fillr": 3},
            budget={"kind": "seconds", "value": [1.0]},
            optimizer={"schedule": "cosine"},
        )
    text = str(err.value)
    for expected in (
        "lengths.fill: the shortest fraction must be below the longest",
        "lengths.task_options.max_items: set per length from lengths.fill",
        "lengths.task_options.fillr: unknown option (did you mean 'filler'?",
        "lengths.budget.value: 1 values for 2 seq_lengths",
        "lengths.optimizer.schedule: 'cosine' decays over a known step count",
    ):
        assert expected in text
    with pytest.raises(ConfigError, match="lengths.task: "):
        tiny_cfg(task="sort")


# ---------------------------------------------------------------------------------------- aggregation


def _lengths_run(rng: np.random.Generator, accuracy: dict[int, float], steps: dict[int, int]) -> dict:
    """One synthetic `lengths@V-S` result as `gather_lengths` returns it (60 test examples per length)."""
    out = {"task": "needle", "metric": "accuracy", "budget_kind": "flops", "lengths": {}, "examples": {}}
    for length, acc in accuracy.items():
        refs = [str(d) for d in rng.integers(0, 10, 60)]
        preds = [r if rng.random() < acc else str((int(r) + 1) % 10) for r in refs] if acc else ["0"] * 60
        scores = [float(p == r) for p, r in zip(preds, refs, strict=True)]
        out["examples"][str(length)] = {
            "metric": "accuracy",
            "references": refs,
            "baselines": {"majority": 0.15, "chance": 0.1},
            "predictions": preds,
            "scores": scores,
        }
        out["lengths"][str(length)] = {
            "accuracy": float(np.mean(scores)),
            "budget": 1e8,
            "steps": steps[length],
            "flops": steps[length] * 1e7,
            "flops_per_token": 1e7 / (4 * length),
            "parameters": 1000,
            "tokens_per_s": 500.0 + rng.random(),
            "peak_memory_mb": 300.0,
            "train_seconds": 2.0,
            "dropped_too_long": {"train": 0, "test": 1},
        }
    return out


def test_compare_names_the_winner_per_length_only_where_the_interval_excludes_zero():
    cfg = tiny_cfg()
    cfg.seeds = [0, 1, 2]
    runs = {
        "t5": {s: _lengths_run(np.random.default_rng(s), {32: 0.9, 64: 0.5}, {32: 8, 64: 4}) for s in (0, 1, 2)},
        "reformer": {
            s: _lengths_run(np.random.default_rng(9 + s), {32: 0.4, 64: 0.5}, {32: 3, 64: 2}) for s in (0, 1, 2)
        },
    }
    section = quality_vs_length(cfg, runs, ["t5", "reformer"])
    assert section["missing"] == [] and section["budget_kind"] == "flops"
    short, long = section["levels"]
    assert (short["length"], long["length"]) == (32, 64) and short["budget"] == 1e8
    ((_, _, verdict),) = short["row"].verdicts
    assert verdict.winner == "t5" and verdict.kind == "significant"
    ((_, _, verdict),) = long["row"].verdicts
    assert verdict.winner is None and verdict.kind == "not_significant"
    assert short["row"].values["t5"].has_interval and short["row"].baseline == 0.15
    # efficiency indicators over seeds: the same step count in every seed shows no spread
    assert short["figures"]["t5"]["steps"].mean == 8 and short["figures"]["reformer"]["steps"].mean == 3
    cells = {(c["length"], c["variant"]): c["cells"] for c in lengths_cells(section, ["t5", "reformer"])}
    assert (cells[32, "t5"]["steps"], cells[32, "reformer"]["steps"]) == ("8", "3")
    assert "[" in cells[32, "t5"]["tokens_per_s"]  # differs between seeds: its interval
    assert json.loads(json.dumps(lengths_metrics(section)))["levels"][0]["quality"]["verdicts"]
    points = lengths_chart_points(section)
    assert [p["length"] for p in points["t5"]] == [32, 64] and points["t5"][0]["low"] is not None


def test_the_quality_crossover_lies_between_the_lengths_won_by_each_and_is_not_invented():
    cfg = tiny_cfg()
    cfg.seeds = [0, 1, 2]
    cfg.lengths.seq_lengths = [32, 64, 128]
    steps = {32: 8, 64: 4, 128: 2}
    runs = {
        "t5": {s: _lengths_run(np.random.default_rng(s), {32: 0.95, 64: 0.6, 128: 0.3}, steps) for s in (0, 1, 2)},
        "reformer": {
            s: _lengths_run(np.random.default_rng(9 + s), {32: 0.4, 64: 0.6, 128: 0.95}, steps) for s in (0, 1, 2)
        },
    }
    section = quality_vs_length(cfg, runs, ["t5", "reformer"])
    assert [lv["row"].verdicts[0][2].winner for lv in section["levels"]] == ["t5", None, "reformer"]
    (crossover,) = section["crossovers"]
    assert crossover["pair"] == "t5 vs reformer" and crossover["between"] == [[32, 128]]
    placed = "between 32 and 128 tokens (t5 ahead at 32, reformer at 128; no winner at 64 between them)"
    assert placed in crossover["text"]
    assert json.loads(json.dumps(lengths_metrics(section)))["crossovers"][0]["between"] == [[32, 128]]
    # the same winner wherever there is one: no crossover, and none ruled out where nothing is answered
    runs["reformer"] = {
        s: _lengths_run(np.random.default_rng(9 + s), {32: 0.4, 64: 0.0, 128: 0.0}, steps) for s in (0, 1, 2)
    }
    runs["t5"] = {s: _lengths_run(np.random.default_rng(s), {32: 0.95, 64: 0.9, 128: 0.0}, steps) for s in (0, 1, 2)}
    (crossover,) = quality_vs_length(cfg, runs, ["t5", "reformer"])["crossovers"]
    assert crossover["between"] == []
    expected = "t5 vs reformer: no crossover from 32 to 128 tokens: where one is ahead, it is t5"
    assert crossover["text"].startswith(expected)
    assert "beyond 64 tokens the comparison has no answer at this budget" in crossover["text"]
    assert "t5 ahead at 32, 64; no answer (both collapsed) at 128" in crossover["text"]
    # nothing learned anywhere: no crossover can be placed
    runs = {v: {s: _lengths_run(np.random.default_rng(s), dict.fromkeys(steps, 0.0), steps) for s in (0, 1, 2)}
            for v in ("t5", "reformer")}  # fmt: skip
    (crossover,) = quality_vs_length(cfg, runs, ["t5", "reformer"])["crossovers"]
    assert crossover["text"].startswith("t5 vs reformer: no crossover can be placed")


def test_a_constant_answer_is_collapsed_at_its_length_and_loses():
    cfg = tiny_cfg()
    cfg.seeds = [0, 1, 2]
    runs = {
        "t5": {s: _lengths_run(np.random.default_rng(s), {32: 0.8, 64: 0.0}, {32: 8, 64: 4}) for s in (0, 1, 2)},
        "reformer": {
            s: _lengths_run(np.random.default_rng(5 + s), {32: 0.0, 64: 0.0}, {32: 3, 64: 2}) for s in (0, 1, 2)
        },
    }
    short, long = quality_vs_length(cfg, runs, ["t5", "reformer"])["levels"]
    assert short["row"].collapsed("reformer") and not short["row"].collapsed("t5")
    assert short["row"].verdicts[0][2].winner == "t5" and short["row"].verdicts[0][2].kind == "collapsed"
    assert long["row"].verdicts[0][2].kind == "both_collapsed"
    assert "collapsed" in long["text"]


def test_one_seed_has_intervals_over_test_examples_and_no_run_gives_an_empty_section():
    """With one seed (`lengths.seeds: [0]`, the default run's) the interval is the bootstrap over the test examples
    alone: a clear difference is named, a small one is not, and the report says what the interval covers."""
    cfg = tiny_cfg()
    runs = {
        "t5": {0: _lengths_run(np.random.default_rng(0), {32: 0.9, 64: 0.5}, {32: 8, 64: 4})},
        "reformer": {0: _lengths_run(np.random.default_rng(1), {32: 0.3, 64: 0.5}, {32: 3, 64: 2})},
    }
    short, long = quality_vs_length(cfg, runs, ["t5", "reformer"])["levels"]
    (_, _, verdict) = short["row"].verdicts[0]
    assert verdict.kind == "significant" and verdict.winner == "t5"
    assert short["row"].values["t5"].method == "bootstrap over examples" and short["row"].show_interval
    assert long["row"].verdicts[0][2].kind == "not_significant"
    assert "steps 8 (t5) vs 3 (reformer)" in short["row"].matched[("t5", "reformer")]
    assert lengths_chart_points({"levels": [short]})["t5"][0]["low"] is not None
    del runs["reformer"]
    partial = quality_vs_length(cfg, runs, ["t5", "reformer"])
    assert partial["missing"] == ["lengths@reformer-0"] and not partial["levels"][0]["row"].verdicts
    empty = quality_vs_length(cfg, {}, ["t5", "reformer"])
    assert empty["levels"] == [] and empty["missing"] == ["lengths@t5-0", "lengths@reformer-0"]


# --------------------------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_lengths_stage_trains_each_length_under_the_budget_and_compare_reads_it(tmp_path: Path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from pipeline.config import load_config
    from pipeline.lengths import main as lengths_main
    from tests.eval_project import make_eval_project, run_module

    project = make_eval_project(tmp_path)  # random "pretrained" weights of t5 and reformer, seed 0
    for variant in ("t5", "reformer"):
        result = run_module("pipeline.lengths", project, "--model", variant, "--seed", "0")
        assert result.returncode == 0, result.stdout[-3000:]
    cfg = load_config(project / "params.yaml")
    runs = gather_lengths(project, ["t5", "reformer"], [0])
    for variant, by_seed in runs.items():
        result = by_seed[0]
        assert result["budget_kind"] == "flops" and set(result["lengths"]) == {"32", "64"}
        model = models.load_pretrained(project / "artifacts" / "pretrain" / variant / "0" / "final")[1]
        for length, m in result["lengths"].items():
            per_step = model.training_flops(4, int(length), cfg.lengths.target_length)
            assert m["steps"] == int(1.0e8 // per_step) >= 1 and m["flops"] <= 1.0e8
            assert m["flops_per_step"] == pytest.approx(per_step) and m["init"].endswith(f"{variant}/0/final")
            assert m["test_examples"] == len(result["examples"][length]["scores"]) > 0
            assert 0.0 <= m["accuracy"] <= 1.0 and "baseline_majority" in m and m["baseline_chance"] == 0.1
            assert m["tokens_per_s"] > 0
            assert m["peak_memory_mb"] > 0 and m["parameters"] == model.num_parameters()
    section = quality_vs_length(cfg, runs, ["t5", "reformer"])
    assert [lv["length"] for lv in section["levels"]] == [32, 64] and not section["missing"]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t5-vs-reformer")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'lengths' and tags.variant = 't5'")
    assert run.info.status == "FINISHED" and "lengths/L64/accuracy" in run.data.metrics
    assert run.data.params["lengths.budget.kind"] == "flops"
    assert run.data.params["kernels.matmul_resolved"] in ("blas", "onednn")

    monkeypatch.chdir(project)  # a seed outside `seeds:`: refused, its outputs would be tracked by no stage
    assert lengths_main(["--model", "t5", "--seed", "7"]) == 1
    err = capsys.readouterr().err
    assert "error: --seed 7: not one of `seeds:`" in err and "Traceback" not in err
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "seeds": [0, 7]}, sort_keys=False))
    assert lengths_main(["--model", "t5", "--seed", "7"]) == 1  # a seed never pretrained: the stage to run
    err = capsys.readouterr().err
    assert "error:" in err and "dvc repro pretrain@t5-7" in err and "Traceback" not in err


def test_the_cluster_preset_runs_lra_listops_from_1k_to_beyond_4k():
    from pipeline.preset import resolve

    merged, _ = resolve("lra_listops", ROOT / "params.yaml")
    lengths = config_from_dict(merged).lengths
    assert lengths.task == "lra_listops" and "operators" not in lengths.task_options  # replaced whole
    assert lengths.seq_lengths[0] <= 1024 and lengths.seq_lengths[-1] > 4096 and lengths.budget.kind == "flops"
    at_4k = lengths.task_options_at(4096)
    assert at_4k["min_tokens"] <= 500 and at_4k["max_tokens"] <= 2048  # LRA's 500-2000 tokens fit in 4K pieces


def test_the_report_shows_quality_and_efficiency_per_length_and_compare_json_keeps_them():
    from pipeline.report.analysis import analyze, headline
    from pipeline.report.rendering import render_report
    from tests.test_compare import synthetic

    cfg = tiny_cfg()
    cfg.seeds = [0, 1, 2]
    cfg.evaluate.num_beams = [1]
    cfg.lengths.seeds = [0, 1, 2]
    data = synthetic([0, 1, 2], {"t5": (0.9, 3.0, None), "reformer": (0.45, 4.0, None)})
    data["lengths"] = {
        "t5": {s: _lengths_run(np.random.default_rng(s), {32: 0.9, 64: 0.0}, {32: 8, 64: 4}) for s in (0, 1, 2)},
        "reformer": {
            s: _lengths_run(np.random.default_rng(9 + s), {32: 0.4, 64: 0.0}, {32: 3, 64: 2}) for s in (0, 1, 2)
        },
    }
    analysis = analyze(cfg, data)
    report = render_report(cfg, data, analysis)
    section = report[report.index("## Quality versus length at matched compute") : report.index("## Speed and memory")]
    assert "compute matched: 1e+08 training FLOPs per run and length" in section
    assert "each model's own dropout (`lengths.dropout`)" in section  # the setting, named with its value
    cfg.lengths.dropout = 0.0
    assert "dropout 0 for every variant (`lengths.dropout`)" in render_report(cfg, data, analysis)
    cfg.lengths.dropout = None
    assert "| 32 | 1e+08 |" in section and "t5, higher by" in section and "both collapsed" in section
    assert "(matched: training FLOPs; steps 8 (t5) vs 3 (reformer))" in section  # what each verdict matched
    assert "bootstrap over seeds and test examples" in section  # three seeds here
    assert "| length | variant | parameters | training FLOPs of a step per input position at this length |" in section
    assert "| 32 | reformer | 1,000 |" in section and "(quality_vs_length.png)" in section
    assert "**Quality versus length at matched compute**" in report  # in the answer in short
    crossover = "**Quality crossover**, t5 vs reformer: no crossover from 32 to 64 tokens: where one is ahead, it is t5"
    assert crossover in section and "**Quality crossover** (at matched compute), t5 vs reformer" in report
    assert "is measured on `needle` at lengths 32, 64" in report  # the caveat
    saved = json.loads(json.dumps(headline(analysis, data)))["lengths"]
    assert [lv["length"] for lv in saved["levels"]] == [32, 64] and saved["budget_kind"] == "flops"
    assert saved["levels"][1]["quality"]["variants"]["t5"]["collapsed"] is True


@pytest.mark.parametrize("family", ["t5", "reformer"])
def test_lengths_dropout_trains_exactly_as_a_model_configured_with_that_rate(family):
    """`lengths.dropout` rebuilds the variant's model at that rate: the same weights, the same random draws after,
    so the steps that follow are those of a model configured with the rate from the start (bytes, not figures)."""
    from pipeline.lengths import with_dropout

    cfg = tiny_cfg(dropout=0.0)
    variant = next(v for v in cfg.models if cfg.family(v) == family)
    config = cfg.model_config(variant, 256)
    assert config.dropout_rate > 0  # the preset's own rate, which the setting replaces
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(2, 256, (2, 4), generator=torch.Generator().manual_seed(2))

    def train_step(model):
        logits = model(input_ids=ids, decoder_input_ids=labels)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch.manual_seed(0)
    direct = models.build_model(family, dataclasses.replace(config, dropout_rate=0.0)).train()
    expected = train_step(direct), torch.rand(3)
    torch.manual_seed(0)
    rebuilt = with_dropout(family, models.build_model(family, config).train(), 0.0)
    assert rebuilt.config.dropout_rate == 0.0 and rebuilt.training
    got = train_step(rebuilt), torch.rand(3)
    assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], expected[0][1], strict=True))
    torch.manual_seed(0)
    kept = models.build_model(family, config).train()
    assert with_dropout(family, kept, config.dropout_rate) is kept  # the model's own rate: nothing rebuilt
    assert not torch.equal(train_step(kept)[0], expected[0][0])  # and the rate it replaces does change the step


def test_lengths_dropout_is_checked_with_the_params():
    with pytest.raises(ConfigError, match="lengths.dropout"):
        tiny_cfg(dropout=1.0)
    assert tiny_cfg().lengths.dropout is None and tiny_cfg(dropout=0.0).lengths.dropout == 0.0
