"""Params presets (`configs/*.yaml`) run as DVC experiments by `python -m pipeline.preset`: every shipped preset
validates on the shipped params, its values become DVC's own `-S` overrides, and a real `dvc exp run --temp` applies
them without touching the workspace's params.yaml (comments kept) while DVC records the values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.preset import PRESETS_DIR, hydra_value, main, merge, overrides, resolve

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_the_presets_are_shipped():
    assert {"long_range", "lra_listops"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_shipped_preset_validates_on_the_shipped_params(name):
    merged, values = resolve(name, ROOT / "params.yaml")
    cfg = config_from_dict(merged)
    assert cfg.preset == name and f"preset={name}" in values
    preset = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    for section, body in preset.items():  # what the preset sets is what the merged params hold
        if isinstance(body, dict) and section != "replace":
            for key, value in body.items():
                if not isinstance(value, dict):
                    assert merged[section][key] == value, f"{name}: {section}.{key}"


def test_the_table2_models_have_plain_learned_positions_as_the_paper():
    """`axial_pos_shape: []` says "none" (null is the preset's axial table): one plain table of 256 positions."""
    cfg = config_from_dict(resolve("table2", ROOT / "params.yaml")[0])
    for variant in ("full", "lsh1", "lsh4"):
        config = cfg.model_config(variant)
        assert config.axial_pos_shape is None and config.axial_pos_dims is None
        assert config.max_positions == 256


def test_overrides_set_add_remove_and_replace_whole():
    params = {"a": 1, "models": {"t5": {"preset": "tiny"}}, "lengths": {"task_options": {"x": 1, "y": 2}}}
    overlay = {"a": 2, "models": {"t5": {"preset": "small"}, "big": {"family": "t5"}},
               "lengths": {"task_options": {"x": 3}}, "new": [1, 2]}  # fmt: skip
    replaced = {("lengths", "task_options")}
    assert overrides(params, overlay, replaced) == [
        "a=2",
        "models.t5.preset=small",
        "+models.big={family:t5}",
        "~lengths.task_options",
        "+lengths.task_options={x:3}",
        "+new=[1,2]",
    ]
    merged = merge(params, overlay, replaced)
    assert merged["lengths"]["task_options"] == {"x": 3} and merged["models"]["t5"] == {"preset": "small"}
    assert params["a"] == 1  # the input is not changed
    assert hydra_value(1e17) == "1e+17" and hydra_value("a b") == "'a b'" and hydra_value(None) == "null"
    assert hydra_value("true") == "'true'" and hydra_value({"k": [0.5, "x"]}) == "{k:[0.5,x]}"


def test_a_preset_that_breaks_the_params_is_exit_2_before_dvc_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lengths:\n  seq_lengths: [512, 128]\n")
    assert main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "lengths.seq_lengths: must be strictly increasing" in err and "Traceback" not in err
    assert main(["no_such_preset"]) == 2
    assert "no preset 'no_such_preset'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        resolve(str(bad), ROOT / "params.yaml")


def test_dry_run_prints_the_dvc_command(capsys):
    assert main(["long_range", "--temp", "-n", "lr", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("dvc exp run --temp -n lr -S ") and "-S preset=long_range" in out


@pytest.mark.slow
def test_dvc_applies_the_preset_in_a_temporary_experiment_and_records_it(tmp_path):
    """A real `dvc exp run --temp` through the preset command, on a project whose one stage writes the params it
    reads: the experiment holds the preset's values, the workspace's params.yaml is byte-for-byte unchanged."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    (project / "show.py").write_text(
        "import json, yaml\n"
        "p = yaml.safe_load(open('params.yaml'))\n"
        "json.dump({'preset': p['preset'], 'lengths': p['lengths']}, open('seen.json', 'w'))\n"
    )
    (project / "dvc.yaml").write_text(
        "stages:\n  show:\n    cmd: python show.py\n    deps: [show.py]\n    params: [preset, lengths]\n"
        "    outs: [seen.json]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = {"cwd": project, "env": env, "capture_output": True, "text": True}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):  # fmt: skip
        assert subprocess.run(cmd, **run).returncode == 0
    before = (project / "params.yaml").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "pipeline.preset", "long_range", "--temp", "-n", "lr"], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the workspace's params.yaml unchanged, its comments kept
    assert (project / "params.yaml").read_bytes() == before and b"# which code computes the models" in before
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], **run)
    assert shown.returncode == 0, shown.stderr
    assert '"long_range"' in shown.stdout  # DVC records the experiment's params
    applied = subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", "lr"], **run)
    assert applied.returncode == 0, applied.stderr
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["preset"] == "long_range" and params["lengths"]["seq_lengths"] == [256, 512, 1024, 4096]
    assert (
        params["lengths"]["task_options"]
        == yaml.safe_load((PRESETS_DIR / "long_range.yaml").read_text())["lengths"]["task_options"]
    )  # replaced whole
    # DVC kept the comments when it applied it
    assert "# which code computes the models" in (project / "params.yaml").read_text()
    seen = yaml.safe_load((project / "seen.json").read_text())
    assert seen["preset"] == "long_range" and seen["lengths"]["seeds"] == [0, 1, 2]


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """The tokenizer a params dict trains on the built-in corpus (prepared once, as the default run prepares it),
    trained once per distinct `tokenizer` section."""
    import json

    from pipeline.data.tokenizer import Tokenizer

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prepared = tmp_path_factory.mktemp("prepared")
    shutil.copy(ROOT / "params.yaml", prepared / "params.yaml")
    run = [sys.executable, "-m", "pipeline.prepare"]
    proc = subprocess.run(run, cwd=prepared, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained: dict[str, Tokenizer] = {}

    def tokenizer(params: dict) -> Tokenizer:
        key = json.dumps(params["tokenizer"], sort_keys=True)
        if key not in trained:
            project = tmp_path_factory.mktemp("tokenizer")
            (project / "data").mkdir()
            (project / "data" / "prepared").symlink_to(prepared / "data" / "prepared")
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            run = [sys.executable, "-m", "pipeline.tokenize"]
            proc = subprocess.run(run, cwd=project, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
            trained[key] = Tokenizer.load(project / "data" / "tokenizer")
        return trained[key]

    tokenizer.prepared = prepared / "data" / "prepared"  # type: ignore[attr-defined]
    return tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", *PRESETS])
def test_every_generated_finetune_task_fits_its_lengths_with_the_tokenizer_it_trains(name, trained_tokenizer):
    """The tokenizer each preset trains on the built-in corpus, its generated fine-tuning tasks, and the lengths the
    collator cuts to: nothing is cut (table2 lost the end of every copy holding an `o`, split in two by the default
    tokenizer, until `user_defined_symbols`). The finetune stage checks the same at its start (`check_lengths`)."""
    from pipeline.data.datamodule import check_lengths
    from pipeline.data.tasks import build_examples, get_task

    params = (
        yaml.safe_load((ROOT / "params.yaml").read_text())
        if name == "default"
        else resolve(name, ROOT / "params.yaml")[0]
    )
    tokenizer = trained_tokenizer(params)
    f = params["finetune"]
    tasks = {}
    for task, options in f["tasks"].items():  # 1,000 examples of each at most: what is checked is their lengths
        resolved = get_task(task).resolve_options(options)
        for key in ("num_examples", "num_eval_examples"):
            if key in resolved:
                resolved[key] = min(resolved[key], 1000)
        tasks[task] = resolved
    cfg = config_from_dict(params)
    lsh_configs = {v: c for v in cfg.models if hasattr(c := cfg.model_config(v), "lsh_chunk_length")}
    for split in ("train", "validation"):
        examples = build_examples(tasks, split, params["seed"], prepared_dir=trained_tokenizer.prepared)
        encoded = {
            t: list(zip(tokenizer.encode([e.inputs for e in v]), tokenizer.encode([e.targets for e in v]), strict=True))
            for t, v in examples.items()
        }
        check_lengths(encoded, split, f["input_length"], f["target_length"])
        if "duplication" in encoded:  # the Table 2 presets: the paper's window, at most 1/8 of the sequence
            shortest = min(len(i) + len(t) - 1 for i, t in encoded["duplication"])  # the model reads all but the last
            for variant, config in lsh_configs.items():
                window = config.lsh_chunk_length * (1 + config.lsh_num_chunks_before + config.lsh_num_chunks_after)
                assert 8 * window <= shortest, f"{name}/{variant}: a query sees {window} of {shortest} tokens"
