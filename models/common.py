"""Mechanisms shared by our model families, in plain PyTorch: cheap dropout (the one implementation of both),
attention with an additive bias differentiated by hand, matmuls for decoding, and a growing key/value cache.

Dimension legend: B batch, H heads, Lq / Lk query / key length, Dk per-head size, N rows being decoded.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def drop_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Dropout: a bool mask of the elements of `x` to zero (each with probability p) and the rescale 1 / (1 - p).

    The one dropout of both families. On CPU the decisions are the four signed 16-bit lanes of uniform 64-bit
    random words, one compare each: torch's CPU `bernoulli_` draws one Mersenne Twister number per element through
    a generic sampler, which made dropout the largest non-matmul cost of a training step (this is ~4.5x cheaper).
    p is rounded to a multiple of 2**-16 and the rescale uses the rounded value, so the expected output still
    equals the input. Draws come from the global generator, so the Reformer's reversible backward replays them.
    A bool mask (1 byte per element) rather than F.dropout's float noise (4 bytes) also shrinks what backward keeps.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # GPU / compiled: the device's own generator
        return torch.rand_like(x, dtype=torch.float32) < p, 1.0 / (1.0 - p)
    cut, n = round(p * 2**16), x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
    return words.view(torch.int16)[:n].view(x.shape) < cut - 2**15, 2**16 / (2**16 - cut)  # lanes in [-2**15, 2**15)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with `drop_mask`; autograd keeps only the bool mask."""
    if not training or p == 0.0:
        return x
    drop, scale = drop_mask(x, p)
    return torch.where(drop, 0.0, x).mul_(scale)  # `where` rather than `x * keep`: a bool x float product casts first


class Dropout(torch.nn.Dropout):
    """`nn.Dropout` through `dropout` above (same module interface, cheaper masks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class BiasedAttention(torch.autograd.Function):
    """softmax(q k^T + bias, keys `hidden` excluded) with dropout p, times v, differentiated by hand.

    q (B, H, Lq, Dk), k/v (B, H, Lk, Dk), bias (1 or B, H, Lq, Lk), hidden bool (B or 1, 1, Lq or 1, Lk) or None
    -> (B, H, Lq, Dk). What autograd would do with more memory: the (B, H, Lq, Lk) scores are kept once (the
    probabilities, 4 bytes each) plus the bool dropout mask, and each step reuses the score-sized buffer it frees
    (fresh allocations of this size cost page faults on CPU). Masked keys get probability 0, hence gradient 0.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, hidden, p: float):
        scores = q @ k.transpose(-1, -2)  # (B, H, Lq, Lk); no 1/sqrt(Dk) (folded into the init of q)
        if bias is not None:
            scores += bias
        if hidden is not None:
            scores.masked_fill_(hidden, neg_inf(scores.dtype))
        probs = scores.softmax(-1)
        drop, scale = drop_mask(probs, p) if p > 0.0 else (None, 1.0)
        dropped = probs if drop is None else torch.where(drop, probs.new_zeros(()), probs, out=scores)
        out = dropped @ v
        ctx.save_for_backward(q, k, v, probs, drop, hidden)
        ctx.scale, ctx.bias_shape = scale, None if bias is None else bias.shape
        return out.mul_(scale) if drop is not None else out  # rescale the (B, H, Lq, Dk) output, not the scores

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs, drop, hidden = ctx.saved_tensors
        if drop is None:
            d_v, d_probs = probs.transpose(-1, -2) @ d_out, d_out @ v.transpose(-1, -2)
        else:
            d_out = d_out * ctx.scale
            buffer = torch.where(drop, 0.0, probs)  # the dropped probabilities again
            d_v = buffer.transpose(-1, -2) @ d_out
            d_probs = torch.matmul(d_out, v.transpose(-1, -2), out=buffer).masked_fill_(drop, 0.0)
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)  # probs * (d_probs - <d_probs, probs>)
        if hidden is not None:  # only matters for rows with every key hidden (then softmax is uniform)
            d_scores.masked_fill_(hidden, 0.0)
        d_q, d_k = d_scores @ k, d_scores.transpose(-1, -2) @ q
        d_bias = d_scores.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None  # summed over B
        return d_q, d_k, d_v, d_bias, None, None


# (rows, Out, In, dtype, threads) -> whether `weight @ x^T` beat `F.linear` when measured in this process
_WEIGHT_LEFT: dict[tuple, bool] = {}


def _weight_left_is_faster(x: torch.Tensor, weight: torch.Tensor, repeats: int = 3) -> bool:
    """Time both forms of a small product on this processor, alternated (median of `repeats` after one warm-up);
    the weight-left form must win by 10% to be chosen, since F.linear is the default."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats + 1):
        for i, fn in enumerate((lambda: F.linear(x, weight), lambda: weight @ x.T)):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[1][1:]) < 0.9 * statistics.median(times[0][1:])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., In) @ weight (Out, In)^T for decoding, where a handful of rows (N <= 64) is bound by reading the
    weights. How the BLAS streams a weight depends on the processor: on some CPUs `weight @ x^T` (the weight as
    the left operand) is up to 2x faster for the LM head, on others up to 3x slower. So the first call of each
    shape measures both in this process and keeps the faster (`_weight_left_is_faster`); with autograd recording,
    off CPU, or under torch.compile it is plain F.linear. Both forms compute the same sums (rounding may differ)."""
    rows = x.numel() // x.shape[-1]
    if (
        rows > 64
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight)
    key = (rows, *weight.shape, weight.dtype, torch.get_num_threads())
    flat = x.reshape(rows, -1)
    left = _WEIGHT_LEFT.get(key)
    if left is None:
        left = _WEIGHT_LEFT[key] = _weight_left_is_faster(flat, weight)
    if not left:
        return F.linear(x, weight)
    return (weight @ flat.T).T.reshape(*x.shape[:-1], weight.shape[0])


class KVCache:
    """One layer's self-attention keys/values during decoding, in (N, H, capacity, Dk) buffers that double when full,
    so a step writes its keys in place instead of concatenating a new tensor. Beam search's reorder selects rows into
    a second pair of buffers of the same size and swaps the two (allocated on the first reorder), rather than
    selecting into a temporary and copying back."""

    def __init__(self):
        self.k = self.v = None
        self.spare = None  # (k, v) buffers shaped like (self.k, self.v), for `reorder`
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (N, H, t, Dk) keys/values; returns views of all of them so far, (N, H, length, Dk)."""
        start, end = self.length, self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            capacity = max(64, 2 * end)
            old = (self.k, self.v)
            self.k, self.v = (k.new_empty(*k.shape[:2], capacity, k.shape[3]) for _ in range(2))
            self.spare = None
            if old[0] is not None:
                self.k[:, :, :start], self.v[:, :, :start] = old[0][:, :, :start], old[1][:, :, :start]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (N,) of the filled part only (the unfilled capacity is not copied): one pass that writes
        them into the spare buffers, which then become the cache."""
        n = self.length
        if self.spare is None or self.spare[0].shape != self.k.shape:
            self.spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        k, v = self.spare
        torch.index_select(self.k[:, :, :n], 0, index, out=k[:, :, :n])
        torch.index_select(self.v[:, :, :n], 0, index, out=v[:, :, :n])
        self.spare, self.k, self.v = (self.k, self.v), k, v
