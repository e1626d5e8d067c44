"""`models.common.dense`: the process's dense-product kernel (BLAS or oneDNN, an explicit setting) and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import common
from models.common import dense

pytestmark = pytest.mark.skipif(not common._packing_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = common.cpu_kernels()
    yield
    common.set_cpu_kernels(before.matmul, before.decoding)


@pytest.fixture
def onednn(monkeypatch):
    common.set_cpu_kernels("onednn")
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
    common.set_cpu_kernels("blas")
    assert torch.equal(dense(x, w), F.linear(x, w))
    common.set_cpu_kernels("onednn")
    assert torch.equal(dense(x.double(), w.double()), F.linear(x.double(), w.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(x, w).dtype == torch.bfloat16  # autocast's cast, as F.linear under autocast
    assert onednn == []


def test_bad_kernel_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="matmul kernel 'mkl'.*auto.*blas.*onednn"):
        common.set_cpu_kernels("mkl")
    with pytest.raises(ValueError, match="decoding forms 'fast'.*plain.*shaped"):
        common.set_cpu_kernels("blas", "fast")


def test_the_reference_kernels_until_set_and_auto_is_a_rule_of_the_machine(monkeypatch):
    """A process that sets nothing computes with torch's own F.linear; `auto` resolves from the processor's vendor
    alone (never a timing), and the global random stream is not touched by any of it."""
    import subprocess
    import sys

    code = "import models, torch; print(models.cpu_kernels().matmul, models.cpu_kernels().decoding)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == [
        "blas",
        "plain",
    ]
    torch.manual_seed(3)
    state = torch.get_rng_state()
    for vendor, want in (("AuthenticAMD", "onednn"), ("GenuineIntel", "blas"), ("", "blas")):
        monkeypatch.setattr(common, "processor_vendor", lambda vendor=vendor: vendor)
        assert [common.set_cpu_kernels("auto").matmul for _ in range(3)] == [want] * 3
    assert torch.equal(torch.get_rng_state(), state)


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
    common.set_cpu_kernels("blas")
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
