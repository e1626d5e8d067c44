"""T5's attention differentiated by hand (`BiasedAttention`), and head splits whose gradient is one buffer
(`split_heads`): the fast form of `T5Attention.attend` on CPU with autograd recording, where SDPA has no fused kernel
that takes dropout or a mask needing a gradient (the position bias) and runs its unfused math through autograd (a
merged (B, H, Lq, Lk) mask per stack, float dropout noise, a fresh (B, H, Lq, Lk) tensor for every step forward and
backward). Tested against plain autograd in tests/test_fast_kernels.py.

Dimension legend: B batch, H heads, Lq / Lk query / key length, Dk per-head size, L a projection's length, n stacked
projections (q, k, v).
"""

from __future__ import annotations

import torch

from models.fast.private import softmax_backward
from models.layers import drop_mask, neg_inf

# per-item work (M * K * N multiply-adds) from which `_bmm` multiplies strided heads in place, one bmm per batch item
_IN_PLACE_WORK = 2**20


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (B, H, M, K) @ b (B, H, K, N) -> (B, H, M, N), into `out` when given (any strides, e.g. a (B, M, H, N)
    buffer seen as (B, H, M, N)). Heads sliced from a projection, (B, L, H, Dk) memory seen as (B, H, L, Dk), cannot
    be flattened to one (B * H) batch, so `matmul` first copies them (and the result into `out`); per batch item
    they are a batch bmm reads in place. Below `_IN_PLACE_WORK` per item (the tiny presets) the Python loop costs
    more than the copies, and it is plain matmul."""
    B, _, M, K = a.shape
    strided_out = out is not None and not out.is_contiguous()
    if B == 1 or strided_out or M * K * b.shape[-1] < _IN_PLACE_WORK or a.device.type != "cpu":
        return torch.matmul(a, b) if out is None else out.copy_(torch.matmul(a, b))
    if out is None:
        out = a.new_empty(B, a.shape[1], M, b.shape[-1])
    for i in range(B):
        torch.bmm(a[i], b[i], out=out[i])
    return out


def _heads_major(like: torch.Tensor, L: int) -> torch.Tensor:
    """An uninitialised (B, H, L, Dk) tensor laid out as (B, L, H, Dk): `.transpose(1, 2).reshape(B, L, H * Dk)` of
    it is a view, which is what the output projection reads and what a projection's gradient is made of."""
    B, H, _, Dk = like.shape
    return like.new_empty(B, L, H, Dk).transpose(1, 2)


def split_heads(x: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, L, n * H * Dk), n stacked projections (q, k, v) -> n views (B, H, L, Dk) of it.

    Autograd's own split (view, permute, unbind) puts the n head gradients back with a `stack` and a `reshape`, two
    copies of the (B, L, n * H * Dk) gradient. Here `BiasedAttention` writes them into one buffer of that layout
    (`_grad_buffers`) and `_SplitHeads`'s backward hands the buffer on as it is: no copy."""
    B, L, _ = x.shape
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _SplitHeads.apply(x, n, heads)
    return x.view(B, L, n, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _SplitHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n: int, heads: int):
        B, L, _ = x.shape
        ctx.set_materialize_grads(False)
        ctx.shape = x.shape
        return x.view(B, L, n, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        packed = _tiled(grads, ctx.shape)
        if packed is None:  # grads of another layout, or some missing: one copy each into the packed layout
            some = next(g for g in grads if g is not None)
            B, L, _ = ctx.shape
            packed = some.new_empty(B, L, len(grads), some.shape[1], some.shape[3])
            for i, g in enumerate(grads):
                slot = packed[:, :, i].transpose(1, 2)
                slot.copy_(g) if g is not None else slot.zero_()
            packed = packed.view(ctx.shape)
        return packed, None, None


def _tiled(views, shape: torch.Size) -> torch.Tensor | None:
    """The (B, L, n * I) tensor whose n head slots the (B, H, L, Dk) `views` are, in order, if they are exactly that
    (one storage, slot i at offset i * I); else None."""
    if any(v is None for v in views):
        return None
    B, L, width = shape
    first, n = views[0], len(views)
    I = width // n  # noqa: E741 (inner size H * Dk)
    H, Dk = first.shape[1], first.shape[3]
    want = (L * width, Dk, width, 1)
    base = first.storage_offset()
    for i, v in enumerate(views):
        if (
            v.shape != (B, H, L, Dk)
            or v.stride() != want
            or v.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or v.storage_offset() != base + i * I
            or v.dtype != first.dtype
        ):
            return None
    return first.as_strided(shape, (L * width, width, 1), base)


def _grad_buffers(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Uninitialised gradient buffers for the (B, H, L, Dk) heads `xs`, each laid out as (B, L, H, Dk); heads that
    are the slots of one `split_heads` (q, k, v of a self-attention; k, v of a cross-attention) get views of one
    (B, L, n * H * Dk) buffer in the same slots, which `_SplitHeads` passes on without copying."""
    out: list[torch.Tensor | None] = [None] * len(xs)
    for i, x in enumerate(xs):
        if torch.compiler.is_compiling():  # storages are not traceable (and `split_heads` is plain there)
            out[i] = _heads_major(x, x.shape[2])
        if out[i] is not None:
            continue
        B, H, L, Dk = x.shape
        width = x.stride(2)
        n = width // (H * Dk)
        group = [j for j, y in enumerate(xs) if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()]
        slots = [xs[j] for j in sorted(group, key=lambda j: xs[j].storage_offset())]
        if n > 1 and len(slots) == n and width % (H * Dk) == 0:
            start = slots[0].storage_offset()
            shape = torch.Size((B, L, width))
            if _tiled(slots, shape) is not None:
                buffer = x.new_empty(B, L, n, H, Dk)
                for j in group:
                    out[j] = buffer[:, :, (xs[j].storage_offset() - start) // (H * Dk)].transpose(1, 2)
                continue
        out[i] = _heads_major(x, L)
    return out


class BiasedAttention(torch.autograd.Function):
    """softmax(q k^T + bias, keys `hidden` excluded) with dropout p, times v, differentiated by hand.

    q (B, H, Lq, Dk), k/v (B, H, Lk, Dk), bias (1 or B, H, Lq, Lk), hidden bool (B or 1, 1, Lq or 1, Lk) or None
    -> (B, H, Lq, Dk), laid out as (B, Lq, H, Dk) so the output projection reads it without a copy. What autograd
    would do with more memory: the (B, H, Lq, Lk) scores are kept once (the probabilities, 4 bytes each) plus the
    bool dropout mask, and each step reuses the score-sized buffer it frees (fresh allocations of this size cost
    page faults on CPU). Masked keys get probability 0, hence gradient 0. Products with the heads go through `_bmm`,
    which reads head-strided q, k, v in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, hidden, p: float):
        scores = _bmm(q, k.transpose(-1, -2))  # (B, H, Lq, Lk); no 1/sqrt(Dk) (folded into the init of q)
        if bias is not None:
            scores += bias
        if hidden is not None:
            scores.masked_fill_(hidden, neg_inf(scores.dtype))
        probs = scores.softmax(-1)
        drop, scale = drop_mask(probs, p) if p > 0.0 else (None, 1.0)
        dropped = probs if drop is None else torch.where(drop, probs.new_zeros(()), probs, out=scores)
        out = _bmm(dropped, v, out=_heads_major(q, q.shape[2]))
        # a row whose keys are all hidden has a uniform softmax, and its gradient must not reach the hidden keys; in
        # any other row they have probability 0, hence gradient 0. Padding never hides a whole row, so on CPU a look
        # at the small mask spares backward a pass over the scores (elsewhere it would wait for the device; compiled,
        # it would break the graph)
        full_rows = hidden is not None and (
            hidden.device.type != "cpu" or torch.compiler.is_compiling() or bool(hidden.all(-1).any())
        )
        ctx.save_for_backward(q, k, v, probs, drop, hidden if full_rows else None)
        ctx.scale, ctx.bias_shape = scale, None if bias is None else bias.shape
        return out.mul_(scale) if drop is not None else out  # rescale the (B, H, Lq, Dk) output, not the scores

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, probs, drop, hidden = ctx.saved_tensors
        d_q, d_k, d_v = _grad_buffers(q, k, v)  # one buffer where q, k, v (or k, v) are one projection's heads
        if drop is None:
            _bmm(probs.transpose(-1, -2), d_out, out=d_v)
            d_probs = _bmm(d_out, v.transpose(-1, -2))
        else:
            d_out = d_out * ctx.scale
            buffer = torch.where(drop, 0.0, probs)  # the dropped probabilities again
            _bmm(buffer.transpose(-1, -2), d_out, out=d_v)
            d_probs = _bmm(d_out, v.transpose(-1, -2), out=buffer).masked_fill_(drop, 0.0)
        d_scores = softmax_backward(d_probs, probs)  # probs * (d_probs - <d_probs, probs>)
        if hidden is not None:  # kept only when some row has every key hidden (see forward)
            d_scores.masked_fill_(hidden, 0.0)
        _bmm(d_scores, k, out=d_q)
        _bmm(d_scores.transpose(-1, -2), q, out=d_k)
        d_bias = d_scores.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None  # summed over B
        return d_q, d_k, d_v, d_bias, None, None
