"""What the stages log to MLflow: experiment kind and artifact location, relocation of a moved store, DVC tags and
parent runs, the params a stage reads, model params, dataset inputs, and LoggedModels from safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import models
from pipeline.tracking import logged as ml
from tests.train_project import MODELS

# the tiny shapes of the test projects, at a fixed vocabulary
SMALL = {
    name: {**{k: v for k, v in m.items() if k not in ("family", "preset")}, "vocab_size": 128}
    for name, m in MODELS.items()
}


def tiny_model(family: str):
    return models.build_model(family, models.config_class(family).from_preset("tiny", **SMALL[family]))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An sqlite store with MLflow's tables, created once (the schema migration is the slow part)."""
    from mlflow.tracking import MlflowClient

    directory = tmp_path_factory.mktemp("store")
    MlflowClient(f"sqlite:///{directory / 'mlflow.db'}").search_experiments()
    return directory / "mlflow.db"


@pytest.fixture
def store(empty_store: Path, tmp_path: Path, monkeypatch) -> str:
    """A fresh copy of the empty store in this test's directory; no DVC experiment in the environment."""
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_experiment_opens_in_the_training_view_with_artifacts_beside_the_store(store: str, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    experiment_id = ml.ensure_experiment(store, "t5-vs-reformer", description="T5 versus Reformer")
    assert ml.ensure_experiment(store, "t5-vs-reformer") == experiment_id  # found, not created twice
    experiment = MlflowClient(store).get_experiment(experiment_id)
    assert experiment.tags[ml.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI view
    assert experiment.tags["mlflow.note.content"] == "T5 versus Reformer"
    assert ml._local_path(experiment.artifact_location) == tmp_path / "mlartifacts" / "t5-vs-reformer"


def test_a_moved_repository_logs_into_its_own_artifact_directory(store: str, tmp_path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    old = tmp_path
    experiment_id = ml.ensure_experiment(store, "exp")
    client = MlflowClient(store)
    run = client.create_run(experiment_id)
    (old / "note.txt").write_text("before the move")
    client.log_artifact(run.info.run_id, str(old / "note.txt"))
    client.set_terminated(run.info.run_id)

    new = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(old, new)  # `cp -r` of the repository: the database and its artifacts travel together
    new_uri = f"sqlite:///{new / 'mlflow.db'}"
    assert ml.ensure_experiment(new_uri, "exp") == experiment_id
    moved = MlflowClient(new_uri)
    assert ml._local_path(moved.get_experiment(experiment_id).artifact_location) == new / "mlartifacts" / "exp"
    assert ml._local_path(moved.get_run(run.info.run_id).info.artifact_uri).is_relative_to(new)
    fetched = moved.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "download"))
    assert Path(fetched).read_text() == "before the move"

    mlflow.set_tracking_uri(new_uri)
    with mlflow.start_run(experiment_id=experiment_id) as after:
        mlflow.log_text("after the move", "after.txt")
    assert (new / "mlartifacts" / "exp" / after.info.run_id / "artifacts" / "after.txt").is_file()
    assert not (old / "mlartifacts" / "exp" / after.info.run_id).exists()  # the original repository is untouched
    assert ml._local_path(MlflowClient(store).get_experiment(experiment_id).artifact_location).is_relative_to(old)


def test_store_root_is_the_users_repository_under_dvc_exp_run(tmp_path: Path, monkeypatch):
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1234"
    temp_copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert ml.store_root(temp_copy) == temp_copy.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # what `dvc exp run --temp/--queue` exports
    assert ml.store_root(temp_copy) == tmp_path.resolve()
    from pipeline.tracking.runs import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, temp_copy) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # not the copy's


def test_runs_nest_under_one_parent_per_dvc_experiment(store: str, monkeypatch):
    from mlflow.tracking import MlflowClient

    experiment_id = ml.ensure_experiment(store, "exp")
    workspace = ml.run_tags(store, experiment_id, "abc123", seed=0)
    assert workspace["dvc_exp"] == "workspace" and workspace["seed"] == "0"
    assert ml.run_tags(store, experiment_id, "abc123")["mlflow.parentRunId"] == workspace["mlflow.parentRunId"]
    monkeypatch.setenv("DVC_EXP_NAME", "lusty-hash")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    exp = ml.run_tags(store, experiment_id, "abc123-dirty", seed=1)
    assert exp["dvc_exp"] == "lusty-hash" and exp["dvc_baseline_rev"] == "abc123"
    assert exp["mlflow.parentRunId"] != workspace["mlflow.parentRunId"]
    client = MlflowClient(store)
    parent = client.get_run(exp["mlflow.parentRunId"])
    assert parent.info.run_name == "lusty-hash" and parent.info.status == "FINISHED"
    assert client.get_run(workspace["mlflow.parentRunId"]).info.run_name == "workspace@abc123"


def test_stage_params_are_the_ones_dvc_yaml_lists_for_the_stage(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  pretrain:\n"
        "    matrix: {model: [t5, reformer], seed: [0, 1]}\n"
        "    cmd: python -m pipeline.pretrain --model ${item.model} --seed ${item.seed}\n"
        "    params:\n"
        "      - seed\n"
        "      - models.${item.model}\n"
        "      - pretrain\n"
        "      - trainer.precision\n"
        "      - params.yaml: [data.source]\n"
    )
    params = {
        "seed": 1,
        "data": {"source": "builtin", "min_chars": 64},
        "models": {"t5": {"preset": "tiny"}, "reformer": {"preset": "tiny", "n_hashes": 8}},
        "pretrain": {"max_steps": 10, "optimizer": {"lr": 0.01}},
        "finetune": {"max_steps": 5},
        "trainer": {"precision": "32-true", "progress_bar": True},
    }
    keys = ml.dvc_stage_params(tmp_path / "dvc.yaml", "pretrain", {"model": "reformer", "seed": 1})
    assert keys == ["seed", "models.reformer", "pretrain", "trainer.precision", "data.source"]
    assert ml.stage_params(params, "pretrain", "reformer", 1, tmp_path) == {
        "seed": 1,
        "pretrain": {"max_steps": 10, "optimizer": {"lr": 0.01}},
        "trainer": {"precision": "32-true"},
        "data": {"source": "builtin"},
    }  # no finetune section, no unused trainer keys; the model is logged resolved (`model_params`)
    without_models = {k: v for k, v in params.items() if k != "models"}
    assert ml.stage_params(params, "unknown", "t5", 0, tmp_path) == without_models
    no_dvc = ml.stage_params(params, "pretrain", "t5", 0, tmp_path / "elsewhere")  # the pipeline's own dvc.yaml
    assert "pretrain" in no_dvc and "finetune" not in no_dvc and "models" not in no_dvc


def test_model_params_share_keys_across_families_and_show_what_differs():
    t5 = ml.model_params(tiny_model("t5"), "t5", "t5")
    reformer = ml.model_params(tiny_model("reformer"), "reformer_8", "reformer")
    for params in (t5, reformer):
        assert {"model.d_model", "model.parameters", "model.non_embedding_parameters", "model.family"} <= set(params)
        assert int(params["model.parameters"]) > int(params["model.non_embedding_parameters"]) > 0
    assert reformer["model.n_hashes"] and "model.n_hashes" not in t5
    differing = {k for k in set(t5) | set(reformer) if t5.get(k) != reformer.get(k)}
    assert {"model.family", "model.parameters", "model.n_hashes"} <= differing


def test_dataset_inputs_and_a_logged_model_from_safetensors(store: str, tmp_path: Path):
    import mlflow
    import sentencepiece as spm
    from mlflow.tracking import MlflowClient

    tok = tmp_path / "tokenizer"
    tok.mkdir()
    lines = [f"listops [MAX {i} {i + 1} ] word{i % 7} text{i % 11}" for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tok / "spm"), vocab_size=40,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (tok / "tokenizer.json").write_text('{"vocab_size": 40, "num_sentinels": 0, "pad_id": 0, "eos_id": 1}')
    model = tiny_model("t5")
    models.save_pretrained(model, "t5", tmp_path / "final")

    mlflow.set_tracking_uri(store)
    experiment_id = ml.ensure_experiment(store, "exp")
    sizes = {"documents": 9, "tokens": 99}
    split = ml.SplitInfo("tokenized/train", "data/tokenized/train", "d1g3st", "training", sizes)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        (dataset,) = ml.log_token_splits([split], origin="builtin", stage="pretrain")
        model_id = ml.log_trained_model(
            tmp_path / "final", tok, "finetune-t5-0", ml.model_params(model, "t5", "t5"), {"val_loss": 1.5, "steps": 8},
            model_type="t5", register_as="exp-t5", dataset=dataset,
        )  # fmt: skip
    client = MlflowClient(store)
    (inp,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest, inp.dataset.source_type) == ("tokenized/train", "d1g3st", "dvc")
    assert '"path": "data/tokenized/train"' in inp.dataset.source and '"documents": 9' in inp.dataset.profile
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"

    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run.info.run_id and logged.model_type == "t5"
    assert logged.params["model.d_model"] == "32"
    assert {m.key: m.value for m in logged.metrics} == {"val_loss": 1.5, "steps": 8.0}
    assert {m.dataset_digest for m in logged.metrics} == {"d1g3st"}
    files = [p.relative_to(tmp_path) for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]  # nothing pickled
    (version,) = client.search_model_versions("name = 'exp-t5'")
    assert version.source == f"models:/{model_id}"

    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    outputs = loaded.predict(["listops [MAX 2 3 ]", "word1"])
    assert isinstance(outputs, list) and len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_token_store_splits_read_sizes_and_digest(tmp_path: Path):
    split = tmp_path / "data" / "tokenized" / "train"
    split.mkdir(parents=True)
    (split / "meta.json").write_text('{"documents": 12, "tokens": 340, "dtype": "uint16", "sha256": "ab12cd34ef56" }')
    (info,) = ml.token_store_splits(tmp_path, {"train": "training", "test": "testing"})  # no test split: left out
    assert info == ml.SplitInfo(
        "tokenized/train", "data/tokenized/train", "ab12cd34ef56", "training", {"documents": 12, "tokens": 340}
    )


def test_context_tags_create_the_experiment_once(store: str):
    from mlflow.tracking import MlflowClient

    first = ml.context_tags(store, "t5-vs-reformer", "rev1", seed=2)
    again = ml.context_tags(store, "t5-vs-reformer", "rev1", seed=2)
    assert first == again and first["seed"] == "2"
    experiment = MlflowClient(store).get_experiment_by_name("t5-vs-reformer")
    assert experiment.tags["mlflow.note.content"] == ml.EXPERIMENT_DESCRIPTION
