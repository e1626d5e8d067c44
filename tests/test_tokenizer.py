"""The T5-convention tokenizer (`pipeline/data/tokenizer.py`) and the `tokenize` stage (`pipeline/tokenize.py`)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece as spm
import yaml

from pipeline.common import StageError
from pipeline.data.corpus import pydoc_topics
from pipeline.data.tokenizer import Tokenizer, train_sentencepiece
from pipeline.data.tokenstore import TokenStore
from pipeline.tokenize import main as tokenize_main
from pipeline.tokenize import plan_shards, sample_documents

REPO = Path(__file__).resolve().parents[1]
NUM_PIECES = 400
NUM_SENTINELS = 20


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(pydoc_topics())[:30]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    train_sentencepiece(corpus, path, num_pieces=NUM_PIECES, seed=7)
    return path


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer(model_path, NUM_SENTINELS)


# ------------------------------------------------------------------------------------------- ids


def test_special_ids_follow_t5(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tok.sp.bos_id() == -1  # T5 has no bos


def test_sentinels_sit_on_top_of_the_vocabulary(tok):
    assert tok.num_pieces == NUM_PIECES
    assert tok.vocab_size == NUM_PIECES + NUM_SENTINELS
    assert tok.sentinel_id(0) == tok.vocab_size - 1
    ids = [tok.sentinel_id(i) for i in range(NUM_SENTINELS)]
    assert ids == sorted(ids, reverse=True)
    assert min(ids) == NUM_PIECES
    assert all(tok.is_sentinel(i) for i in ids)
    assert not tok.is_sentinel(NUM_PIECES - 1)
    assert tok.id_to_token(tok.sentinel_id(3)) == "<extra_id_3>"
    with pytest.raises(IndexError):
        tok.sentinel_id(NUM_SENTINELS)
    with pytest.raises(IndexError):
        tok.sentinel_id(-1)


# ------------------------------------------------------------------------------ encode / decode


def test_encode_appends_eos_only_when_asked(tok):
    with_eos, without = tok.encode(["the value of the expression"]), tok.encode(["the value of the expression"], False)
    assert with_eos[0][-1] == tok.eos_id
    assert with_eos[0][:-1] == without[0]
    assert tok.eos_id not in without[0]
    assert all(3 <= i < tok.num_pieces for i in without[0])


def test_round_trip(tok):
    texts = ["The value of the expression is returned.", "A list of the names in the current scope, sorted."]
    for text, ids in zip(texts, tok.encode(texts), strict=True):
        assert tok.decode(ids) == text


def test_literal_sentinels_map_to_sentinel_ids(tok):
    (ids,) = tok.encode(["The <extra_id_0> of the <extra_id_1> is returned."])
    assert ids.count(tok.sentinel_id(0)) == 1 and ids.count(tok.sentinel_id(1)) == 1
    assert ids.index(tok.sentinel_id(0)) < ids.index(tok.sentinel_id(1))
    # the text between sentinels is encoded as it would be on its own
    (of_the,) = tok.encode([" of the "], add_eos=False)
    start = ids.index(tok.sentinel_id(0)) + 1
    assert ids[start : ids.index(tok.sentinel_id(1))] == of_the
    assert tok.decode(ids) == "The of the is returned."  # skip_special drops sentinels
    rendered = tok.decode(ids, skip_special=False)
    assert "<extra_id_0>" in rendered and rendered.endswith("</s>")
    assert tok.encode([rendered.removesuffix("</s>")]) == [ids]


def test_sentinel_beyond_num_sentinels_is_plain_text(tok):
    (ids,) = tok.encode([f"a <extra_id_{NUM_SENTINELS}> b"], add_eos=False)
    assert not any(tok.is_sentinel(i) for i in ids)


def test_decode_drops_ids_outside_the_vocabulary(tok):
    (ids,) = tok.encode(["the value"], add_eos=False)
    padded = [-100, *ids, tok.vocab_size, tok.vocab_size + 27, tok.pad_id]
    assert tok.decode(padded) == "the value"
    assert tok.decode(padded, skip_special=False) == "the value<pad>"
    assert tok.batch_decode([padded, ids]) == ["the value", "the value"]


def test_encode_rejects_a_bare_string(tok):
    with pytest.raises(TypeError):
        tok.encode("not a list")


def test_matches_transformers_t5_tokenizer(tok, model_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "spiece.model").write_bytes(model_path.read_bytes())
    ref = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=NUM_SENTINELS)
    assert len(ref) == tok.vocab_size
    for i in (0, 1, NUM_SENTINELS - 1):
        assert ref.convert_tokens_to_ids(f"<extra_id_{i}>") == tok.sentinel_id(i)
    texts = [
        "The value of the expression is returned.",
        "Call <extra_id_0> with the <extra_id_1> argument.",
        "x = [i ** 2 for i in range(10)]  # squares",
    ]
    for text, ids in zip(texts, tok.encode(texts), strict=True):
        assert ref(text)["input_ids"] == ids
        assert ref.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special=False)
        assert ref.decode(ids, skip_special_tokens=True) == tok.decode(ids)


# ---------------------------------------------------------------------------------------- files


def test_save_load_and_pickle(tok, tmp_path):
    tok.save(tmp_path, source="test")
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["num_sentinels"] == NUM_SENTINELS and meta["vocab_size"] == tok.vocab_size
    loaded = Tokenizer.load(tmp_path)
    texts = ["The <extra_id_2> value of the expression."]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.vocab_size == tok.vocab_size
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode(texts) == tok.encode(texts)


def test_training_is_deterministic(corpus, model_path, tmp_path):
    again = tmp_path / "again.model"
    train_sentencepiece(corpus, again, num_pieces=NUM_PIECES, seed=7)
    assert again.read_bytes() == model_path.read_bytes()


def test_sentence_sample_follows_the_seed(corpus, tmp_path):
    def train(seed: int, name: str) -> bytes:
        train_sentencepiece(corpus, tmp_path / name, num_pieces=300, input_sentence_size=200, seed=seed)
        return (tmp_path / name).read_bytes()

    assert train(1, "a.model") == train(1, "b.model")
    assert train(1, "a.model") != train(2, "c.model")


def test_user_defined_symbols_stay_one_token_each(corpus, tmp_path):
    """A small vocabulary splits rare letters (`▁q` is two tokens), which made each symbol of a generated task two
    tokens; `user_defined_symbols` keeps them whole, and what is not one of them is tokenized as before."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    text = " ".join(letters)
    tokens = {}
    for name, symbols in (("plain", ()), ("symbols", ["\u2581" + c for c in letters])):
        train_sentencepiece(corpus, tmp_path / f"{name}.model", num_pieces=150, seed=7, user_defined_symbols=symbols)
        tokens[name] = Tokenizer(tmp_path / f"{name}.model", 0).encode([text], add_eos=False)[0]
    assert len(tokens["plain"]) > len(letters)
    assert len(tokens["symbols"]) == len(letters)


@pytest.mark.parametrize(
    "symbols, more, problem",
    [
        (["\u2581a", "\u2581a"], {}, "must be distinct"),
        ([f"s{i}" for i in range(90)], {}, "leave 10 of the 100"),
        (["\u2581a"], {"model_file": "spiece.model"}, "a model_file is loaded, not trained"),
    ],
)
def test_user_defined_symbols_checked_with_the_params(symbols, more, problem):
    from pipeline.config.sections import TokenizerConfig

    with pytest.raises(ValueError, match=problem):
        TokenizerConfig(vocab_size=200, num_sentinels=100, user_defined_symbols=symbols, **more)


def test_vocab_too_large_for_the_corpus(tmp_path):
    with pytest.raises(StageError, match="tokenizer.vocab_size"):
        train_sentencepiece(["a tiny corpus of few words", "and even fewer pieces"], tmp_path / "m.model", 5000)


def test_broken_and_missing_model_files(tmp_path):
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(StageError, match="not a readable SentencePiece model"):
        Tokenizer(broken, 10)
    with pytest.raises(StageError, match="not found"):
        Tokenizer(tmp_path / "missing.model", 10)
    with pytest.raises(StageError, match="tokenize stage"):
        Tokenizer.load(tmp_path)


def test_model_with_other_special_ids_is_refused(corpus, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(  # SentencePiece's own defaults: unk=0, bos=1, eos=2
        input=str(text), model_prefix=str(tmp_path / "default"), vocab_size=300, num_threads=1, minloglevel=2
    )
    with pytest.raises(StageError, match="pad=0, eos=1, unk=2"):
        Tokenizer(tmp_path / "default.model", 10)


# ------------------------------------------------------------------------------------------ stage


def _project(tmp_path: Path, corpus: list[str], **tokenizer) -> Path:
    """A project directory with a prepared dataset (written directly) and a params file."""
    splits = {"train": corpus[:24], "validation": corpus[24:27], "test": corpus[27:30]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "data" / "prepared")
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenizer"].update(vocab_size=600, num_sentinels=NUM_SENTINELS, num_proc=2, batch_size=8, **tokenizer)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in ("data/tokenizer", "data/tokenized", "metrics")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def _set_tokenizer_params(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tokenizer"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_shards_cover_each_split_in_order_with_about_the_requested_text():
    sizes = np.full(100, 10)
    shards = plan_shards("train", sizes, shard_bytes=250)
    assert [(s.start, s.stop) for s in shards] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert sum(s.nbytes for s in shards) == 1000 and [s.index for s in shards] == [0, 1, 2, 3]
    assert [(s.start, s.stop) for s in plan_shards("test", np.array([5, 1000, 5]), 100)] == [(0, 2), (2, 3)]
    assert [(s.start, s.stop) for s in plan_shards("test", np.zeros(0, np.int64), 100)] == [(0, 0)]


def test_tokenizer_sample_is_seeded_bounded_and_whole_when_it_fits():
    sizes = np.full(1000, 100)
    assert sample_documents(sizes, 10**6, seed=0) is None
    keep = sample_documents(sizes, 5_000, seed=0)
    assert len(keep) == 50 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, sample_documents(sizes, 5_000, seed=0))
    assert not np.array_equal(keep, sample_documents(sizes, 5_000, seed=1))
    assert len(sample_documents(np.array([10**9]), 10, seed=0)) == 1  # at least one document


def test_tokenize_stage_outputs_and_failures_keep_them(tmp_path, monkeypatch, corpus):
    root = _project(tmp_path, corpus)
    monkeypatch.chdir(root)
    assert tokenize_main([]) == 0

    tok = Tokenizer.load(root / "data" / "tokenizer")
    assert tok.vocab_size == 600 and tok.sentinel_id(0) == 599 and tok.num_pieces == 600 - NUM_SENTINELS
    store = TokenStore(root / "data" / "tokenized")
    prepared = datasets.load_from_disk(str(root / "data" / "prepared"))
    metrics = json.loads((root / "metrics" / "tokenize.json").read_text())
    assert set(store) == {"train", "validation", "test"}
    for name, split in store.items():
        assert split.tokens.dtype == np.uint16
        assert (split.path / "tokens.bin").stat().st_size == 2 * split.num_tokens
        assert [d.tolist() for d in split] == tok.encode(list(prepared[name]["text"]))
        assert metrics[name] == {"documents": len(split), "tokens": split.num_tokens}
    assert metrics["bytes_per_token"] > 2 and not (root / "data" / "tokenized.partial").exists()
    assert metrics["vocab_size"] == 600 and "tokens_per_second" not in metrics  # timings live apart
    assert json.loads((root / "artifacts" / "timing" / "tokenize.json").read_text())["tokens_per_second"] > 0

    before = _snapshot(root)
    _set_tokenizer_params(root, vocab_size=50_000)  # too large for 24 documents
    assert tokenize_main([]) == 1
    assert _snapshot(root) == before

    broken = root / "broken.model"
    broken.write_bytes(b"\x00garbage")
    _set_tokenizer_params(root, vocab_size=600, model_file="broken.model")
    assert tokenize_main([]) == 1
    assert _snapshot(root) == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_tokenize_stage_loads_an_existing_model(tmp_path, monkeypatch, corpus, model_path):
    root = _project(tmp_path, corpus)
    (root / "spiece.model").write_bytes(model_path.read_bytes())
    _set_tokenizer_params(root, model_file="spiece.model", num_sentinels=100)
    monkeypatch.chdir(root)
    assert tokenize_main([]) == 0
    assert (root / "data" / "tokenizer" / "spm.model").read_bytes() == model_path.read_bytes()
    tok = Tokenizer.load(root / "data" / "tokenizer")
    assert tok.vocab_size == NUM_PIECES + 100 and tok.sentinel_id(99) == NUM_PIECES
    metrics = json.loads((root / "metrics" / "tokenize.json").read_text())
    assert metrics["vocab_size"] == NUM_PIECES + 100


def test_tokenize_without_prepared_data_is_one_clear_error(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.tokenize"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "prepare" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "tokenizer").exists()
