"""Model variants and seeds: the family registry, the DVC matrix driven by params, paths, seeds, a new family.

The slow tests run real commands in temporary projects: `dvc stage list`, `dvc repro --dry` and
`dvc exp run --dry -S` in a fresh git + DVC repository, and a real pretrain stage of a throw-away family added
the documented way (one module plus one registry line).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import models
from pipeline.config import load_config
from pipeline.config.paths import RunPaths
from tests.train_project import ROOT, make_project

PROJECT_FILES = ("pipeline", "models", "params.yaml", "dvc.yaml", ".dvcignore", ".gitignore")
REGISTRY_LINE = "SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in (t5_family.SPEC, reformer_family.SPEC)}"


def test_registry_lists_each_family_module_spec_by_plain_import():
    source = (ROOT / "models" / "__init__.py").read_text()
    assert "importlib" not in source and REGISTRY_LINE in source
    assert models.FAMILIES == ("t5", "reformer")
    for name, spec in models.SPECS.items():
        family, model = sys.modules[f"models.{name}_family"], sys.modules[f"models.{name}"]
        assert spec is family.SPEC and spec.name == name
        assert spec.config_class.__module__ == model.__name__ and spec.presets is model.PRESETS
        assert models.config_class(name) is spec.config_class and models.model_class(name) is spec.model_class
    with pytest.raises(ValueError, match="unknown model family 'gpt'; known: reformer, t5"):
        models.spec("gpt")


def test_family_hooks():
    t5, reformer = models.spec("t5"), models.spec("reformer")
    config = t5.from_preset("tiny")
    t5.activation_checkpointing(config, True)
    assert config.gradient_checkpointing
    assert reformer.activation_checkpointing is None  # reversible layers recompute anyway
    assert t5.load_checkpoint is not None and reformer.load_checkpoint is None
    # the run's seed offsets a fixed LSH hash seed; None keeps drawing rotations from the seeded torch RNG
    fixed = reformer.from_preset("tiny", hash_seed=10)
    assert reformer.seeded(fixed, 2).hash_seed == 12 and fixed.hash_seed == 10
    assert reformer.seeded(reformer.from_preset("tiny"), 2).hash_seed is None
    deep = reformer.benchmark_config(reformer.from_preset("tiny"), 3, 100_000)
    assert deep.attn_layers == ["local", "lsh", "local"] and deep.max_positions >= 100_000
    assert t5.benchmark_config(t5.from_preset("tiny"), 3, 4096).num_decoder_layers == 3


def test_run_paths_match_the_dvc_yaml_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

    def outputs(stage: str) -> set[str]:
        body = stages[stage]
        entries = [o for k in ("outs", "metrics", "plots") for o in body.get(k, [])]
        paths = [next(iter(o)) if isinstance(o, dict) else o for o in entries]
        return {p.replace("${item.model}", "rf").replace("${item.seed}", "2") for p in paths}

    for stage in ("pretrain", "finetune"):
        paths = RunPaths(Path("."), stage, "rf", 2)
        expected = {paths.final, paths.timing, paths.metrics, paths.history("train"), paths.history("val")}
        assert outputs(stage) == {p.as_posix() for p in expected}
        assert not any(o.startswith("checkpoints/") for o in outputs(stage))  # never a DVC output (issue 23)
        assert stages[stage]["matrix"] == {"model": "${models}", "seed": "${seeds}"}
    ev = RunPaths(Path("."), "evaluate", "rf", 2)
    assert outputs("evaluate") == {ev.out.as_posix(), ev.metrics.as_posix(), ev.timing.as_posix()}
    assert ev.dvc_stage() == "evaluate@rf-2"
    ln = RunPaths(Path("."), "lengths", "rf", 2)
    assert outputs("lengths") == {ln.out.as_posix(), ln.metrics.as_posix(), ln.timing.as_posix()}
    assert stages["lengths"]["matrix"] == {"model": "${models}", "seed": "${lengths.seeds}"}  # its own seeds


def test_the_run_seed_changes_training_noise_not_validation(tmp_path):
    from pipeline.training.train import pretrain_data, read_tokenizer_info

    project = make_project(tmp_path)
    cfg = load_config(project / "params.yaml")
    tok = read_tokenizer_info(project)
    a_train, a_val, _, _ = pretrain_data(cfg, "encoder_decoder", tok, project, seed=0)
    b_train, b_val, _, _ = pretrain_data(cfg, "encoder_decoder", tok, project, seed=1)
    assert any((a_train[0, i]["inputs"] != b_train[0, i]["inputs"]).any() for i in range(8))
    assert all((a_val[0, i]["inputs"] == b_val[0, i]["inputs"]).all() for i in range(8))


# ------------------------------------------------------------------------------------------- slow


def _copy_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    return root


def _run(args: list[str], cwd: Path, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)  # the copied project, not this checkout
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_a_variant_in_params_adds_its_matrix_stages_and_every_field_takes_dash_S(tmp_path):
    project = _copy_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"]["reformer_full"] = {"family": "reformer", "use_full_attention": True, "reversible": False}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], project)
    _run([*dvc, "init", "-q"], project)

    listed = {line.split()[0] for line in _run([*dvc, "stage", "list"], project).stdout.splitlines() if line}
    for stage in ("pretrain", "finetune", "evaluate", "lengths"):
        seeds = params["lengths"]["seeds"] if stage == "lengths" else params["seeds"]  # lengths: its own seeds
        expected = {f"{stage}@{v}-{s}" for v in ("t5", "reformer", "reformer_full") for s in seeds}
        assert {n for n in listed if n.startswith(stage + "@")} == expected

    for folder in ("data/prepared", "data/tokenized", "data/tokenizer"):  # the single stage's data deps
        (project / folder).mkdir(parents=True)
    out = _run([*dvc, "repro", "--dry", "--single-item", "pretrain@reformer_full-1"], project).stdout
    assert "python -m pipeline.pretrain --model reformer_full --seed 1" in out

    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)
    ran = _run([*dvc, "exp", "run", "--dry", "-S", "models.reformer.n_hashes=8", "prepare"], project)
    assert "Running stage 'prepare'" in ran.stdout + ran.stderr
    missing = _run([*dvc, "exp", "run", "--dry", "-S", "models.reformer.n_hashs=8", "prepare"], project, ok=False)
    assert missing.returncode != 0 and "+models.reformer.n_hashs" in missing.stdout + missing.stderr


TOY_MODULE = '''
"""A throw-away family for tests/test_variants.py: bag-of-embeddings encoder, one linear decoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from models.spec import FamilySpec

PRESETS = {"tiny": {"d_model": 16}}


@dataclass
class ToyConfig:
    vocab_size: int = 256
    d_model: int = 16
    layout: str = "encoder_decoder"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dropout_rate: float = 0.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_preset(cls, name, **overrides):
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


class ToyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None):
        context = self.embed(input_ids).mean(dim=1, keepdim=True)
        return self.head(self.embed(decoder_input_ids) + context)

    def num_parameters(self, non_embedding=False):
        return sum(p.numel() for n, p in self.named_parameters() if not (non_embedding and n.startswith("embed")))

    def training_flops(self, batch_size, input_len, target_len=0):
        return 6.0 * self.num_parameters() * batch_size * (input_len + target_len)


def training_flops(config, batch_size, input_len, target_len=0):
    return 6.0 * (2 * config.vocab_size * config.d_model + config.vocab_size) * batch_size * (input_len + target_len)


SPEC = FamilySpec(
    name="toy",
    config_class=ToyConfig,
    model_class=ToyModel,
    presets=PRESETS,
    benchmark_config=lambda config, num_layers, length: config,
    training_flops=training_flops,
)
'''


@pytest.mark.slow
def test_a_new_family_is_one_module_and_one_registry_line(tmp_path):
    project = make_project(_copy_project(tmp_path / "project"), {"pretrain.max_steps": 4})
    (project / "models" / "toy.py").write_text(TOY_MODULE)
    registry = project / "models" / "__init__.py"
    before = registry.read_text()
    after = before.replace(
        "from models import reformer_family, t5_family", "from models import reformer_family, t5_family, toy"
    ).replace("(t5_family.SPEC, reformer_family.SPEC)", "(t5_family.SPEC, reformer_family.SPEC, toy.SPEC)")
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 2  # the import line and the registry line
    registry.write_text(after)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"]["toy"] = {"family": "toy", "preset": "tiny", "d_model": None}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    checked = _run([sys.executable, "-m", "pipeline.config"], project)
    assert "toy=toy/tiny" in checked.stdout
    _run([sys.executable, "-m", "pipeline.pretrain", "--model", "toy", "--seed", "0"], project)
    code = "import models; f, m = models.load_pretrained('artifacts/pretrain/toy/0/final'); print(f, type(m).__name__)"
    assert _run([sys.executable, "-c", code], project).stdout.split() == ["toy", "ToyModel"]


@pytest.mark.slow
def test_three_variants_end_to_end_through_dvc_repro(tmp_path):
    """`dvc repro` of the whole pipeline with T5, Reformer and the Reformer network with full attention and no
    reversible layers (the Reformer paper's baseline), one seed, tiny everything; a second run does nothing."""
    from tests.eval_project import EVAL_OVERRIDES
    from tests.train_project import FINETUNE_TASKS, LENGTHS, MODELS, TRAIN

    project = _copy_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    full = {**MODELS["reformer"], "use_full_attention": True, "reversible": False}
    params["models"] = {**MODELS, "reformer_full": full}
    params["seeds"] = [0]
    params["data"]["max_documents"] = 200
    params["tokenizer"]["vocab_size"] = 1000
    for stage in ("pretrain", "finetune"):
        params[stage].update({**TRAIN, "max_steps": 4, "val_every_n_steps": 2, "checkpoint_every_n_steps": 2})
        params[stage]["optimizer"]["warmup_steps"] = 1
    params["finetune"].update(tasks=FINETUNE_TASKS, input_length=64, target_length=16)
    params["trainer"].update(accelerator="cpu", progress_bar=False)
    params["trainer"]["divergence"]["patience_steps"] = 0  # 4-step runs: no room for the stuck-loss guard
    params["mlflow"]["system_metrics"] = False
    for dotted, value in EVAL_OVERRIDES.items():
        section, key = dotted.split(".")
        params[section][key] = value
    params["benchmark"].update(seq_lengths=[32], depths=[1], time_budget_s=60.0)
    params["lengths"] = LENGTHS
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], project)
    _run([*dvc, "init", "-q"], project)

    out = _run([*dvc, "repro"], project, timeout=1800).stdout  # 17 stage processes
    for variant in ("t5", "reformer", "reformer_full"):
        for stage in ("pretrain", "finetune", "evaluate", "lengths"):
            assert f"Running stage '{stage}@{variant}-0'" in out
            assert RunPaths(project, stage, variant, 0).metrics.is_file()
    report = (project / "reports" / "comparison.md").read_text()
    assert all(re.search(rf"\b{v}\b", report) for v in ("t5", "reformer", "reformer_full"))
    config = yaml.safe_load((project / "artifacts/pretrain/reformer_full/0/final/config.json").read_text())
    assert config["family"] == "reformer" and config["config"]["use_full_attention"] is True
    assert config["config"]["reversible"] is False
    assert "Data and pipelines are up to date" in _run([*dvc, "repro"], project).stdout
