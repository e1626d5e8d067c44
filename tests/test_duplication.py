"""Tests of the duplication experiment (Reformer paper, Table 2): data, loss masking, evaluation, the table."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from duplication import (  # noqa: E402  (benchmarks/duplication.py: a script, not a package module)
    PRESETS,
    copy_loss_and_accuracy,
    duplication_batch,
    evaluate_one,
    label,
    main,
    model_config,
    parse_rows,
    render_markdown,
    run_experiment,
    second_half_mask,
)


def test_batch_is_zero_w_zero_w():
    batch = duplication_batch(5, 20, 7, torch.Generator().manual_seed(0))
    assert batch.shape == (5, 20)
    assert (batch[:, 0] == 0).all() and (batch[:, 10] == 0).all()
    assert torch.equal(batch[:, 1:10], batch[:, 11:])
    assert batch[:, 1:10].min() >= 1 and batch[:, 1:10].max() <= 6


def test_batch_rejects_odd_lengths():
    with pytest.raises(ValueError, match="even"):
        duplication_batch(1, 11, 5, torch.Generator())


def test_second_half_mask_covers_exactly_the_copied_targets():
    L = 12
    mask = second_half_mask(L)
    targets = torch.arange(1, L)[mask]
    assert targets.tolist() == list(range(L // 2 + 1, L))  # the second w, not its leading separator


def test_copy_accuracy_is_one_for_a_perfect_copier_and_ignores_the_first_half():
    batch = duplication_batch(3, 16, 9, torch.Generator().manual_seed(1))
    logits = torch.full((3, 16, 9), -10.0)
    half = 8
    for t in range(16 - 1):  # predict token t + 1: the copy in the second half, garbage in the first
        nxt = batch[:, t + 1] if t + 1 > half else (batch[:, t + 1] + 1) % 9
        logits[torch.arange(3), t, nxt] = 10.0
    loss, accuracy = copy_loss_and_accuracy(logits, batch)
    assert accuracy.item() == 1.0
    assert loss.item() < 1e-3


def test_model_config_rows_mean_full_or_lsh_rounds():
    preset = PRESETS["micro"]
    full, lsh4 = model_config(preset, 0, 0), model_config(preset, 4, 0)
    assert full.use_full_attention and not lsh4.use_full_attention
    assert lsh4.n_hashes == 4 and lsh4.attn_layers == ["lsh"] and lsh4.layout == "causal_lm"


def test_evaluation_reuses_the_trained_weights_with_other_rounds():
    from models import build_model

    preset = PRESETS["micro"]
    torch.manual_seed(0)
    model = build_model("reformer", model_config(preset, 2, 0))
    # full attention and LSH give the same result when a chunk (plus its neighbour) covers the whole sequence
    wide = replace(preset, chunk_length=preset.seq_length)
    wide_model = build_model("reformer", model_config(wide, 2, 0))
    wide_model.load_state_dict(model.state_dict())
    assert evaluate_one(wide_model, wide, 0, 0) == pytest.approx(evaluate_one(wide_model, wide, 4, 0))
    assert 0.0 <= evaluate_one(model, preset, 1, 0) <= 1.0


def test_parse_rows():
    assert parse_rows("full,1,LSH-2,4") == [0, 1, 2, 4]
    assert [label(r) for r in parse_rows("full,8")] == ["full", "LSH-8"]


def test_micro_run_writes_the_table(tmp_path: Path):
    preset = PRESETS["micro"]
    assert main(["--preset", "micro", "--out", str(tmp_path), "--params", str(_params())]) == 0
    result = json.loads((tmp_path / "duplication.json").read_text())
    assert result["rows"] == [label(r) for r in preset.rows]
    assert result["columns"] == [label(c) for c in preset.columns]
    for row in result["rows"]:
        assert set(result["accuracy"][row]) == set(result["columns"])
        assert all(0.0 <= v <= 1.0 for v in result["accuracy"][row].values())
        assert result["train_history"][row][-1]["step"] == preset.steps
    text = (tmp_path / "duplication.md").read_text()
    assert sum(line.startswith("| full |") for line in text.splitlines()) == 2  # ours and the paper's table
    assert render_markdown(result, "micro") == text


def _params() -> Path:
    from tests.train_project import ROOT

    return ROOT / "params.yaml"


@pytest.mark.slow
def test_lsh_training_learns_to_copy_at_small_scale():
    """A short run already shows the paper's pattern: a model trained with LSH copies far above chance."""
    preset = replace(PRESETS["cpu"], seq_length=32, chunk_length=4, steps=150, rows=[2], columns=[2], batch_size=32)
    result = run_experiment(preset, seed=0, device=torch.device("cpu"))
    assert result["accuracy"]["LSH-2"]["LSH-2"] > 10 * result["chance_accuracy"]
