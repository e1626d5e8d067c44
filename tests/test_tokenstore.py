"""The memory-mapped token store (`pipeline/data/tokenstore.py`)."""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest

from pipeline.data.tokenstore import SplitWriter, TokenSplit, TokenStore, store_signature, token_dtype, write_store


def test_dtype_is_the_smallest_that_holds_every_id():
    assert token_dtype(8000) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535
    assert token_dtype(65_537) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_round_trip_documents_offsets_counts_and_size(tmp_path):
    docs = [[5, 6, 1], [7, 1], [1], [9, 9, 9, 9, 1]]
    store = write_store(tmp_path, {"train": docs, "test": []}, vocab_size=12)
    train = store["train"]
    assert [d.tolist() for d in train] == docs and len(train) == 4 and train.num_tokens == 11
    assert train[-1].tolist() == docs[-1]
    with pytest.raises(IndexError):
        train[4]
    assert isinstance(train.tokens.base.obj, mmap.mmap) and train.tokens.dtype == np.uint16  # mapped, not read
    assert (tmp_path / "train" / "tokens.bin").stat().st_size == 2 * 11  # 2 bytes per token
    assert train.counts.tolist() == np.bincount(sum(docs, []), minlength=12).tolist()
    assert len(store["test"]) == 0 and store["test"].num_tokens == 0
    reopened = TokenStore(tmp_path)
    assert reopened.meta["dtype"] == "uint16" and set(reopened) == {"train", "test"}
    assert [s for s, _ in store_signature(tmp_path)] == ["test", "train"]


def test_large_vocabularies_use_uint32(tmp_path):
    store = write_store(tmp_path, {"train": [[70_000, 1]]}, vocab_size=70_001)
    assert store["train"].tokens.dtype == np.uint32 and store["train"][0].tolist() == [70_000, 1]


def test_flat_writes_and_shard_appends_give_the_same_split(tmp_path):
    a = SplitWriter(tmp_path / "a", 10)
    a.write_flat(np.array([3, 4, 1, 5, 1]), np.array([3, 2]))
    meta_a = a.close()
    shard = tmp_path / "shard.bin"
    shard.write_bytes(np.array([3, 4, 1, 5, 1], dtype=np.uint16).tobytes())
    b = SplitWriter(tmp_path / "b", 10)
    b.append_file(shard, np.array([3, 2]), np.bincount([3, 4, 1, 5, 1], minlength=10))
    meta_b = b.close()
    assert meta_a == meta_b
    assert [d.tolist() for d in TokenSplit(tmp_path / "b")] == [[3, 4, 1], [5, 1]]


def test_a_store_that_disagrees_with_its_offsets_is_refused(tmp_path):
    write_store(tmp_path, {"train": [[3, 1], [4, 1]]}, vocab_size=10)
    (tmp_path / "train" / "tokens.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="re-run the tokenize stage"):
        TokenStore(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(ValueError, match="token store"):
        TokenStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenize"):
        TokenStore(tmp_path / "missing")


def test_positional_reads_match_the_mapping(tmp_path):
    train = write_store(tmp_path, {"train": [[5, 6, 1], [7, 1], [9, 9, 1]]}, vocab_size=12)["train"]
    np.testing.assert_array_equal(train.read(2, 4), train.tokens[2:6])
    assert train.read(0, 0).shape == (0,)
    with pytest.raises(IndexError):
        train.read(5, 4)
