"""One gradient tensor for a tied embedding / output weight (`tie`), and dropout + relu with a one-pass backward
(`dropped_relu_`): fast forms of T5's training forward. Tested against plain autograd in tests/test_fast_kernels.py.

A tied weight (T5 v1.0: the token embedding is also the output projection) through `nn.Embedding` and `F.linear`
gets three (V, D) gradients in a training step, added out of place: a dense one per lookup (encoder and decoder
inputs: a fresh zeroed (V, D) tensor each, for a few hundred rows) and the projection's, which `F.linear` returns as
a transposed view, so autograd's input buffer could not add into it in place (nor add sparse lookup gradients into
it: it does that in place only when the sparse one arrives first, and the projection's always comes first). At
T5-small's 32128 x 512 each is 64 MiB of fresh pages: about 120 ms of a 1.8 s training step on one core went to
zeroing, faulting in and adding them. Through `Tied`, the projection's gradient is one fresh contiguous (V, D) tensor
and the lookups add their rows into it (`index_add_`) before it reaches the parameter, whose `.grad` stays the dense
tensor optimizers and DeepSpeed expect.

Dimension legend: V vocabulary, D model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.fast.private import relu_backward
from models.fast.products import dense


def tie(weight: torch.Tensor) -> Tied | None:
    """A `Tied` for one forward that looks tokens up and projects to the vocabulary with `weight`, when autograd
    records a gradient for it; otherwise None (the plain path). ZeRO-3's partitioned parameters (`ds_id`) keep the
    plain path (their data exists only inside the module's own forward), and so does torch.compile (it plans the
    gradient's memory itself; the rows list is a side effect)."""
    if not (torch.is_grad_enabled() and weight.requires_grad) or hasattr(weight, "ds_id"):
        return None
    if torch.compiler.is_compiling():
        return None
    return Tied(weight)


class Tied:
    """One forward's uses of a tied weight, all through one alias node (`_TiedWeight`) whose backward runs after
    every use's: the projection's gradient arrives there dense and the lookups' rows are added into it in place."""

    def __init__(self, weight: torch.Tensor):
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, d_embeddings) of each lookup, in backward
        self.weight = _TiedWeight.apply(weight, self.rows)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return _Lookup.apply(ids, self.weight, self.rows)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return _Projection.apply(h, self.weight)


class _TiedWeight(torch.autograd.Function):
    """The weight itself (an alias); backward: the projection's gradient with every lookup's rows added in place.
    It runs after the lookups' backward because they take the alias as an input (and return no gradient for it)."""

    @staticmethod
    def forward(ctx, weight, rows):
        ctx.rows, ctx.shape = rows, weight.shape
        ctx.set_materialize_grads(False)  # None when no projection used the alias
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_weight):
        if not ctx.rows:
            return d_weight, None
        if d_weight is None:
            d_weight = ctx.rows[0][1].new_zeros(ctx.shape)
        elif not d_weight.is_contiguous():  # `_Projection`'s is; anything else gets its own copy before the adds
            d_weight = d_weight.contiguous()
        for ids, d_rows in ctx.rows:  # d_weight is `_Projection`'s fresh tensor, which nothing else holds
            d_weight.index_add_(0, ids.reshape(-1), d_rows.reshape(-1, d_rows.shape[-1]).to(d_weight.dtype))
        ctx.rows.clear()
        return d_weight, None


class _Lookup(torch.autograd.Function):
    """F.embedding through the alias; backward hands its rows to `_TiedWeight` instead of a (V, D) gradient."""

    @staticmethod
    def forward(ctx, ids, weight, rows):
        ctx.ids, ctx.rows = ids, rows
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        ctx.rows.append((ctx.ids, d_out))
        return None, None, None


class _Projection(torch.autograd.Function):
    """dense(h, weight) whose weight gradient is `d_out^T @ h`: a fresh contiguous (V, D) tensor."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return dense(h, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        # under autocast the forward's product ran in d_out's dtype (bf16 / fp16) on cast inputs: so does backward,
        # and each gradient goes back to its input's dtype, as autograd through the casts would return it
        h, weight = ctx.saved_tensors
        dtype = d_out.dtype
        d_h = dense(d_out, weight.to(dtype).t()).to(h.dtype) if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:
            flat = d_out.reshape(-1, d_out.shape[-1]).t()
            d_w = dense(flat, h.reshape(-1, h.shape[-1]).to(dtype).t()).to(weight.dtype)
        return d_h, d_w


def dropped_relu_(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """relu(x) with the elements `drop` zeroed, in place on x (a feed-forward's hidden layer, which nothing else
    reads). Autograd recorded two passes for its backward (masked_fill, threshold_backward); `_DroppedRelu` makes it
    one, since the output is 0 wherever either zeroed it."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling():
        return _DroppedRelu.apply(x, drop)
    return x.masked_fill_(drop, 0.0).relu_()


class _DroppedRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, drop):
        out = x.masked_fill_(drop, 0.0).relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        (out,) = ctx.saved_tensors
        return relu_backward(d_out, out), None
