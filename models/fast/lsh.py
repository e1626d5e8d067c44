"""The Reformer's attention kernels: hand-written autograd functions that compute what the plain code of
`models/chunked_attention.py` computes, with fewer passes over memory and less kept for backward (tested against it and
against autograd in tests/test_fast_kernels.py).

- `LookAdjacent`: each chunk beside its neighbours, written once (no roll + cat copies);
- `PermuteRows`: the LSH sort and unsort as row gathers both ways (no scatter in backward);
- `SharedQKScores`: shared-QK attention probabilities and log-sum-exp with one exp pass (section 2.2);
- `NormaliseKeys`: the shared-QK key normalisation with a two-pass backward;
- `chunked_attention`: `models.chunked_attention.chunked_attention` on these kernels, and on SDPA's fused kernel
  where no key is padded and nothing is dropped.

Dimension legend: B batch, H heads, C chunks, S chunk length, W attended keys per chunk, K d_kv, M rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.chunked_attention import banned_keys, mask_values
from models.fast.private import softmax_backward
from models.layers import dropout


def _shift_chunks(dst: torch.Tensor, src: torch.Tensor, shift: int, add: bool) -> None:
    """dst[:, :, c] = (or +=) src[:, :, (c + shift) % C], in place, for chunks on dim 2."""
    C = src.shape[2]
    shift %= C
    for d, s in ((dst[:, :, : C - shift], src[:, :, shift:]), (dst[:, :, C - shift :], src[:, :, :shift])):
        if d.numel():
            d.add_(s) if add else d.copy_(s)


class LookAdjacent(torch.autograd.Function):
    """(B, H, C, S, ...) -> (B, H, C, (before + 1 + after) * S, ...): each chunk preceded by `before` and followed by
    `after` neighbouring chunks (wrapping around), written straight into one tensor (no roll + cat copies)."""

    @staticmethod
    def forward(ctx, x, before, after):
        ctx.shifts = range(-before, after + 1)
        out = x.new_empty(*x.shape[:3], len(ctx.shifts), *x.shape[3:])
        for j, shift in enumerate(ctx.shifts):
            _shift_chunks(out[:, :, :, j], x, shift, add=False)
        return out.flatten(3, 4)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.unflatten(3, (len(ctx.shifts), -1))
        grad_x = grad.new_empty(grad[:, :, :, 0].shape)
        for j, shift in enumerate(ctx.shifts):
            _shift_chunks(grad_x, grad[:, :, :, j], -shift, add=j > 0)
        return grad_x, None, None


def look_adjacent(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, H, C, S, ...) -> (B, H, C, (1 + before + after) * S, ...): each chunk sees its neighbours (wrapping)."""
    return x if before == 0 and after == 0 else LookAdjacent.apply(x, before, after)


class PermuteRows(torch.autograd.Function):
    """rows of x (M, F) -> y = x[index] (M * repeats, F), where every row of x appears `repeats` times in y, at the
    positions `inverse` (M * repeats, grouped by row of x). The backward gathers and sums (x's gradient =
    sum of grad[inverse] per row) instead of scattering into x: `index_add_` runs as a sort-based scatter on CPU."""

    @staticmethod
    def forward(ctx, x, index, inverse, repeats):
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse)
        if ctx.repeats > 1:
            grad_x = grad_x.view(-1, ctx.repeats, grad.shape[-1]).sum(1)
        return grad_x, None, None, None


class SharedQKScores(torch.autograd.Function):
    """Shared-QK attention probabilities and their log-normaliser: (q, k, banned, own) -> (softmax, logsumexp).

    dots = q k^T (..., S, W); `banned` (broadcastable bool) keys get the mask value, a query's `own` key the self
    value (section 2.2); then probs = softmax(dots) and lse = logsumexp(dots). Written as one function so that the
    exponentials are taken once (a fused softmax; lse = max(dots) - log(max(probs)), exact since the largest
    probability is 1 / sum exp(dots - max)) instead of logsumexp + exp(dots - lse) + a third exp in logsumexp's
    backward, and the backward keeps only probs and the `own` mask.
    """

    @staticmethod
    def forward(ctx, q, k, banned, own):
        dots = torch.matmul(q, k.transpose(-1, -2))  # (..., S, W)
        mask_value, self_value = mask_values(dots.dtype)
        if banned is not None:
            dots.masked_fill_(banned, mask_value)
        dots.masked_fill_(own, self_value)
        probs = torch.softmax(dots, dim=-1)
        lse = dots.amax(dim=-1).sub_(probs.amax(dim=-1).log_())  # (..., S)
        ctx.save_for_backward(q, k, probs, own)
        return probs, lse

    @staticmethod
    def backward(ctx, grad_probs, grad_lse):
        q, k, probs, own = ctx.saved_tensors
        if grad_probs is None:
            grad_dots = probs * grad_lse.unsqueeze(-1)
        else:  # d lse / d dots = probs; banned keys have probs exactly 0, so their gradient is 0 already
            grad_dots = softmax_backward(grad_probs, probs)
            if grad_lse is not None:
                grad_dots.addcmul_(probs, grad_lse.unsqueeze(-1))
        grad_dots.masked_fill_(own, 0.0)  # the self value is a constant
        grad_q = torch.matmul(grad_dots, k) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_dots.transpose(-1, -2), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, None, None


class NormaliseKeys(torch.autograd.Function):
    """Shared-QK keys (section 2.2): unit RMS per head, then the usual 1/sqrt(d_kv); (..., K) -> (..., K).

    With y = x * s, s = rsqrt(mean(x^2) + eps) / sqrt(K), the input gradient is s * (g - y * sum(g * y)): two
    passes backward instead of autograd's seven through pow, mean, rsqrt, mul and div."""

    @staticmethod
    def forward(ctx, qk):
        K = qk.shape[-1]
        scale = torch.linalg.vector_norm(qk, dim=-1, keepdim=True).square_().div_(K).add_(1e-6).rsqrt_()
        keys = qk * scale.div_(math.sqrt(K))
        ctx.save_for_backward(keys, scale)
        return keys

    @staticmethod
    def backward(ctx, grad):
        keys, scale = ctx.saved_tensors
        return torch.addcmul(grad, keys, (grad * keys).sum(-1, keepdim=True), value=-1).mul_(scale)


def chunked_attention(q, k, v, pos, key_mask, chunk_length, before, after, causal, self_mask, drop, training):
    """`models.chunked_attention.chunked_attention` (same arguments and results) on the kernels above."""
    B, H, N, K = q.shape
    C, S = N // chunk_length, chunk_length
    q = q.view(B, H, C, S, K)
    k = look_adjacent(k.view(B, H, C, S, K), before, after)  # (B, H, C, W, K)
    v = look_adjacent(v.view(B, H, C, S, K), before, after)
    q_pos = pos.view(pos.shape[0], pos.shape[1], C, S)
    k_pos = look_adjacent(q_pos, before, after)  # (B|1, H|1, C, W)
    banned = banned_keys(key_mask, q_pos, k_pos, causal)
    if self_mask:  # shared-QK: a query's own key is penalised (section 2.2)
        probs, lse = SharedQKScores.apply(q, k, banned, q_pos.unsqueeze(-1) == k_pos.unsqueeze(-2))
        return torch.matmul(dropout(probs, drop, training), v), lse
    if key_mask is None and not (training and drop > 0):
        # a fused kernel (flash attention on CPU) keeps no (S, W) probabilities; chunks as heads, (B, H) as batch.
        # Without a key mask every query sees at least itself, so -inf (SDPA) and the mask value agree exactly.
        mask = None if banned is None else ~banned.flatten(0, 1)  # (1, C, S, W): True = may attend
        out = F.scaled_dot_product_attention(
            q.reshape(B * H, C, S, K), k.flatten(0, 1), v.flatten(0, 1), attn_mask=mask, scale=1.0
        )
        return out.view(B, H, C, S, K), None
    dots = torch.matmul(q, k.transpose(-1, -2))  # (B, H, C, S, W); fresh, so it may be masked in place
    if banned is not None:
        dots.masked_fill_(banned, mask_values(dots.dtype)[0])
    probs = dropout(torch.softmax(dots, dim=-1), drop, training)
    return torch.matmul(probs, v), None
