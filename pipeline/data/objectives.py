"""Pretraining objectives on token ids: T5 span corruption, causal LM and prefix LM.

Every objective is a pure function of a token array and a `numpy.random.Generator`. The datamodule draws that
generator from `example_rng(seed, epoch, index)`, so example `index` of epoch `epoch` is corrupted the same way
every time it is built, including after a resume from a checkpoint.

Shapes: `L` is the raw token count cut from the packed stream, `T_in`/`T_out` the model's input/target lengths.

Span corruption (T5 paper, section 3.1.4 and 3.3): a fraction `noise_density` of the raw tokens is masked in
spans of mean length `mean_noise_span_length`; each masked span becomes one sentinel in the inputs, and the
targets list every sentinel followed by the tokens it replaced:

    raw:     a b c d e f g h          (noise: c d, g)
    inputs:  a b <X0> e f <X1> h <eos>
    targets: <X0> c d <X1> g <eos>

`<X_i>` is `<extra_id_i>`, the i-th id counted down from the top of the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label of positions without loss (the default `ignore_index` of `torch.nn.functional.cross_entropy`)."""


# ---------------------------------------------------------------------------------------------- seeding


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for example `index` of `epoch`: a pure function of its arguments, so resumes repeat it."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


# -------------------------------------------------------------------------------------------- packing


def pack_documents(docs: Sequence[np.ndarray], chunk_length: int) -> np.ndarray:
    """Concatenate token arrays (each already ending with eos) and cut them into full chunks.

    Returns `(n_chunks, chunk_length)` with the dtype of the documents; the incomplete tail is dropped.
    Documents already stored back to back (a `TokenSplit`, whose `tokens` is the flat stream) are packed as a
    reshaped view of that stream: nothing is copied or read.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
    flat = getattr(docs, "tokens", None)
    if isinstance(flat, np.ndarray):  # (N,) documents back to back
        n_chunks = len(flat) // chunk_length
        return flat[: n_chunks * chunk_length].reshape(n_chunks, chunk_length)
    if len(docs) == 0:
        return np.zeros((0, chunk_length), dtype=np.int64)
    stream = np.concatenate([np.asarray(d) for d in docs])  # (sum of lengths,)
    n_chunks = len(stream) // chunk_length
    return stream[: n_chunks * chunk_length].reshape(n_chunks, chunk_length)


# ------------------------------------------------------------------------------------- span corruption


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for `length` raw tokens, as T5 rounds them (at least one of each)."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)  # keep at least one noise and one non-noise token
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def _corrupted_lengths(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(inputs length, targets length) after corrupting `length` raw tokens, eos included in both."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    inputs_length = (length - num_noise) + num_spans + 1  # non-noise tokens, one sentinel per span, eos
    targets_length = num_noise + num_spans + 1  # noise tokens, one sentinel per span, eos
    return inputs_length, targets_length


def span_corruption_lengths(
    input_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw_tokens_length, target_length): raw tokens to cut so the corrupted inputs are exactly `input_length`.

    The same search as T5's `random_spans_helper`: the longest raw length whose inputs (non-noise tokens +
    one sentinel per span + eos) still fit. Adding one raw token grows the inputs by 0 or 1 token (it is
    either non-noise, or noise that may open a new span), so the fit is exact. T5's special case for
    `noise_density == 0.5` (shortening targets to the input length) is left out: inputs stay exact.
    For input_length 512, density 0.15, mean span 3: 568 raw tokens, 114 target tokens (as in T5).
    """
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    if input_length < 3:
        raise ValueError(f"input_length must be >= 3 for span corruption, got {input_length}")

    def inputs_of(n: int) -> int:
        return _corrupted_lengths(n, noise_density, mean_noise_span_length)[0]

    raw = input_length
    while raw > 2 and inputs_of(raw) > input_length:
        raw -= 1
    while inputs_of(raw + 1) <= input_length:
        raw += 1
    inputs, targets = _corrupted_lengths(raw, noise_density, mean_noise_span_length)
    if inputs != input_length:
        raise ValueError(
            f"no raw length corrupts into exactly {input_length} input tokens "
            f"(noise_density={noise_density}, mean_noise_span_length={mean_noise_span_length})"
        )
    return raw, targets


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments partitioning `num_items`, uniformly among such partitions."""
    # choose num_segments - 1 distinct cut points among the num_items - 1 gaps between items
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))  # (num_segments,)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask `(length,)`, True on noise: alternating non-noise/noise spans, starting with non-noise.

    Noise and non-noise token counts are split into the same number of random non-empty spans, as in T5.
    """
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    noise_spans = _random_segmentation(num_noise, num_spans, rng)  # (S,)
    nonnoise_spans = _random_segmentation(length - num_noise, num_spans, rng)  # (S,)
    interleaved = np.stack([nonnoise_spans, noise_spans], axis=1).reshape(-1)  # (2S,) non-noise, noise, ...
    is_noise = np.tile(np.array([False, True]), num_spans)  # (2S,)
    return np.repeat(is_noise, interleaved)  # (L,)


@dataclass
class SpanCorruption:
    """T5 span corruption producing fixed-length inputs (`input_length`) and targets (`target_length`).

    Feed it chunks of exactly `raw_length` tokens (see `pack_documents`); `sentinel_ids[i]` is the id of
    `<extra_id_i>` (`Tokenizer.sentinel_id(i)`), so sentinels appear in descending id order.
    """

    input_length: int
    noise_density: float
    mean_noise_span_length: float
    eos_id: int
    sentinel_ids: Sequence[int]

    def __post_init__(self) -> None:
        self.raw_length, self.target_length = span_corruption_lengths(
            self.input_length, self.noise_density, self.mean_noise_span_length
        )
        self.num_spans = _noise_counts(self.raw_length, self.noise_density, self.mean_noise_span_length)[1]
        if len(self.sentinel_ids) < self.num_spans:
            raise ValueError(
                f"span corruption of {self.raw_length} raw tokens needs {self.num_spans} sentinels, "
                f"the tokenizer has {len(self.sentinel_ids)}"
            )

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Corrupt `(raw_length,)` tokens into inputs `(input_length,)` and targets `(target_length,)`."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.raw_length,):
            raise ValueError(f"expected {self.raw_length} raw tokens, got shape {tokens.shape}")
        noise = random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_noise_span_length, rng)
        sentinels = np.asarray(self.sentinel_ids[: self.num_spans], dtype=tokens.dtype)  # (S,)
        eos = np.array([self.eos_id], dtype=tokens.dtype)
        inputs = np.concatenate([_replace_spans(tokens, noise, sentinels), eos])  # (T_in,)
        targets = np.concatenate([_replace_spans(tokens, ~noise, sentinels), eos])  # (T_out,)
        return inputs, targets


def _replace_spans(tokens: np.ndarray, drop: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Replace each run of `drop` positions with the next sentinel (the i-th run gets `sentinels[i]`)."""
    starts = drop & ~np.concatenate([[False], drop[:-1]])  # first position of each dropped run
    out = tokens.copy()
    out[starts] = sentinels[: int(starts.sum())]
    return out[~drop | starts]


# ---------------------------------------------------------------------------------- decoder-only LMs


def causal_lm(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token prediction on a chunk of `T + 1` tokens: inputs `(T,)` and aligned labels `(T,)`.

    `labels[t]` is the token that follows `inputs[t]` (already shifted: the loss needs no further shift),
    so pack chunks of `input_length + 1` tokens (`lm_raw_length`).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise ValueError(f"expected a 1-d chunk of at least 2 tokens, got shape {tokens.shape}")
    return tokens[:-1].copy(), tokens[1:].astype(np.int64)


def prefix_lm(tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Prefix LM on a chunk of `T + 1` tokens: inputs `(T,)`, labels `(T,)`, prefix length `P`.

    `P` is drawn uniformly from [1, T - 1]: the model attends bidirectionally over `inputs[:P]` and is trained
    to predict only the tokens after the prefix, so `labels[:P - 1]` are `IGNORE_INDEX` (position `P - 1`, the
    last prefix token, predicts the first token after the prefix). Labels are aligned like `causal_lm`'s.
    """
    inputs, labels = causal_lm(tokens)
    if len(inputs) < 2:
        raise ValueError("prefix LM needs chunks of at least 3 tokens")
    prefix_length = int(rng.integers(1, len(inputs)))  # in [1, T - 1]
    labels[: prefix_length - 1] = IGNORE_INDEX
    return inputs, labels, prefix_length


def lm_raw_length(input_length: int) -> int:
    """Raw tokens per chunk for `causal_lm`/`prefix_lm` inputs of `input_length` tokens (one extra label)."""
    return input_length + 1
