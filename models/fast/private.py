"""The private torch ops the speed paths use, each behind a guard: used only where present and computing what its
public fallback computes (checked once on a small fixed input: a property of the torch build, never of timing or
load), else the public fallback. tests/test_fast_kernels.py checks every fallback against the private op.

- `softmax_backward`: `torch._softmax_backward_data` (one fused pass) or the formula in public ops;
- `relu_backward`: `torch.ops.aten.threshold_backward` or `masked_fill` (the same numbers exactly);
- `onednn_linear`, `onednn_pack`: `torch.ops.mkldnn._linear_pointwise` / `_reorder_linear_weight`; where absent,
  `onednn_available()` is False: the oneDNN kernel cannot be chosen (`models.set_cpu_kernels` says so) and decoding's
  packed form is never picked (`models.fast.products.decoding_form`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _probe_input() -> tuple[torch.Tensor, torch.Tensor]:
    """Small fixed inputs (no random draws: the global generator is left alone)."""
    x = torch.linspace(-1.5, 2.0, 24, dtype=torch.float64).view(4, 6)
    return x, torch.linspace(0.3, -0.7, 24, dtype=torch.float64).view(4, 6)


def _fused_softmax_backward() -> bool:
    op = getattr(torch, "_softmax_backward_data", None)
    if op is None:
        return False
    try:
        grad, x = _probe_input()
        probs = x.softmax(-1)
        return torch.allclose(op(grad, probs, -1, probs.dtype), _softmax_backward_formula(grad, probs), atol=1e-12)
    except Exception:  # noqa: BLE001 - a changed signature or a missing kernel: the public formula
        return False


def _softmax_backward_formula(d_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))


# The guards are probed on first use, never at import: a torch op run at import starts the OpenMP thread pool, and a
# process forked after that (the benchmark's forkserver preloads `models`) hangs in its first parallel op.
FUSED_SOFTMAX_BACKWARD: bool | None = None  # None: not probed yet


def fused_softmax_backward() -> bool:
    """Whether `softmax_backward` takes torch's fused private op (probed once)."""
    global FUSED_SOFTMAX_BACKWARD
    if FUSED_SOFTMAX_BACKWARD is None:
        FUSED_SOFTMAX_BACKWARD = _fused_softmax_backward()
    return FUSED_SOFTMAX_BACKWARD


def softmax_backward(d_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The gradient of the scores of `probs = softmax(scores, -1)`: probs * (d_probs - <d_probs, probs>)."""
    if fused_softmax_backward():
        return torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
    return _softmax_backward_formula(d_probs, probs)


def _threshold_backward() -> bool:
    try:
        grad, x = _probe_input()
        out = x.relu()
        return torch.equal(torch.ops.aten.threshold_backward(grad, out, 0.0), grad.masked_fill(out <= 0, 0.0))
    except Exception:  # noqa: BLE001
        return False


THRESHOLD_BACKWARD: bool | None = None  # None: not probed yet


def threshold_backward() -> bool:
    """Whether `relu_backward` takes `aten.threshold_backward` (probed once)."""
    global THRESHOLD_BACKWARD
    if THRESHOLD_BACKWARD is None:
        THRESHOLD_BACKWARD = _threshold_backward()
    return THRESHOLD_BACKWARD


def relu_backward(d_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient of relu's input from its output `out`: d_out where out > 0, else 0."""
    if threshold_backward():
        return torch.ops.aten.threshold_backward(d_out, out, 0.0)
    return d_out.masked_fill(out <= 0, 0.0)


@functools.cache
def onednn_available() -> bool:
    """Whether torch's oneDNN linear and its weight packing are here and give F.linear's products (fp32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = (t.float() for t in _probe_input())  # (4, 6) rows against a (4, 6) weight
        ops = torch.ops.mkldnn
        plain = ops._linear_pointwise(x, w, None, "none", [], "")
        packed = ops._linear_pointwise(x, ops._reorder_linear_weight(w, x.shape[0]), None, "none", [], "")
        want = F.linear(x, w)
        return torch.allclose(plain, want, atol=1e-5) and torch.allclose(packed, want, atol=1e-5)
    except Exception:  # noqa: BLE001 - no such op, or another signature: the public F.linear only
        return False


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., In) @ weight (Out, In)^T [+ bias] by oneDNN (any strides in x and weight; `weight` may also be
    `onednn_pack`'s). Callers check `onednn_available()` first (the kernel setting and `decoding_form` do)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (Out, In) in oneDNN's blocked layout for products with `rows` rows (what torch.compile's freezing pass
    prepacks for CPU inference)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
