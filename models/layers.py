"""Pieces both model families use, in plain PyTorch: attention masks, the one dropout, the linear layer, and
decoding's key/value cache.

Dimension legend: B batch, N rows being decoded (batch * beams), H heads, Lq / Lk query / key length, S key length,
t new positions, Dk per-head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fast import products
from models.settings import fast_paths


def neg_inf(dtype: torch.dtype) -> float:
    """The most negative finite value of `dtype`: a key with this logit gets probability 0 (but no NaN when every key of
    a row has it)."""
    return torch.finfo(dtype).min


def all_true(mask: torch.Tensor) -> bool:
    """Whether a padding mask masks nothing (skips the mask); under torch.compile always False (no graph break)."""
    return not torch.compiler.is_compiling() and bool(mask.all())


def padded_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S), 1 or True = real token -> the padded keys (B, 1, 1, S) bool, or None when nothing is padded."""
    if attention_mask is None or all_true(attention_mask):
        return None
    return ~attention_mask.bool()[:, None, None, :]


def additive_mask(bias: torch.Tensor | None, hidden: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """One additive attention mask: `bias` (1, H, Lq, Lk) with the keys `hidden` (B or 1, 1, Lq or 1, Lk, bool) set to
    the dtype's minimum (probability 0); None when there is neither."""
    if hidden is None:
        return bias
    if bias is None:
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, neg_inf(dtype))
    return bias.masked_fill(hidden, neg_inf(dtype)).contiguous()


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


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout` above (same module interface, cheaper masks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; under the fast paths, the process's matmul kernel and decoding forms (`models.fast.products`)."""
    return products.linear(x, weight, bias) if fast_paths() else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose product is `linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
