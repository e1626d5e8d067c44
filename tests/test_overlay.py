"""pipeline/overlay.py and the shipped presets: every configs/*.yaml merges into params.yaml and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.overlay import apply_overlay, main, merge

ROOT = Path(__file__).resolve().parents[1]


def test_merge_is_key_by_key_except_the_task_list():
    base = {"a": {"b": 1, "c": 2}, "finetune": {"tasks": {"x": {}, "y": {}}, "max_steps": 5}}
    merged = merge(base, {"a": {"c": 3}, "finetune": {"tasks": {"z": {"n": 1}}}})
    assert merged == {"a": {"b": 1, "c": 3}, "finetune": {"tasks": {"z": {"n": 1}}, "max_steps": 5}}
    assert base["a"]["c"] == 2  # the base is not modified


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_validates_on_the_shipped_params(preset):
    merged = apply_overlay(ROOT / "params.yaml", preset)
    assert merged["finetune"]["tasks"]  # a preset names its tasks


def test_the_lra_preset_runs_lra_listops_at_lra_lengths():
    merged = apply_overlay(ROOT / "params.yaml", ROOT / "configs" / "lra_listops.yaml")
    assert list(merged["finetune"]["tasks"]) == ["lra_listops"]
    assert merged["finetune"]["input_length"] >= 2000 and merged["trainer"]["accelerator"] == "gpu"


def test_a_bad_preset_is_refused_and_nothing_is_written(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"max_stepz": 3}}))
    with pytest.raises(ConfigError, match="max_stepz"):
        apply_overlay(params, bad)
    assert main([str(bad), "--params", str(params)]) == 2
    assert "error:" in capsys.readouterr().err and params.read_text() == before
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"finetune": {"max_steps": 300}}))
    assert main([str(good), "--params", str(params)]) == 0
    assert yaml.safe_load(params.read_text())["finetune"]["max_steps"] == 300
