"""The typed params: the shipped file loads, and broken variants are each reported clearly with exit code 2."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_params_load():
    cfg = load_config(SHIPPED)
    assert cfg.data.source == "builtin"
    assert list(cfg.models) == ["t5", "reformer"] and cfg.seeds == [0, 1, 2]
    assert {v: cfg.family(v) for v in cfg.models} == {"t5": "t5", "reformer": "reformer"}
    # both variants build a config from their preset, and a model from it
    for variant in cfg.models:
        mcfg = cfg.model_config(variant, vocab_size=8064)
        assert mcfg.vocab_size == 8064
    # the flattened view round-trips through validation unchanged
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_every_field_is_documented():
    """Each params field carries a docstring right below it (pydantic keeps it as the field's description)."""
    from pydantic import BaseModel

    import pipeline.config.params as params_module
    import pipeline.config.sections as sections_module

    found = {**vars(sections_module), **vars(params_module)}.values()
    sections = [c for c in found if isinstance(c, type) and issubclass(c, BaseModel)]
    assert {"Params", "DataConfig", "TrainerConfig", "SlurmConfig", "ModelSection"} <= {c.__name__ for c in sections}
    for cls in sections:
        for name, info in cls.model_fields.items():
            assert info.description, f"{cls.__name__}.{name} has no docstring"


def test_yaml_1_1_float_text_is_a_float(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as a string; a float field takes it as the number it spells."""
    text = SHIPPED.read_text().replace("    lr: 0.005\n", "    lr: 1e-4\n")
    assert "lr: 1e-4" in text and yaml.safe_load(text)["pretrain"]["optimizer"]["lr"] == "1e-4"
    (tmp_path / "params.yaml").write_text(text)
    assert load_config(tmp_path / "params.yaml").pretrain.optimizer.lr == pytest.approx(1e-4)
    raw = yaml.safe_load(text)
    raw["pretrain"]["optimizer"]["lr"] = "fast"  # text that is not a number is still refused
    with pytest.raises(ConfigError, match="pretrain.optimizer.lr: expected float, got 'fast'"):
        config_from_dict(raw)


def test_slurm_cpu_partition_takes_gpus_per_node_0(shipped):
    raw = copy.deepcopy(shipped)
    raw["launcher"].update(kind="slurm", nproc_per_node=4, slurm={**raw["launcher"]["slurm"], "gpus_per_node": 0})
    raw["trainer"]["devices"] = 4
    assert config_from_dict(raw).launcher.slurm.gpus_per_node == 0
    raw["trainer"]["devices"] = 2  # the launcher starts 4 tasks per node (nproc_per_node): they must agree
    with pytest.raises(ConfigError, match="trainer.devices: 2 but launcher.kind slurm starts 4 per node"):
        config_from_dict(raw)


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


# (change to apply, text that must appear in the problem naming the YAML path)
BROKEN = [
    ({"tokeniser": {"vocab_size": 100}}, "tokeniser: unknown key (did you mean 'tokenizer'?)"),
    ({"tokenizer.vocab_size": "big"}, "tokenizer.vocab_size: expected int, got 'big'"),
    ({"data.source": "web"}, "data.source: expected one of 'builtin', 'hub', 'files', 'preset', got 'web'"),
    ({"pretrain.optimizer.learning_rate": 0.1}, "pretrain.optimizer.learning_rate: unknown key"),
    ({"data.validation_fraction": 0.7}, "data.validation_fraction: must be in (0, 0.5)"),
    ({"tokenizer.num_sentinels": 7990}, "tokenizer.vocab_size: 8000 leaves 10 SentencePiece pieces"),
    ({"finetune.init": "checkpoint"}, "finetune.checkpoint_dir: required when finetune.init is 'checkpoint'"),
    ({"finetune.init": "checkpoint", "finetune.checkpoint_dir": "x"}, "models.reformer is a reformer model"),
    ({"deepspeed.offload_parameters": True, "trainer.strategy": "deepspeed"}, "deepspeed.offload_parameters"),
    ({"trainer.accelerator": "cpu", "trainer.precision": "16-mixed"}, "trainer.precision: '16-mixed' needs a GPU"),
    ({"models.t5.preset": "huge"}, "models.t5.preset: unknown preset 'huge'"),
    ({"models.reformer.n_hashes": "eight"}, "models.reformer.n_hashes: expected"),
    ({"models.reformer.n_hash": 2}, "models.reformer.n_hash: unknown key (did you mean 'n_hashes'?)"),
    ({"models.reformer.family": "gpt"}, "models.reformer.family: expected one of 't5', 'reformer', got 'gpt'"),
    ({"models.t5-big": {"family": "t5"}}, "models.t5-big: variant names are letters, digits and '_'"),
    ({"models": {}}, "models: expected a mapping of variant names"),
    ({"seeds": []}, "seeds: must have at least 1 item"),
    ({"seeds": [0, 0]}, "seeds: must be a non-empty list of distinct integers"),
    ({"launcher.slurm.gpus_per_node": -1}, "launcher.slurm.gpus_per_node: must be >= 0, got -1"),
    ({"models.reformer.d_model": 100}, "models.reformer: invalid ReformerConfig: axial_pos_dims [64, 64] must sum"),
    ({"finetune.tasks": {"listopz": {}}}, "finetune.tasks.listopz: unknown task (did you mean 'listops'?"),
    ({"pretrain.objective": "causal_lm"}, "needs a decoder-only layout"),
    ({"mlflow.tracking_uri": "file:./mlruns"}, "mlflow.tracking_uri: MLflow 3 no longer accepts file stores"),
    ({"trainer.devices": 0}, "trainer.devices: must be >= 1"),
    ({"evaluate.num_beams": [1, 0]}, "evaluate.num_beams"),
    (
        {"pretrain.optimizer.warmup_steps": 10_000},
        "pretrain.optimizer.warmup_steps: must be in [0, pretrain.max_steps]",
    ),
    ({"seed": 1.5}, "seed: expected int, got 1.5"),
    ({"trainer.gradient_clip_val": True}, "trainer.gradient_clip_val: expected float, got True"),
    ({"kernels.paths": "reference"}, "kernels.decoding: 'shaped' is a speed path, taken with paths 'fast' only"),
    ({"kernels.paths": "quick"}, "kernels.paths: expected one of 'fast', 'reference', got 'quick'"),
]


@pytest.mark.parametrize(("change", "expected"), BROKEN, ids=[e for _, e in BROKEN])
def test_broken_variant_is_reported(shipped, change, expected):
    raw = copy.deepcopy(shipped)
    for key, value in change.items():
        if "." in key:
            _set(raw, key, value)
        else:
            raw[key] = value
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once(shipped):
    raw = copy.deepcopy(shipped)
    _set(raw, "tokenizer.vocab_size", "big")
    _set(raw, "data.source", "web")
    _set(raw, "launcher.kind", "mpirun")
    raw["extra"] = 1
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    paths = [p.split(":")[0] for p in info.value.problems]
    assert {"tokenizer.vocab_size", "data.source", "launcher.kind", "extra"} <= set(paths)


def _run_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping of sections"),
        ("seed: 1\ndata: {source: web}\n", "data.source"),
    ],
)
def test_cli_exit_code_2(tmp_path, text, expected):
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    result = _run_validate(bad)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_file(tmp_path):
    result = _run_validate(tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_cli_ok_on_shipped():
    result = _run_validate(SHIPPED)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_shipped_params_equal_the_documented_defaults():
    """params.yaml spells out every default, so the dataclass docs and the shipped file cannot drift apart."""
    from pipeline.config import Config

    shipped = load_config(SHIPPED).to_dict()
    defaults = Config().to_dict()
    defaults["models"] = shipped["models"]  # variants are chosen in params.yaml, there is no code default
    assert defaults == shipped


def test_shipped_variants_show_every_config_field():
    """Every field of the family's config is a key of each shipped variant (so `dvc exp run -S` needs no `+`)."""
    import models

    shipped = yaml.safe_load(SHIPPED.read_text())["models"]
    for variant, body in shipped.items():
        spec = models.spec(body["family"])
        assert list(body) == ["family", "preset", *spec.field_names()], variant
        assert all(v is None for k, v in body.items() if k not in ("family", "preset")), variant


def test_null_fields_take_the_preset_value_and_set_ones_override_it(shipped):
    raw = copy.deepcopy(shipped)
    raw["models"]["reformer"]["n_hashes"] = 8
    cfg = config_from_dict(raw)
    preset = load_config(SHIPPED).model_config("reformer")
    assert cfg.model_config("reformer").n_hashes == 8 and preset.n_hashes == 2
    assert cfg.model_config("reformer").d_model == preset.d_model  # null: the preset's
