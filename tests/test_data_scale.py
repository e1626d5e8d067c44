"""Data at corpus scale (issue 14): one big text file, data presets on local stand-ins of the hub layouts,
and a tokenize that runs in parallel, resumes after a kill and cleans up after killed runs."""

from __future__ import annotations

import gc
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import tokenize as tokenize_stage
from pipeline.data.corpus import DATA_PRESETS, wikitext_articles
from pipeline.data.tokenstore import TokenStore
from pipeline.prepare import main as prepare_main
from pipeline.tokenize import main as tokenize_main

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a of river stone light garden window morning quiet letter road winter music paper north".split()


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=int(rng.integers(15, 40)))).capitalize() + f" (part {i})." for i in range(n)
    ]


def _project(root: Path, data: dict | None = None, tokenizer: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data or {})
    params["tokenizer"].update({"vocab_size": 100, "num_sentinels": 20, **(tokenizer or {})})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


# -------------------------------------------------------------------------------------- one big text file


def test_a_single_one_megabyte_book_is_cut_into_paragraph_documents(tmp_path, monkeypatch):
    text = "\n\n".join(_paragraphs(6000))
    (tmp_path / "book.txt").write_text(text[: 1 << 20], encoding="utf-8")
    root = _project(tmp_path, {"source": "files", "files": {"glob": "book.txt"}})
    monkeypatch.chdir(root)
    assert prepare_main([]) == 0
    metrics = json.loads((root / "metrics" / "prepare.json").read_text())
    assert metrics["documents_kept"] > 4000 and metrics["test"]["documents"] > 100
    prepared = datasets.load_from_disk(str(root / "data" / "prepared"))
    assert "\n\n" not in "".join(prepared["validation"]["text"][:20])  # paragraphs, not the file
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]

    _project(root, {"source": "files", "files": {"glob": "book.txt", "sample_by": "document"}})
    assert prepare_main([]) == 1  # one document: the error says what to change
    assert metrics == json.loads((root / "metrics" / "prepare.json").read_text())  # previous result kept


# ------------------------------------------------------------------------------------------ presets


def _readme(config: str, splits: dict[str, str]) -> str:
    files = "".join(f"  - split: {split}\n    path: {path}\n" for split, path in splits.items())
    return f"---\nconfigs:\n- config_name: {config}\n  data_files:\n{files}---\n# local stand-in\n"


def _c4_standin(root: Path) -> Path:
    """allenai/c4's layout: README configs, en/c4-{split}.NNNNN-of-NNNNN.json.gz with text/timestamp/url."""
    (root / "en").mkdir(parents=True)
    (root / "README.md").write_text(
        _readme("en", {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"})
    )
    docs = _paragraphs(60, seed=1)
    for shard in range(2):
        with gzip.open(root / "en" / f"c4-train.{shard:05d}-of-00002.json.gz", "wt", encoding="utf-8") as fh:
            for doc in docs[shard::2]:
                fh.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x.org"}) + "\n")
    with gzip.open(root / "en" / "c4-validation.00000-of-00001.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "held out", "timestamp": "2019-04-25T12:57:54Z", "url": "https://x.org"}) + "\n")
    return root


def _wikitext_standin(root: Path) -> tuple[Path, list[str]]:
    """Salesforce/wikitext's layout: README configs, wikitext-103-raw-v1/{split}-NNNNN-of-NNNNN.parquet, rows
    are lines with ` = Title = ` headings."""
    config = "wikitext-103-raw-v1"
    (root / config).mkdir(parents=True)
    (root / "README.md").write_text(_readme(config, {s: f"{config}/{s}-*" for s in ("train", "validation", "test")}))
    rows, titles = [], []
    for a in range(12):
        titles.append(f" = Article {a} = \n")
        rows += ["", titles[-1], "", " = = Section = = \n", *[p + " \n" for p in _paragraphs(3, seed=a)]]
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.table({"text": part}), root / config / f"train-{i:05d}-of-00002.parquet")
    for split in ("validation", "test"):
        pq.write_table(pa.table({"text": [" = V = \n", "x \n"]}), root / config / f"{split}-00000-of-00001.parquet")
    return root, titles


def test_wikitext_rows_are_regrouped_into_articles():
    rows = ["", " = A = \n", "", " = = Sub = = \n", "text a \n", " = B = \n", "text b \n"]
    assert list(wikitext_articles(rows)) == [" = A = \n = = Sub = = \ntext a \n", " = B = \ntext b \n"]


def test_presets_carry_the_c4_pretraining_setting():
    for preset in DATA_PRESETS.values():
        setting = preset.pretraining_params
        assert setting["tokenizer.vocab_size"] == 32_100 and setting["pretrain.input_length"] == 512
    assert DATA_PRESETS["c4-en"].hub == "allenai/c4" and DATA_PRESETS["c4-en"].config == "en"


@pytest.mark.parametrize("preset", ["c4-en", "wikitext-103"])
def test_preset_prepares_from_a_local_standin_of_the_hub_layout(tmp_path, monkeypatch, preset):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    if preset == "c4-en":
        standin, expected = _c4_standin(tmp_path / "c4"), 60
    else:
        standin, titles = _wikitext_standin(tmp_path / "wikitext")
        expected = len(titles)
    root = _project(tmp_path, {"source": "preset", "preset": preset, "preset_dir": str(standin), "min_chars": 20})
    monkeypatch.chdir(root)
    assert prepare_main([]) == 0
    metrics = json.loads((root / "metrics" / "prepare.json").read_text())
    assert metrics["documents_kept"] == expected  # the train split only; held-out files are not read
    texts = [t for split in datasets.load_from_disk(str(root / "data" / "prepared")).values() for t in split["text"]]
    if preset == "wikitext-103":
        assert sorted(t.split("\n")[0] for t in texts) == sorted(t.strip() for t in titles)

    _project(tmp_path, {"source": "preset", "preset": preset, "preset_dir": str(tmp_path / "nowhere")})
    assert prepare_main([]) == 1


# --------------------------------------------------------------------------------------------- tokenize


def _prepared_project(root: Path, n_docs: int, **tokenizer) -> Path:
    docs = _paragraphs(n_docs, seed=3)
    splits = {"train": docs[: n_docs - 40], "validation": docs[-40:-20], "test": docs[-20:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(root / "data" / "prepared")
    )
    return _project(root, tokenizer=tokenizer)


def _store_files(root: Path) -> dict[str, bytes]:
    base = root / "data" / "tokenized"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_parallel_sharded_tokenize_equals_one_process_and_cleans_up_killed_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_stage, "MIN_PARALLEL_BYTES", 0)
    serial = _prepared_project(tmp_path / "serial", 600, num_proc=1, shard_mb=0.01)
    monkeypatch.chdir(serial)
    assert tokenize_main([]) == 0
    parallel = _prepared_project(tmp_path / "parallel", 600, num_proc=2, shard_mb=0.01)
    monkeypatch.chdir(parallel)
    stale = [parallel / "data" / ".tokenized.999999.deadbeef.tmp", parallel / "data" / ".tokenizer.999998.x.tmp"]
    for path in stale:
        path.mkdir(parents=True)
    assert tokenize_main([]) == 0
    timing = json.loads((parallel / "artifacts" / "timing" / "tokenize.json").read_text())
    assert timing["processes"] == 2 and timing["shards"] > 4
    # the metrics are the same bytes whatever the process count and sharding (both live in the timing file)
    assert (parallel / "metrics" / "tokenize.json").read_bytes() == (serial / "metrics" / "tokenize.json").read_bytes()
    assert gc.get_freeze_count() == 0  # the parent's objects were frozen only while the workers ran
    assert _store_files(parallel) == _store_files(serial)  # same bytes whatever the process count
    assert not any(p.exists() for p in stale) and not (parallel / "data" / "tokenized.partial").exists()
    store = TokenStore(parallel / "data" / "tokenized")
    metrics = json.loads((parallel / "metrics" / "tokenize.json").read_text())
    assert store["train"].num_tokens == metrics["train"]["tokens"] and len(store["test"]) == 20


def test_tokenizer_is_trained_on_a_bounded_sample(tmp_path, monkeypatch):
    root = _prepared_project(tmp_path, 600, train_sample_mb=0.01)
    seen = []
    original = tokenize_stage.train_sentencepiece

    def spy(texts, *args, **kwargs):
        seen.append(sum(len(t.encode()) for t in texts))
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(tokenize_stage, "train_sentencepiece", spy)
    monkeypatch.chdir(root)
    assert tokenize_main([]) == 0
    assert 0 < seen[0] <= 10_000


@pytest.mark.slow
def test_a_killed_tokenize_resumes_from_its_finished_shards(tmp_path):
    clean = _prepared_project(tmp_path / "clean", 3000, num_proc=1, shard_mb=0.02, batch_size=20)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_LOG_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "pipeline.tokenize"]
    subprocess.run(cmd, cwd=clean, env=env, check=True, capture_output=True)

    root = _prepared_project(tmp_path / "killed", 3000, num_proc=1, shard_mb=0.02, batch_size=20)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = root / "data" / "tokenized.partial" / "shards"
    deadline = time.monotonic() + 120

    def done() -> int:  # finished shards only: not the `.<name>.<pid>.tmp.npz` a kill can leave behind
        return len([f for f in shards.glob("*.npz") if not f.name.startswith(".")])

    while done() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = done()
    assert finished >= 3 and not (root / "data" / "tokenized").exists()

    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    assert f"resuming: {finished} of" in out.stderr
    assert json.loads((root / "artifacts" / "timing" / "tokenize.json").read_text())["shards_resumed"] >= finished
    assert (root / "metrics" / "tokenize.json").read_bytes() == (clean / "metrics" / "tokenize.json").read_bytes()
    assert _store_files(root) == _store_files(clean)
    assert (root / "data" / "tokenizer" / "spm.model").read_bytes() == (
        clean / "data" / "tokenizer" / "spm.model"
    ).read_bytes()
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


def _mapped_rss_kb(path: Path) -> int:
    """Resident KB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_split_texts_reads_every_arrow_file_in_order_and_releases_the_pages_it_read(tmp_path):
    texts = [f"{p} {'x' * (i % 50)}" for i, p in enumerate(_paragraphs(20_000))]  # ~1.6 MB in 2+ Arrow files
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(
        str(tmp_path), max_shard_size="600KB"
    )
    files = sorted((tmp_path / "train").glob("*.arrow"))
    assert len(files) >= 2
    split = tokenize_stage.SplitTexts(tmp_path / "train")
    assert len(split) == len(texts)
    assert list(tokenize_stage.document_bytes(split)) == [len(t.encode()) for t in texts]
    assert tokenize_stage.sampled_texts(split, np.array([0, 7, 19_999])) == [texts[0], texts[7], texts[19_999]]

    read = [t for s in range(0, len(texts), 1000) for t in split.slice(s, 1000)]
    assert read == texts
    assert sum(_mapped_rss_kb(f) for f in files) <= 64  # a few pages at the edges at most, not the files

    # the same reads without releasing keep the text resident: what the release saves
    kept = [t for s in range(0, len(texts), 1000) for t in split.column.slice(s, 1000).to_pylist()]
    assert kept == texts and sum(_mapped_rss_kb(f) for f in files) > 1000
    split.release_all()
    assert sum(_mapped_rss_kb(f) for f in files) <= 4 * 8


def test_tokenize_fails_cleanly_on_an_unreadable_prepared_arrow_file(tmp_path, monkeypatch, capsys):
    root = _prepared_project(tmp_path, 200)
    (next((root / "data" / "prepared" / "train").glob("*.arrow"))).write_bytes(b"not arrow")
    monkeypatch.chdir(root)
    assert tokenize_main([]) == 1
    err = capsys.readouterr().err
    # `datasets.load_from_disk` finds it first, before the stage maps the files itself
    assert "cannot load the prepared dataset" in err and "re-run prepare" in err and "Traceback" not in err, err
    assert not (root / "data" / "tokenized").exists()
