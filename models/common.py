"""Mechanisms shared by our model families, in plain PyTorch: cheap dropout (the one implementation of both),
attention with an additive bias differentiated by hand, matmuls for decoding, and a growing key/value cache.

Dimension legend: B batch, H heads, Lq / Lk query / key length, Dk per-head size, N rows being decoded.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook


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
        return torch.ops.aten.threshold_backward(d_out, out, 0.0), None


class Dropout(torch.nn.Dropout):
    """`nn.Dropout` through `dropout` above (same module interface, cheaper masks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class TiedEmbedding(torch.nn.Embedding):
    """A token embedding that is also the output projection (tied weights, T5 v1.0), with the weight's gradient
    built in one tensor when a training forward does both (`tie`).

    With `nn.Embedding` and `F.linear`, a training step built three (V, D) gradients for the one weight and added
    them out of place: a dense one per lookup (encoder and decoder inputs: a fresh zeroed (V, D) tensor each, for a
    few hundred rows) and the projection's, which `F.linear` returns as a transposed view, so autograd's input buffer
    could not add into it in place (nor add sparse lookup gradients into it: it does that in place only when the
    sparse one arrives first, and the projection's always comes first). At T5-small's 32128 x 512 each is 64 MiB of
    fresh pages: about 120 ms of a 1.8 s training step on one core went to zeroing, faulting in and adding them.
    Through `Tied`, the projection's gradient is one fresh contiguous (V, D) tensor and the lookups add their rows
    into it (`index_add_`) before it reaches the parameter, whose `.grad` stays the dense tensor optimizers and
    DeepSpeed expect. ZeRO-3's partitioned parameters (`ds_id`) keep the plain path (their data exists only inside
    the module's own forward), and so does torch.compile (it plans the gradient's memory itself).
    """

    def tie(self) -> Tied | None:
        """A `Tied` for one forward that looks tokens up and projects to the vocabulary with this weight, when
        autograd records a gradient for it; otherwise None (the plain path)."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or hasattr(self.weight, "ds_id"):
            return None
        if torch.compiler.is_compiling():  # the compiled graph fuses the sum itself; the rows list is a side effect
            return None
        return Tied(self.weight)

    def forward(self, ids: torch.Tensor, tied: Tied | None = None) -> torch.Tensor:
        return super().forward(ids) if tied is None else tied.lookup(ids)

    def project(self, h: torch.Tensor, tied: Tied | None = None) -> torch.Tensor:
        """h (..., D) @ weight^T -> (..., V)."""
        return linear(h, self.weight) if tied is None else tied.project(h)


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
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)  # probs * (d_probs - <d_probs, probs>)
        if hidden is not None:  # kept only when some row has every key hidden (see forward)
            d_scores.masked_fill_(hidden, 0.0)
        _bmm(d_scores, k, out=d_q)
        _bmm(d_scores.transpose(-1, -2), q, out=d_k)
        d_bias = d_scores.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None  # summed over B
        return d_q, d_k, d_v, d_bias, None, None


# How `linear` computes x @ weight^T for a few rows; every form returns the same sums in row-major order, with
# different rounding in the last bits. `dense(x, W)` (the process's kernel); x @ W^T with W^T kept contiguous;
# oneDNN with W prepacked for that many rows
FORMS = ("linear", "right", "packed")


_DECODING = threading.local()  # .depth > 0 inside `decoding()`


@contextlib.contextmanager
def decoding():
    """Marks a decoding step (`decode_step`): only there may `linear` compute in another form (`decoding_form`, under
    `CpuKernels.decoding="shaped"`). Elsewhere (training, a full forward in eval) it is plain `dense`, so the same input
    always gets the same rounding."""
    _DECODING.depth = getattr(_DECODING, "depth", 0) + 1
    try:
        yield
    finally:
        _DECODING.depth -= 1


def in_decoding() -> bool:
    return getattr(_DECODING, "depth", 0) > 0


# (id(weight), kind) -> (weak reference to the weight, weight_state(weight), copy): the copies the "right" and
# "packed" forms read, kind "T" (weight^T contiguous) or ("packed", rows)
_COPIES: dict[tuple, tuple] = {}

# Optimizer steps taken in this process. A weight's version counter does not tell every update: the fused AdamW
# kernel (and DeepSpeed's, and anything writing through `.data`) changes a parameter in place without bumping it,
# so a copy keyed on the version alone goes stale after the first fused step (a validation after training steps
# then ran with the q/k/v weights of the previous validation). Every torch optimizer's `step` runs the global
# post-hooks, so the count moves with every update an optimizer makes.
_OPTIMIZER_STEPS = [0]


def _count_step(*_args) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def weight_state(weight: torch.Tensor) -> tuple:
    """What a copy derived from `weight` must match to be current: its storage (a move or reload gives new
    storage), its version counter (an in-place update outside an optimizer), the optimizer steps taken in this
    process (an optimizer's in-place update, fused kernels included), its dtype and device."""
    return (weight.data_ptr(), weight._version, _OPTIMIZER_STEPS[0], weight.dtype, weight.device)


def _packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# ---- which CPU kernels compute the products: an explicit, process-wide setting, never a measurement ----

MATMUL_KERNELS = ("blas", "onednn")
DECODING_FORMS = ("plain", "shaped")


@dataclass(frozen=True)
class CpuKernels:
    """Which code computes CPU fp32 products in this process. Every choice gives the same numbers run after run on
    one machine and software stack (nothing here is decided by a timing); two choices differ in the last bits.

    matmul: "blas" (F.linear: MKL in torch's x86 wheels) or "onednn" (torch's oneDNN linear) for every dense
        product, forward and both gradient products.
    decoding: "plain" (decoding steps' few-row products through `dense` like every other product) or "shaped"
        (by a fixed rule of the product's shape, `decoding_form`).
    """

    matmul: str = "blas"
    decoding: str = "plain"


_KERNELS = [CpuKernels()]  # the reference paths until `set_cpu_kernels` says otherwise


def processor_vendor() -> str:
    """The CPU vendor string of this machine (`AuthenticAMD`, `GenuineIntel`, ...), or "" where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_matmul_kernel() -> str:
    """`auto`'s kernel: a fixed function of the machine, never of its load. oneDNN on AMD processors, where torch's
    MKL takes its slow generic paths (measured on an AMD EPYC: MKL 0.10-0.11 TFLOP/s on one core, oneDNN 0.24-0.26,
    for every T5-small training shape); the BLAS elsewhere (on Intel Xeons MKL is the faster one)."""
    return "onednn" if processor_vendor() == "AuthenticAMD" and _packing_available() else "blas"


def set_cpu_kernels(matmul: str = "blas", decoding: str = "plain") -> CpuKernels:
    """Set this process's CPU kernels (`CpuKernels`); `matmul="auto"` resolves by `default_matmul_kernel`. Returns
    the resolved setting. oneDNN asked for where torch was built without it is an error, not a silent fallback."""
    if matmul == "auto":
        matmul = default_matmul_kernel()
    if matmul not in MATMUL_KERNELS:
        raise ValueError(f"matmul kernel {matmul!r}: expected auto or one of {', '.join(MATMUL_KERNELS)}")
    if decoding not in DECODING_FORMS:
        raise ValueError(f"decoding forms {decoding!r}: expected one of {', '.join(DECODING_FORMS)}")
    if matmul == "onednn" and not _packing_available():
        raise ValueError("matmul kernel 'onednn': this torch build has no oneDNN linear; use 'blas'")
    _KERNELS[0] = CpuKernels(matmul, decoding)
    return _KERNELS[0]


def cpu_kernels() -> CpuKernels:
    """The CPU kernels this process computes with (`set_cpu_kernels`)."""
    return _KERNELS[0]


def dense_kernel() -> str:
    """The kernel of the CPU fp32 products of `dense` in this process: "blas" or "onednn" (`set_cpu_kernels`)."""
    return _KERNELS[0].matmul


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., In) @ weight (Out, In)^T [+ bias] with oneDNN (any strides in x and weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not hasattr(weight, "ds_id")  # ZeRO-3 partitioned weights: DeepSpeed's own linear (it wraps F.linear)
        and dense_kernel() == "onednn"
    )


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through this process's kernel (`dense_kernel`, `set_cpu_kernels`) for CPU fp32;
    elsewhere (GPU, other dtypes, autocast, torch.compile) F.linear. With autograd, backward runs the two gradient
    products with the same kernel (`_DenseOneDNN`)."""
    if not _onednn_eligible(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        # 2-D inside the Function: its output must not be a view (in-place ops follow, e.g. relu_), reshaped outside
        out = _DenseOneDNN.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _onednn(x, weight, bias)


class _DenseOneDNN(torch.autograd.Function):
    """x @ W^T [+ b] by oneDNN; backward d_x = d_out @ W and d_W = d_out^T @ x, also by oneDNN (it reads the
    transposed operands in place, no copies), d_b = the column sums of d_out."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors  # x (M, In), d_out (M, Out)
        d_x = _onednn(d_out, weight.t()) if ctx.needs_input_grad[0] else None
        d_w = _onednn(d_out.t(), x.t()) if ctx.needs_input_grad[1] else None
        d_b = d_out.sum(0) if ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b


class Linear(torch.nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose product is `dense`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


def _copy(weight: torch.Tensor, kind) -> torch.Tensor:
    """A copy of `weight` in another layout, kept while the weight lives (freed with it) and rebuilt when it may
    have changed (`weight_state`: new storage, a version bump, or an optimizer step since). Not a parameter:
    optimizers, checkpoints and state dicts never see it. "T": weight^T, contiguous (In, Out); ("packed", rows):
    oneDNN's blocked layout for products with that many rows (what torch.compile's freezing pass prepacks for CPU
    inference)."""
    version = weight_state(weight)
    entry = _COPIES.get((id(weight), kind))
    if entry is None or entry[0]() is not weight or entry[1] != version:
        w = weight.detach()
        copy = w.T.contiguous() if kind == "T" else torch.ops.mkldnn._reorder_linear_weight(w, kind[1])
        key = (id(weight), kind)
        entry = _COPIES[key] = (weakref.ref(weight, lambda _, key=key: _COPIES.pop(key, None)), version, copy)
    return entry[2]


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return _copy(weight, "T")


def _compute(form: str, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if form == "linear":
        return dense(flat, weight)
    if form == "right":
        return flat @ _copy(weight, "T")
    return torch.ops.mkldnn._linear_pointwise(flat, _copy(weight, ("packed", flat.shape[0])), None, "none", [], "")


VOCABULARY_RATIO = 8  # a weight with this many times more outputs than inputs is a vocabulary projection
PACKED_ROWS = 4  # from this many rows, weights with at least as many outputs as inputs are read prepacked


def decoding_form(rows: int, out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """How `linear` computes a decoding step's (rows, In) x (Out, In)^T product under `CpuKernels.decoding="shaped"`:
    a fixed rule of the shape, so the same input always gets the same rounding. A decoding step is bound by reading
    the weights. Measured (benchmarks/bench_kernels.py) on an Intel Xeon, MKL, 1 thread, T5-small weights streamed
    from memory: the vocabulary projection (32128 x 512) at 1 row took 0.77x of F.linear's time from a contiguous
    copy of W^T, at 4-32 rows 0.52-0.72x prepacked for oneDNN; stacked q/k/v and wi at 4-32 rows 0.78-0.91x
    prepacked; the other products are fastest as they are."""
    vocabulary = out_features >= VOCABULARY_RATIO * in_features
    if vocabulary and rows == 1:
        return "right"
    if dtype != torch.float32 or not _packing_available():
        return "linear"
    if vocabulary or (rows >= PACKED_ROWS and out_features >= in_features):
        return "packed"
    return "linear"


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., In) @ weight (Out, In)^T, row-major (SDPA's fused CPU kernel needs a unit stride in the last
    dimension of q, k and v). Inside a decoding step (`decoding()`) under `CpuKernels.decoding="shaped"`, for at most
    128 rows, without autograd, on CPU and not compiled, in the form `decoding_form` gives (the copies the "right"
    and "packed" forms read are kept per weight, `_copy`); everywhere else `dense`."""
    rows = x.numel() // x.shape[-1]
    if (
        rows > 128
        or not in_decoding()
        or _KERNELS[0].decoding != "shaped"
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()
    ):
        return dense(x, weight)
    form = decoding_form(rows, weight.shape[0], weight.shape[1], weight.dtype)
    out = _compute(form, x.reshape(rows, -1), weight)
    return out.view(*x.shape[:-1], weight.shape[0])


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
