"""Packing, collation and the resumable sampler of `pipeline/data/datamodule.py`."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.data.datamodule import Collator, PretrainDataset, ResumableSampler, unigram_entropy, val_items
from pipeline.data.objectives import IGNORE_INDEX
from pipeline.training.callbacks import TrainDataModule
from tests.train_project import markov_docs


def take(iterable, n):
    return list(itertools.islice(iterable, n))


# ---------------------------------------------------------------------------------------------- sampler


def test_sampler_resumes_exactly_where_it_stopped_across_epochs():
    full = take(iter(ResumableSampler(10, seed=3)), 35)
    for start in (0, 4, 10, 23):
        assert take(iter(ResumableSampler(10, seed=3, start=start)), 35 - start) == full[start:]


def test_sampler_epochs_are_permutations_that_differ():
    items = take(iter(ResumableSampler(10, seed=3)), 30)
    epochs = [[i for e, i in items if e == k] for k in range(3)]
    assert all(sorted(ep) == list(range(10)) for ep in epochs)
    assert epochs[0] != epochs[1]
    assert take(iter(ResumableSampler(10, seed=4)), 10) != items[:10]


def test_sampler_ranks_get_disjoint_equal_shares():
    a = take(iter(ResumableSampler(11, seed=0, rank=0, world_size=2)), 5)
    b = take(iter(ResumableSampler(11, seed=0, rank=1, world_size=2)), 5)
    assert not {i for _, i in a} & {i for _, i in b}
    assert {e for e, _ in a} == {e for e, _ in b} == {0}  # 5 per rank per epoch, the 11th item dropped


def test_datamodule_state_round_trip_restarts_the_stream():
    docs = [np.arange(3, 50) for _ in range(20)]
    ds = PretrainDataset(docs, "causal_lm", 16, seed=0)
    dm = TrainDataModule(ds, None, Collator("causal_lm"), batch_size=2, seed=5)
    batches = take(iter(dm.train_dataloader()), 6)
    dm.batches_consumed = 4
    resumed = TrainDataModule(ds, None, Collator("causal_lm"), batch_size=2, seed=5)
    resumed.load_state_dict(dm.state_dict())
    again = take(iter(resumed.train_dataloader()), 2)
    for x, y in zip(batches[4:], again, strict=True):
        torch.testing.assert_close(x["input_ids"], y["input_ids"])
    other = TrainDataModule(ds, None, Collator("causal_lm"), batch_size=3, seed=5)
    with pytest.raises(ValueError, match="batch size"):
        other.load_state_dict(dm.state_dict())


# ------------------------------------------------------------------------------------------- datasets


def test_span_corruption_examples_are_fixed_length_and_repeatable():
    docs = [np.asarray(d) for d in markov_docs(50, 0)]
    kw = dict(noise_density=0.15, mean_noise_span_length=3.0, eos_id=1, sentinel_ids=[249 - i for i in range(20)])
    ds = PretrainDataset(docs, "span_corruption", 32, seed=1, **kw)
    assert len(ds) == sum(len(d) for d in docs) // ds.corrupt.raw_length
    ex = ds[(0, 3)]
    assert ex["inputs"].shape == (32,) and ex["targets"].shape == (ds.corrupt.target_length,)
    np.testing.assert_array_equal(ds[(0, 3)]["targets"], ex["targets"])
    assert not np.array_equal(ds[(1, 3)]["inputs"], ex["inputs"])  # another epoch, another corruption


def test_unigram_entropy():
    assert unigram_entropy([np.arange(8), np.arange(8)]) == pytest.approx(math.log(8))
    assert unigram_entropy([np.array([5, 5, 5])]) == pytest.approx(0.0)


def test_validation_items_are_a_fixed_prefix_of_epoch_zero():
    ds = PretrainDataset([np.arange(3, 200)], "causal_lm", 8, seed=0)
    val = val_items(ds, batches=2, batch_size=3)
    assert len(val) == 6
    np.testing.assert_array_equal(val[5]["inputs"], ds[(0, 5)]["inputs"])


# ------------------------------------------------------------------------------------------ collation


def test_encoder_decoder_collation_shifts_targets_and_ignores_padding():
    examples = [
        {"inputs": np.array([5, 6, 7, 1]), "targets": np.array([8, 9, 1])},
        {"inputs": np.array([5, 1]), "targets": np.array([4, 1])},
    ]
    b = Collator("encoder_decoder", pad_id=0, decoder_start_id=0)(examples)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert b["decoder_input_ids"].tolist() == [[0, 8, 9], [0, 4, 1]]
    assert b["labels"].tolist() == [[8, 9, 1], [4, 1, IGNORE_INDEX]]
    assert b["decoder_attention_mask"].tolist() == [[True] * 3, [True, True, True]]


def test_collation_truncates_to_the_configured_lengths():
    examples = [{"inputs": np.arange(3, 20), "targets": np.arange(3, 13)}]
    b = Collator("encoder_decoder", input_length=8, target_length=4)(examples)
    assert b["input_ids"].shape == (1, 8) and b["labels"].shape == (1, 4)


def test_a_generated_task_cut_by_the_lengths_is_an_error_a_text_task_is_not():
    """The table2 presets' copies were cut to finetune.input_length/target_length for months (the default tokenizer
    splits `o` in two): a generated task that does not fit is a StageError naming it; text tasks are cut, as T5's."""
    from pipeline.common import StageError
    from pipeline.data.datamodule import check_lengths

    fits = {"duplication": [([1] * 10, [1] * 8)] * 3}
    check_lengths(fits, "train", 10, 8)
    cut = {"duplication": [([1] * 10, [1] * 8), ([1] * 10, [1] * 9), ([1] * 11, [1] * 8)]}
    with pytest.raises(StageError, match=r"finetune.tasks.duplication: 2 of 3 train examples .* 11 input, 9 target"):
        check_lengths(cut, "train", 10, 8)
    check_lengths({"summarize": cut["duplication"]}, "train", 10, 8)  # a text task: logged, not an error


def test_text_to_text_on_a_decoder_only_model_trains_on_targets_only():
    examples = [{"inputs": np.array([5, 6, 7]), "targets": np.array([8, 1])}]
    b = Collator("prefix_lm")(examples)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 1]]
    assert b["prefix_lengths"].tolist() == [3]


# ------------------------------------------------------------------------------------- the token store


def test_pretraining_on_the_token_store_is_a_view_and_matches_in_memory_packing(tmp_path):
    from pipeline.data.datamodule import document_arrays, load_tokenized
    from pipeline.data.tokenstore import write_store

    docs = markov_docs(60, 4)
    store = load_tokenized(write_store(tmp_path / "tok", {"train": docs}, vocab_size=250).path)
    split = document_arrays(store["train"])
    kw = dict(noise_density=0.15, mean_noise_span_length=3.0, eos_id=1, sentinel_ids=[249 - i for i in range(20)])
    mapped = PretrainDataset(split, "span_corruption", 32, seed=1, **kw)
    listed = PretrainDataset([np.asarray(d) for d in docs], "span_corruption", 32, seed=1, **kw)
    assert not mapped.chunks.flags.owndata and mapped.chunks.dtype == np.uint16  # a view, not a copy
    assert np.shares_memory(mapped.chunks, split.tokens)
    assert len(mapped) == len(listed) > 5
    for item in [(0, 0), (0, 5), (2, 3)]:
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(mapped[item][key], listed[item][key])
            assert mapped[item][key].dtype == np.int64
    assert unigram_entropy(split) == pytest.approx(unigram_entropy([np.asarray(d) for d in docs]))


def test_token_store_dataset_pickles_as_a_path_and_resumes_the_same_batches(tmp_path):
    import pickle

    from pipeline.data.datamodule import load_tokenized
    from pipeline.data.tokenstore import write_store

    store = load_tokenized(write_store(tmp_path / "tok", {"train": markov_docs(80, 5)}, vocab_size=250).path)
    ds = PretrainDataset(store["train"], "causal_lm", 16, seed=0)
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the file is re-mapped on the other side, not shipped
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[(1, 7)]["inputs"], ds[(1, 7)]["inputs"])

    dm = TrainDataModule(ds, None, Collator("causal_lm"), batch_size=2, seed=5)
    batches = take(iter(dm.train_dataloader()), 6)
    resumed = TrainDataModule(clone, None, Collator("causal_lm"), batch_size=2, seed=5)
    resumed.load_state_dict({"batches_consumed": 3, "batch_size": 2})
    for x, y in zip(batches[3:], take(iter(resumed.train_dataloader()), 3), strict=True):
        torch.testing.assert_close(x["input_ids"], y["input_ids"])
