"""Corpus reading, cleaning and splitting (`pipeline/data/corpus.py`), and the `prepare` stage."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.common import StageError
from pipeline.config.sections import DataConfig, FilesSource, HubSource
from pipeline.data.corpus import (
    CorpusStats,
    clean_documents,
    file_documents,
    hub_documents,
    module_docstrings,
    normalize_text,
    pydoc_topics,
    split_documents,
    stdlib_dir,
    stdlib_source_files,
)
from pipeline.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[1]


def _doc(i: int) -> str:
    return f"Document {i}: " + " ".join(f"word{i}_{j}" for j in range(12))


# -------------------------------------------------------------------------------------------- cleaning


def test_normalize_whitespace():
    raw = "  Title\t\there  \r\n\r\n\r\n\r\nfirst   line \n\tsecond\u00a0line\n\n\n"
    assert normalize_text(raw) == "Title here\n\nfirst line\nsecond line"
    assert normalize_text("a\n\nb") == "a\n\nb"  # one paragraph break is kept


def test_clean_drops_short_and_duplicate_documents():
    docs = [_doc(1), "short", _doc(2), "  " + _doc(1) + "  ", None, _doc(3), _doc(2)]
    stats = CorpusStats()
    kept = clean_documents(docs, DataConfig(min_chars=20), stats)
    assert kept == [_doc(1), _doc(2), _doc(3)]
    assert (stats.read, stats.too_short, stats.duplicates_removed) == (7, 2, 2)


def test_clean_options_off():
    docs = [_doc(1) + "   x", _doc(1) + "   x"]
    kept = clean_documents(docs, DataConfig(min_chars=0, normalize_whitespace=False, dedup=False), CorpusStats())
    assert kept == docs


def test_max_documents_stops_reading_early():
    consumed = []

    def source():
        for i in range(1000):
            consumed.append(i)
            yield _doc(i % 7)  # duplicates do not count towards the cap

    kept = clean_documents(source(), DataConfig(max_documents=5, min_chars=10), CorpusStats())
    assert len(kept) == 5 and len(set(kept)) == 5
    assert len(consumed) == 5


def test_split_is_a_deterministic_partition():
    docs = [_doc(i) for i in range(200)]
    a = split_documents(docs, seed=1, validation_fraction=0.1, test_fraction=0.05)
    assert a == split_documents(docs, seed=1, validation_fraction=0.1, test_fraction=0.05)
    assert a != split_documents(docs, seed=2, validation_fraction=0.1, test_fraction=0.05)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (170, 20, 10)
    assert sorted(a["train"] + a["validation"] + a["test"]) == sorted(docs)
    assert a["test"] == [d for d in docs if d in set(a["test"])]  # source order kept within a split


def test_split_needs_three_documents():
    assert {k: len(v) for k, v in split_documents(["a", "b", "c"], 0, 0.01, 0.01).items()} == {
        "train": 1,
        "validation": 1,
        "test": 1,
    }
    with pytest.raises(StageError, match="at least 3"):
        split_documents(["a", "b"], 0, 0.1, 0.1)


# --------------------------------------------------------------------------------------------- builtin


def test_pydoc_topics_are_prose():
    topics = list(pydoc_topics())
    assert len(topics) > 50
    assert sum(map(len, topics)) > 200_000
    assert any("assert" in t.lower() for t in topics)


def test_stdlib_files_are_sorted_and_skip_tests_and_packages():
    files = list(stdlib_source_files())
    assert files == list(stdlib_source_files())
    rel = [f.relative_to(stdlib_dir()).parts for f in files]
    assert len(rel) > 200
    assert ("json", "decoder.py") in rel
    for parts in rel:
        assert not {"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(parts)
        assert not parts[-1].startswith("test_")


def test_module_docstrings_in_reading_order_without_private_helpers():
    source = b'''"""Module doc."""
class Public:
    """Class doc."""
    def method(self):
        """Method doc."""
    def _helper(self):
        """Private doc."""
def function():
    """Function doc."""
def __dunder__():
    """Dunder doc."""
'''
    assert list(module_docstrings(source)) == [
        "Module doc.",
        "Class doc.",
        "Method doc.",
        "Function doc.",
        "Dunder doc.",
    ]
    assert list(module_docstrings(b"def broken(:\n")) == []


def test_builtin_corpus_is_parsed_not_imported():
    """The whole builtin corpus in a fresh interpreter: about 1 MB, nothing executed (e.g. `this` prints)."""
    script = """
import json, sys
from pipeline.config.sections import DataConfig
from pipeline.data.corpus import CorpusStats, builtin_documents, clean_documents
stats = CorpusStats()
docs = clean_documents(builtin_documents(), DataConfig(), stats)
imported = [m for m in ("this", "antigravity", "turtle", "tkinter", "idlelib") if m in sys.modules]
print(json.dumps({"docs": len(docs), "chars": sum(map(len, docs)), "read": stats.read, "imported": imported}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    result = json.loads(proc.stdout)  # stdout holds only our line: no module printed anything
    assert result["imported"] == []
    assert 500_000 < result["chars"] < 3_000_000
    assert result["docs"] > 1000 and result["read"] > result["docs"]


# ------------------------------------------------------------------------------------------ files


def _files(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(_doc(1), encoding="utf-8")
    (corpus / "sub" / "b.txt").write_text(_doc(2), encoding="utf-8")
    (corpus / "c.jsonl").write_text(
        "\n".join(json.dumps({"body": _doc(i), "id": i}) for i in (3, 4)) + "\n\n", encoding="utf-8"
    )
    pq.write_table(pa.table({"body": [_doc(5), _doc(6)], "n": [5, 6]}), corpus / "d.parquet")
    return corpus


def _read(glob: str, root: Path, stats: CorpusStats | None = None, on_invalid: str = "skip", **files) -> list:
    return list(file_documents(FilesSource(glob=glob, **files), root, on_invalid, stats or CorpusStats()))


def test_files_source_reads_text_json_parquet_and_csv_through_datasets(tmp_path):
    corpus = _files(tmp_path)
    assert _read("corpus/**/*.txt", tmp_path, sample_by="document") == [_doc(1), _doc(2)]  # sorted: a, sub/b
    assert _read("corpus/*.jsonl", tmp_path, text_field="body") == [_doc(3), _doc(4)]
    assert _read("corpus/*.parquet", tmp_path, text_field="body") == [_doc(5), _doc(6)]
    (corpus / "e.csv").write_text("body,n\n" + "".join(f'"{_doc(i)}",{i}\n' for i in (7, 8)))
    assert _read("corpus/*.csv", tmp_path, text_field="body") == [_doc(7), _doc(8)]
    with gzip.open(corpus / "f.json.gz", "wt") as fh:
        fh.write(json.dumps({"body": _doc(9)}) + "\n")
    assert _read("corpus/f.json.gz", tmp_path, text_field="body") == [_doc(9)]


def test_one_text_file_is_cut_into_documents_by_sample_by(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Chapter one.\nIt was a dark night.\n\nChapter two.\n\n\nThe end.\n")
    assert _read("book.txt", tmp_path, sample_by="document") == [book.read_text()]
    paragraphs = _read("book.txt", tmp_path, sample_by="paragraph")
    assert [p.strip() for p in paragraphs] == ["Chapter one.\nIt was a dark night.", "Chapter two.", "The end."]
    lines = _read("book.txt", tmp_path, sample_by="line")
    assert [x for x in lines if x] == ["Chapter one.", "It was a dark night.", "Chapter two.", "The end."]


def test_invalid_utf8_is_skipped_and_counted_or_an_error(tmp_path):
    corpus = _files(tmp_path)
    (corpus / "bad.txt").write_bytes(b"caf\xe9 au lait " * 10)
    with (corpus / "c.jsonl").open("ab") as fh:
        fh.write(b'{"body": "bad \xff record"}\n')
    stats = CorpusStats()
    assert _read("corpus/**/*.txt", tmp_path, stats, sample_by="document") == [_doc(1), _doc(2)]
    assert _read("corpus/*.jsonl", tmp_path, stats, text_field="body") == []  # a file is skipped whole
    assert stats.skipped_files == 2 and stats.skipped_paths == [str(corpus / "bad.txt"), str(corpus / "c.jsonl")]
    with pytest.raises(StageError, match="bad.txt.*not valid UTF-8"):
        _read("corpus/*.txt", tmp_path, on_invalid="error")


def test_files_errors_are_clear(tmp_path):
    corpus = _files(tmp_path)
    with pytest.raises(StageError, match="matched no files"):
        list(file_documents(FilesSource(glob="nothing/*.txt"), tmp_path, "skip", CorpusStats()))
    with pytest.raises(StageError, match="c.jsonl: no field 'text'.*body, id"):
        _read("corpus/*.jsonl", tmp_path)
    with pytest.raises(StageError, match="d.parquet: no field 'text'.*body, n"):
        _read("corpus/*.parquet", tmp_path)
    with pytest.raises(StageError, match="mixes json and parquet"):
        _read("corpus/*.*", tmp_path)
    (corpus / "notes.bin").write_text("# notes")
    with pytest.raises(StageError, match="unsupported type.*data.files.format"):
        _read("corpus/*", tmp_path)
    (corpus / "e.jsonl").write_text("{not json\n")
    with pytest.raises(StageError, match="e.jsonl: cannot read it as json"):
        _read("corpus/e.jsonl", tmp_path)


# -------------------------------------------------------------------------------------------- hub


@pytest.fixture
def local_hub_dataset(tmp_path, monkeypatch) -> Path:
    """A dataset directory `datasets.load_dataset` reads offline (jsonl data files), and a private cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = tmp_path / "hub-dataset"
    (root / "data").mkdir(parents=True)
    records = [{"article": _doc(i), "label": i % 2} for i in range(30)]
    (root / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


@pytest.mark.parametrize("streaming", [True, False])
def test_hub_source_reads_the_text_column(local_hub_dataset, streaming):
    hub = HubSource(name=str(local_hub_dataset), config=None, split="train", text_column="article", streaming=streaming)
    stats = CorpusStats()
    docs = clean_documents(hub_documents(hub), DataConfig(max_documents=10, min_chars=10), stats)
    assert docs == [_doc(i) for i in range(10)]
    assert stats.read == 10  # the cap stops the stream


def test_hub_missing_column_names_the_columns(local_hub_dataset):
    hub = HubSource(name=str(local_hub_dataset), config=None, split="train", text_column="text", streaming=True)
    with pytest.raises(StageError, match="no column 'text'.*article, label"):
        list(hub_documents(hub))


def test_hub_missing_dataset_is_a_clear_error(tmp_path):
    hub = HubSource(name=str(tmp_path / "nowhere"), config=None, split="train", streaming=True)
    with pytest.raises(StageError, match="data.hub"):
        list(hub_documents(hub))


# ------------------------------------------------------------------------------------------ stage


def _project(tmp_path: Path, **data) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in ("data", "metrics")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def _set_data_params(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_prepare_stage_outputs_and_failures_keep_them(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(_doc(i))
    (corpus / "dup.txt").write_text(_doc(3))
    (corpus / "short.txt").write_text("too short")
    (corpus / "latin1.txt").write_bytes(b"d\xe9j\xe0 vu " * 20)
    root = _project(tmp_path, source="files", files={"glob": "corpus/*.txt", "sample_by": "document"})
    monkeypatch.chdir(root)
    assert prepare_main([]) == 0

    ds = datasets.load_from_disk(str(root / "data" / "prepared"))
    metrics = json.loads((root / "metrics" / "prepare.json").read_text())
    assert set(ds) == {"train", "validation", "test"}
    assert sorted(text for split in ds.values() for text in split["text"]) == sorted(_doc(i) for i in range(40))
    for name, split in ds.items():
        texts = list(split["text"])
        assert metrics[name] == {
            "documents": len(texts),
            "characters": sum(map(len, texts)),
            "words": sum(len(t.split()) for t in texts),
        }
    assert (metrics["duplicates_removed"], metrics["too_short"], metrics["skipped_files"]) == (1, 1, 1)
    assert json.loads((root / "data" / "prepared" / "stats.json").read_text())["source"] == "files"

    before = _snapshot(root)
    assert prepare_main([]) == 0
    assert _snapshot(root) == before  # same input, byte-identical outputs

    _set_data_params(root, on_invalid_utf8="error")
    assert prepare_main([]) == 1
    assert _snapshot(root) == before
    _set_data_params(root, on_invalid_utf8="skip", files={"glob": "elsewhere/*.txt"})
    assert prepare_main([]) == 1
    assert _snapshot(root) == before
    _set_data_params(root, files={"glob": "corpus/*.txt"}, min_chars=100_000)
    assert prepare_main([]) == 1
    assert _snapshot(root) == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_prepare_builtin_with_a_document_cap(tmp_path, monkeypatch):
    root = _project(tmp_path, max_documents=60)
    monkeypatch.chdir(root)
    assert prepare_main([]) == 0
    metrics = json.loads((root / "metrics" / "prepare.json").read_text())
    assert metrics["documents_kept"] == 60
    assert sum(metrics[s]["documents"] for s in ("train", "validation", "test")) == 60


def test_prepare_empty_corpus_exits_with_one_error_line(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    root = _project(tmp_path, source="files", files={"glob": "corpus/*.txt", "text_field": "text"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "empty" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (root / "data" / "prepared").exists() and not (root / "metrics").exists()
