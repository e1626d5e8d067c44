"""Pretraining objectives: span corruption properties, causal/prefix LM labels, packing, seeding."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.data.objectives import (
    IGNORE_INDEX,
    SpanCorruption,
    causal_lm,
    example_rng,
    lm_raw_length,
    pack_documents,
    prefix_lm,
    random_spans_noise_mask,
    span_corruption_lengths,
)

VOCAB_SIZE = 1000
EOS = 1
NUM_SENTINELS = 100


def sentinel_id(i: int) -> int:
    """Like `Tokenizer.sentinel_id`: `<extra_id_0>` is the highest id."""
    return VOCAB_SIZE - 1 - i


SENTINELS = [sentinel_id(i) for i in range(NUM_SENTINELS)]


def make_corruption(input_length: int = 128, density: float = 0.15, mean_span: float = 3.0) -> SpanCorruption:
    return SpanCorruption(input_length, density, mean_span, eos_id=EOS, sentinel_ids=SENTINELS)


def raw_tokens(n: int, seed: int = 0) -> np.ndarray:
    # ordinary ids only: never pad/eos/unk or a sentinel, so they can be told apart in the outputs
    return np.random.default_rng(seed).integers(3, VOCAB_SIZE - NUM_SENTINELS, size=n).astype(np.int32)


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Undo span corruption: replace each sentinel in the inputs by the tokens following it in the targets."""
    spans: dict[int, list[int]] = {}
    current = None
    for tok in targets[:-1].tolist():
        if tok in SENTINELS:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out: list[int] = []
    for tok in inputs[:-1].tolist():
        out.extend(spans[tok] if tok in SENTINELS else [tok])
    return np.array(out)


# ------------------------------------------------------------------------------------- lengths


def t5_reference_lengths(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """The T5 codebase's search, restated by hand from the paper's accounting (no clipping needed here)."""

    def corrupted(n: int) -> tuple[int, int]:
        noise = int(round(n * density))
        spans = int(round(noise / mean_span))
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length
    while corrupted(n + 1)[0] <= inputs_length:
        n += 1
    return n, corrupted(n)[1]


@pytest.mark.parametrize("input_length", [64, 128, 177, 512, 1024])
@pytest.mark.parametrize(("density", "mean_span"), [(0.15, 3.0), (0.3, 2.0), (0.15, 8.0)])
def test_lengths_match_t5_search(input_length, density, mean_span):
    assert span_corruption_lengths(input_length, density, mean_span) == t5_reference_lengths(
        input_length, density, mean_span
    )


def test_lengths_of_t5_default_setting():
    # T5 pretraining: 512 input tokens, density 0.15, mean span 3 -> 568 raw tokens: 85 noise in 28 spans,
    # so inputs 483 + 28 + 1 = 512 and targets 85 + 28 + 1 = 114
    raw, target = span_corruption_lengths(512, 0.15, 3.0)
    noise = round(raw * 0.15)
    spans = round(noise / 3.0)
    assert raw - noise + spans + 1 == 512
    assert target == noise + spans + 1


@pytest.mark.parametrize("bad", [dict(noise_density=0.0), dict(noise_density=1.0), dict(mean_noise_span_length=0.5)])
def test_lengths_reject_impossible_settings(bad):
    kwargs = dict(input_length=128, noise_density=0.15, mean_noise_span_length=3.0) | bad
    with pytest.raises(ValueError):
        span_corruption_lengths(**kwargs)


# ------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("input_length", [16, 128, 512])
def test_inputs_and_targets_have_exact_lengths_and_end_with_eos(input_length):
    sc = make_corruption(input_length)
    for index in range(20):
        inputs, targets = sc(raw_tokens(sc.raw_length, index), example_rng(0, 0, index))
        assert inputs.shape == (input_length,)
        assert targets.shape == (sc.target_length,)
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert EOS not in inputs[:-1] and EOS not in targets[:-1]


def test_reconstruction_recovers_the_raw_tokens():
    sc = make_corruption(128)
    for index in range(50):
        raw = raw_tokens(sc.raw_length, index)
        inputs, targets = sc(raw, example_rng(7, 0, index))
        np.testing.assert_array_equal(reconstruct(inputs, targets), raw)


def test_sentinels_count_down_from_extra_id_0():
    sc = make_corruption(256)
    inputs, targets = sc(raw_tokens(sc.raw_length), example_rng(0, 0, 0))
    in_sentinels = [t for t in inputs.tolist() if t in SENTINELS]
    out_sentinels = [t for t in targets.tolist() if t in SENTINELS]
    expected = [sentinel_id(i) for i in range(sc.num_spans)]
    assert in_sentinels == expected
    assert out_sentinels == expected
    assert targets[0] == sentinel_id(0)  # targets open with <extra_id_0>


def test_noise_fraction_is_close_to_density():
    for density, mean_span in [(0.15, 3.0), (0.3, 5.0)]:
        sc = make_corruption(512, density, mean_span)
        rng = np.random.default_rng(0)
        mask = random_spans_noise_mask(sc.raw_length, density, mean_span, rng)
        assert abs(mask.mean() - density) < 1.0 / sc.raw_length + 1e-9
        # spans alternate non-noise/noise, start with non-noise, and there are num_spans noise runs
        runs = np.flatnonzero(np.diff(mask.astype(int)) == 1)
        assert not mask[0] and len(runs) == sc.num_spans
        span_lengths = []
        for _ in range(200):
            m = random_spans_noise_mask(sc.raw_length, density, mean_span, rng)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(int), [0]])))
            span_lengths.extend((edges[1::2] - edges[::2]).tolist())
        assert abs(np.mean(span_lengths) - mean_span) < 0.25 * mean_span


def test_same_rng_seed_same_corruption_other_seed_differs():
    sc = make_corruption(128)
    raw = raw_tokens(sc.raw_length)
    a = sc(raw, example_rng(1, 2, 3))
    b = sc(raw, example_rng(1, 2, 3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    others = [sc(raw, example_rng(*key)) for key in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]]
    for inputs, _ in others:
        assert not np.array_equal(inputs, a[0])


def test_example_rng_is_a_pure_function():
    assert example_rng(5, 1, 9).integers(1 << 30) == example_rng(5, 1, 9).integers(1 << 30)
    draws = {int(example_rng(5, e, i).integers(1 << 30)) for e in range(3) for i in range(50)}
    assert len(draws) == 150


def test_wrong_raw_length_and_too_few_sentinels_are_rejected():
    sc = make_corruption(64)
    with pytest.raises(ValueError, match="raw tokens"):
        sc(raw_tokens(sc.raw_length + 1), example_rng(0, 0, 0))
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruption(512, 0.15, 3.0, eos_id=EOS, sentinel_ids=SENTINELS[:5])


# ------------------------------------------------------------------------------------- decoder-only


def test_causal_lm_labels_are_next_tokens():
    tokens = raw_tokens(lm_raw_length(32))
    inputs, labels = causal_lm(tokens)
    assert inputs.shape == labels.shape == (32,)
    np.testing.assert_array_equal(inputs, tokens[:-1])
    np.testing.assert_array_equal(labels, tokens[1:])


def test_prefix_lm_masks_the_prefix():
    tokens = raw_tokens(lm_raw_length(32))
    prefixes = set()
    for index in range(200):
        inputs, labels, p = prefix_lm(tokens, example_rng(0, 0, index))
        assert inputs.shape == labels.shape == (32,)
        assert 1 <= p <= 31
        np.testing.assert_array_equal(inputs, tokens[:-1])
        assert (labels[: p - 1] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(labels[p - 1 :], tokens[p:])  # loss on every token after the prefix
        prefixes.add(p)
    assert len(prefixes) > 20  # the split point varies
    a = prefix_lm(tokens, example_rng(0, 0, 1))
    assert a[2] == prefix_lm(tokens, example_rng(0, 0, 1))[2]


# ------------------------------------------------------------------------------------- packing


def test_pack_documents_concatenates_and_drops_the_remainder():
    docs = [np.array([5, 6, EOS]), np.array([7, EOS]), np.array([8, 9, 10, 11, EOS])]
    chunks = pack_documents(docs, 4)
    assert chunks.shape == (2, 4)
    np.testing.assert_array_equal(chunks.reshape(-1), np.concatenate(docs)[:8])
    assert pack_documents(docs, 11).shape == (0, 11)
    assert pack_documents([], 4).shape == (0, 4)


def test_packed_chunks_feed_span_corruption():
    sc = make_corruption(64)
    rng = np.random.default_rng(0)
    docs = [np.append(raw_tokens(int(n), seed=i), EOS) for i, n in enumerate(rng.integers(5, 60, size=40))]
    chunks = pack_documents(docs, sc.raw_length)
    assert len(chunks) == sum(len(d) for d in docs) // sc.raw_length
    for index, chunk in enumerate(chunks):
        inputs, targets = sc(chunk, example_rng(0, 0, index))
        assert inputs.shape == (64,) and targets.shape == (sc.target_length,)


# ------------------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import pydoc_data.topics

    from pipeline.data.tokenizer import Tokenizer, train_sentencepiece

    texts = list(pydoc_data.topics.topics.values())[:20]
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    train_sentencepiece(texts, path, num_pieces=300)
    return Tokenizer(path, num_sentinels=40), texts


def test_span_corruption_with_the_real_tokenizer(tokenizer):
    tok, texts = tokenizer
    sc = SpanCorruption(64, 0.15, 3.0, eos_id=tok.eos_id, sentinel_ids=[tok.sentinel_id(i) for i in range(40)])
    docs = [np.array(ids, dtype=np.int32) for ids in tok.encode(texts[:5])]
    chunks = pack_documents(docs, sc.raw_length)
    assert len(chunks) > 3
    for index, chunk in enumerate(chunks[:4]):
        inputs, targets = sc(chunk, example_rng(0, 0, index))
        assert inputs.shape == (64,) and targets.shape == (sc.target_length,)
        assert tok.decode(targets.tolist(), skip_special=False).startswith("<extra_id_0>")
        shown = tok.decode(inputs.tolist(), skip_special=False)
        assert [int(n) for n in re.findall(r"<extra_id_(\d+)>", shown)] == list(range(sc.num_spans))
        # put each target span back in place of its sentinel: the original ids come back
        spans, current = {}, None
        for t in targets[:-1].tolist():
            if tok.is_sentinel(t):
                current = spans.setdefault(t, [])
            else:
                current.append(t)
        restored = [x for t in inputs[:-1].tolist() for x in (spans[t] if tok.is_sentinel(t) else [t])]
        assert restored == chunk.tolist()
