"""The fast paths' dense products: the process's matmul kernel (BLAS or oneDNN, `models.settings`), decoding's few-row
product forms, and the weight copies those forms read.

`linear(x, weight, bias)` is what every product of a fast path calls: `dense` (the kernel) everywhere, except inside a
decoding step (`decoding()`) under `decoding="shaped"`, where a fixed rule of the shape (`decoding_form`) may read a
transposed or prepacked copy of the weight instead. The forms differ from F.linear in the last bits only.

Dimension legend: M rows, In / Out a weight's input / output features.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from models.fast.private import onednn_available, onednn_linear, onednn_pack
from models.settings import cpu_kernels


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
        and cpu_kernels().matmul == "onednn"
    )


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the process's matmul kernel for CPU fp32 (`set_cpu_kernels(matmul=...)`);
    elsewhere (GPU, other dtypes, autocast, torch.compile) F.linear. With autograd, backward runs the two gradient
    products with the same kernel (`_DenseOneDNN`)."""
    if not _onednn_eligible(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        # 2-D inside the Function: its output must not be a view (in-place ops follow, e.g. relu_), reshaped outside
        out = _DenseOneDNN.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return onednn_linear(x, weight, bias)


class _DenseOneDNN(torch.autograd.Function):
    """x @ W^T [+ b] by oneDNN; backward d_x = d_out @ W and d_W = d_out^T @ x, also by oneDNN (it reads the
    transposed operands in place, no copies), d_b = the column sums of d_out."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors  # x (M, In), d_out (M, Out)
        d_x = onednn_linear(d_out, weight.t()) if ctx.needs_input_grad[0] else None
        d_w = onednn_linear(d_out.t(), x.t()) if ctx.needs_input_grad[1] else None
        d_b = d_out.sum(0) if ctx.needs_input_grad[2] else None
        return d_x, d_w, d_b


# ---- decoding: a few rows against large weights, bound by reading the weights ----

# How `linear` computes x @ weight^T for a few rows; every form returns the same sums in row-major order, with
# different rounding in the last bits. `dense(x, W)` (the process's kernel); x @ W^T with W^T kept contiguous;
# oneDNN with W prepacked for that many rows
FORMS = ("linear", "right", "packed")
VOCABULARY_RATIO = 8  # a weight with this many times more outputs than inputs is a vocabulary projection
PACKED_ROWS = 4  # from this many rows, weights with at least as many outputs as inputs are read prepacked

_DECODING = threading.local()  # .depth > 0 inside `decoding()`


@contextlib.contextmanager
def decoding():
    """Marks a decoding step (`models.fast.t5.decode_step`): only there may `linear` compute in another form
    (`decoding_form`, under `decoding="shaped"`). Elsewhere it is plain `dense`, so the same input always gets the
    same rounding."""
    _DECODING.depth = getattr(_DECODING, "depth", 0) + 1
    try:
        yield
    finally:
        _DECODING.depth -= 1


def in_decoding() -> bool:
    return getattr(_DECODING, "depth", 0) > 0


def decoding_form(rows: int, out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """How `linear` computes a decoding step's (rows, In) x (Out, In)^T product under `decoding="shaped"`: a fixed rule
    of the shape, so the same input always gets the same rounding. A decoding step is bound by reading the weights.
    Measured (benchmarks/bench_kernels.py) on an Intel Xeon, MKL, 1 thread, T5-small weights streamed from memory:
    the vocabulary projection (32128 x 512) at 1 row took 0.77x of F.linear's time from a contiguous copy of W^T, at
    4-32 rows 0.52-0.72x prepacked for oneDNN; stacked q/k/v and wi at 4-32 rows 0.78-0.91x prepacked; the other
    products are fastest as they are."""
    vocabulary = out_features >= VOCABULARY_RATIO * in_features
    if vocabulary and rows == 1:
        return "right"
    if dtype != torch.float32 or not onednn_available():
        return "linear"
    if vocabulary or (rows >= PACKED_ROWS and out_features >= in_features):
        return "packed"
    return "linear"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., In) @ weight (Out, In)^T [+ bias], row-major (SDPA's fused CPU kernel needs a unit stride in the last
    dimension of q, k and v). Inside a decoding step (`decoding()`) under `decoding="shaped"`, for at most 128 rows,
    without bias or autograd, on CPU and not compiled, in the form `decoding_form` gives; everywhere else `dense`."""
    rows = x.numel() // x.shape[-1]
    if (
        bias is not None
        or rows > 128
        or not in_decoding()
        or cpu_kernels().decoding != "shaped"
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()
    ):
        return dense(x, weight, bias)
    form = decoding_form(rows, weight.shape[0], weight.shape[1], weight.dtype)
    return compute(form, x.reshape(rows, -1), weight).view(*x.shape[:-1], weight.shape[0])


def compute(form: str, flat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """flat (M, In) @ weight (Out, In)^T in one of the `FORMS` -> (M, Out), row-major."""
    if form == "linear":
        return dense(flat, weight)
    if form == "right":
        return flat @ copy_of((weight,), "T", lambda w: w.T.contiguous())
    rows = flat.shape[0]
    return onednn_linear(flat, copy_of((weight,), ("packed", rows), lambda w: onednn_pack(w, rows)))


# ---- weight copies: derived from parameters, kept while they live and rebuilt when they may have changed ----

# (id(first weight), kind) -> (weak reference to the first weight, the weights' states, copy)
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
    storage), its version counter (an in-place update outside an optimizer; a tensor attribute torch keeps for
    autograd, read where present), the optimizer steps taken in this process (an optimizer's in-place update, fused
    kernels included), its dtype and device."""
    return (weight.data_ptr(), getattr(weight, "_version", None), _OPTIMIZER_STEPS[0], weight.dtype, weight.device)


def copy_of(weights: tuple[torch.Tensor, ...], kind, build) -> torch.Tensor:
    """`build(*weights detached)`: a copy of the weights in another layout (kind "T": W^T contiguous; ("packed",
    rows): oneDNN's blocked layout; "stacked": q, k, v concatenated), kept while the first weight lives (freed with
    it) and rebuilt when any may have changed (`weight_state`). Not a parameter: optimizers, checkpoints and state
    dicts never see it."""
    state = tuple(weight_state(w) for w in weights)
    key = (id(weights[0]), kind)
    entry = _COPIES.get(key)
    if entry is None or entry[0]() is not weights[0] or entry[1] != state:
        copy = build(*(w.detach() for w in weights))
        forget = lambda _, key=key, copies=_COPIES: copies.pop(key, None)  # noqa: E731 (bound: safe at exit)
        entry = _COPIES[key] = (weakref.ref(weights[0], forget), state, copy)
    return entry[2]
