"""`models.common.dense`: the process's dense-product kernel (BLAS or oneDNN, by measurement) and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import common
from models.common import dense

pytestmark = pytest.mark.skipif(not common._packing_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn(monkeypatch):
    monkeypatch.setenv("MODELS_DENSE_KERNEL", "onednn")
    calls = []
    original = common._onednn
    monkeypatch.setattr(common, "_onednn", lambda x, *a: calls.append(tuple(x.shape)) or original(x, *a))
    return calls


def test_onednn_forward_and_gradients_equal_f_linear(onednn):
    x = torch.randn(2, 7, 24).requires_grad_()
    w = torch.randn(40, 24).requires_grad_()
    g = torch.randn(2, 7, 40)
    out = dense(x, w)
    assert out.shape == (2, 7, 40) and out.is_contiguous()
    out.relu_()  # in place on the output (the feed-forward does): allowed, and differentiated through
    (out * g).sum().backward()
    got = (out.detach(), x.grad, w.grad)
    x.grad = w.grad = None
    want = F.linear(x, w).relu_()
    (want * g).sum().backward()
    for a, b in zip(got, (want.detach(), x.grad, w.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert onednn == [(14, 24), (14, 40), (40, 14)]  # forward, d_x, d_w: all three products by oneDNN


def test_onednn_reads_strided_operands_and_one_sided_gradients(onednn):
    x = torch.randn(24, 9).t()  # (9, 24), not contiguous
    w = torch.randn(30, 24).requires_grad_()
    dense(x, w).sum().backward()  # only the weight needs a gradient
    torch.testing.assert_close(w.grad, torch.ones(9, 30).t() @ x, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(dense(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert len(onednn) == 3


def test_blas_pinned_and_other_dtypes_are_exactly_f_linear(monkeypatch, onednn):
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    monkeypatch.setenv("MODELS_DENSE_KERNEL", "blas")
    assert torch.equal(dense(x, w), F.linear(x, w))
    monkeypatch.setenv("MODELS_DENSE_KERNEL", "onednn")
    assert torch.equal(dense(x.double(), w.double()), F.linear(x.double(), w.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(x, w).dtype == torch.bfloat16  # autocast's cast, as F.linear under autocast
    assert onednn == []


def test_bad_kernel_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MODELS_DENSE_KERNEL", "mkl")
    with pytest.raises(ValueError, match="MODELS_DENSE_KERNEL='mkl'.*auto.*blas.*onednn"):
        dense(torch.randn(2, 3), torch.randn(4, 3))


def test_measurement_once_per_thread_count_without_touching_the_global_random_stream(monkeypatch):
    monkeypatch.delenv("MODELS_DENSE_KERNEL", raising=False)
    monkeypatch.setattr(common, "_DENSE", {})
    measured = []
    original = common._measure_dense
    monkeypatch.setattr(common, "_measure_dense", lambda: measured.append(1) or original())
    torch.manual_seed(3)
    state = torch.get_rng_state()
    for _ in range(3):
        kernel = common.dense_kernel()
    assert kernel in common.DENSE_KERNELS and measured == [1]
    assert torch.equal(torch.get_rng_state(), state)
    assert common._DENSE == {torch.get_num_threads(): kernel}


def test_measurement_keeps_onednn_only_by_the_margin():
    """The decision rule on fixed timings: oneDNN must beat the BLAS's median by `DENSE_MARGIN`."""

    def timed(blas: float, onednn: float):
        ticks = iter([t for _ in range(8) for t in (0.0, blas, 0.0, onednn)])
        return common._measure_dense(7, clock=lambda: next(ticks))

    assert timed(1.0, 0.5) == "onednn"
    assert timed(1.0, 0.85) == "blas"  # within the margin: the BLAS stays
    assert timed(0.5, 1.0) == "blas"


def test_t5_training_step_runs_its_products_through_the_kernel(onednn):
    """Every dense product of a T5 training step, forward and backward, goes through `dense` (none left on
    F.linear or an nn.Linear call), and the step's gradients equal the BLAS's."""
    from models.t5 import T5Config, T5Model

    config = T5Config.from_preset("tiny", vocab_size=64, dropout_rate=0.0, num_layers=1)
    torch.manual_seed(0)
    model = T5Model(config).train()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    model(x, None, y).logsumexp(-1).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    # encoder layer: q/k/v (stacked), o, wi, wo; decoder layer: those and cross q, k/v (stacked), o; the LM head
    forwards = 4 + 7 + 1
    assert len(onednn) == 3 * forwards
    model.zero_grad()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MODELS_DENSE_KERNEL", "blas")
        model(x, None, y).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_linear_module_with_bias_equals_nn_linear(onednn):
    """`models.common.Linear` (the Reformer's layers): same parameters and state dict as nn.Linear, bias included,
    forward and gradients equal."""
    torch.manual_seed(1)
    ours = common.Linear(12, 20)
    ref = torch.nn.Linear(12, 20)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 12)
    g = torch.randn(3, 4, 20)
    for module in (ours, ref):
        (module(x) * g).sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert onednn == [(12, 12), (20, 12), (3, 4, 12)]  # forward with autograd, d_w (x needs none); forward without
