"""The process's setting (`models.set_cpu_kernels`: paths, matmul kernel, decoding forms) and the fast paths'
dense products (`models.fast.products.dense`: BLAS or oneDNN) and their gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models import settings
from models.fast import products
from models.fast.products import dense
from models.layers import Linear

needs_onednn = pytest.mark.skipif(not models.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _restore_kernels():
    before = models.cpu_kernels()
    yield
    models.set_cpu_kernels(before.matmul, before.decoding, before.paths)


@pytest.fixture
def onednn(monkeypatch):
    models.set_cpu_kernels("onednn", "plain", "fast")
    calls = []
    original = products.onednn_linear
    monkeypatch.setattr(products, "onednn_linear", lambda x, *a: calls.append(tuple(x.shape)) or original(x, *a))
    return calls


@needs_onednn
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


@needs_onednn
def test_onednn_reads_strided_operands_and_one_sided_gradients(onednn):
    x = torch.randn(24, 9).t()  # (9, 24), not contiguous
    w = torch.randn(30, 24).requires_grad_()
    dense(x, w).sum().backward()  # only the weight needs a gradient
    torch.testing.assert_close(w.grad, torch.ones(9, 30).t() @ x, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(dense(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert len(onednn) == 3


@needs_onednn
def test_blas_pinned_and_other_dtypes_are_exactly_f_linear(monkeypatch, onednn):
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    models.set_cpu_kernels("blas", "plain", "fast")
    assert torch.equal(dense(x, w), F.linear(x, w))
    models.set_cpu_kernels("onednn", "plain", "fast")
    assert torch.equal(dense(x.double(), w.double()), F.linear(x.double(), w.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dense(x, w).dtype == torch.bfloat16  # autocast's cast, as F.linear under autocast
    assert onednn == []


def test_bad_kernel_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="matmul kernel 'mkl'.*auto.*blas.*onednn"):
        models.set_cpu_kernels("mkl", "plain", "fast")
    with pytest.raises(ValueError, match="decoding forms 'fast'.*plain.*shaped"):
        models.set_cpu_kernels("blas", "fast", "fast")
    with pytest.raises(ValueError, match="paths 'quick'.*reference.*fast"):
        models.set_cpu_kernels("blas", "plain", "quick")
    # a speed path's kernel asked for with the reference path: named, with what to use instead
    with pytest.raises(ValueError, match="decoding 'shaped': a speed path.*paths 'fast'.*decoding 'plain'"):
        models.set_cpu_kernels("blas", "shaped", "reference")
    if models.onednn_available():
        with pytest.raises(ValueError, match="matmul 'onednn': a speed path.*paths 'fast'"):
            models.set_cpu_kernels("onednn", "plain", "reference")


def test_the_reference_path_until_set_and_auto_is_a_rule_of_the_machine(monkeypatch):
    """A process that sets nothing computes with the reference path and torch's own F.linear; `auto` resolves from the
    processor's vendor alone (never a timing) on the fast paths, to the BLAS on the reference path, and the global
    random stream is not touched by any of it."""
    import subprocess
    import sys

    code = "import models; k = models.cpu_kernels(); print(k.paths, k.matmul, k.decoding)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["reference", "blas", "plain"]
    torch.manual_seed(3)
    state = torch.get_rng_state()
    onednn = "onednn" if models.onednn_available() else "blas"
    for vendor, want in (("AuthenticAMD", onednn), ("GenuineIntel", "blas"), ("", "blas")):
        monkeypatch.setattr(settings, "processor_vendor", lambda vendor=vendor: vendor)
        assert [models.set_cpu_kernels("auto", "plain", "fast").matmul for _ in range(3)] == [want] * 3
        assert models.set_cpu_kernels("auto", "plain", "reference").matmul == "blas"
    assert torch.equal(torch.get_rng_state(), state)


def test_the_reference_path_runs_no_fast_code(monkeypatch):
    """Under `paths="reference"` a training step and a generation of either family call nothing of models/fast/ (the
    model files as written), where the fast paths call it."""
    import models.fast.products as fast_products
    import models.fast.reformer as fast_reformer
    import models.fast.t5 as fast_t5

    calls = []
    for module in (fast_t5, fast_reformer, fast_products):
        for name, fn in list(vars(module).items()):
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__ and not isinstance(fn, type):
                monkeypatch.setattr(
                    module, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k)
                )
    for family in ("t5", "reformer"):
        torch.manual_seed(0)
        small = {"t5": dict(d_model=32, d_kv=8, d_ff=48), "reformer": dict(axial_pos_shape=[8, 8], hash_seed=1)}
        config = models.config_class(family).from_preset("tiny", vocab_size=64, **small[family])
        model = models.build_model(family, config)
        x = torch.randint(2, 64, (2, 12))
        args = (x, None, x[:, :5]) if config.layout == "encoder_decoder" else (x,)
        for paths in ("reference", "fast"):
            calls.clear()
            models.set_cpu_kernels("blas", "plain", paths)
            model.train()
            model(*args).logsumexp(-1).mean().backward()
            model.eval()
            with torch.no_grad():
                model.generate(x, max_new_tokens=3, num_beams=2)
            assert bool(calls) == (paths == "fast"), (family, paths, sorted(set(calls)))


@needs_onednn
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
    models.set_cpu_kernels("blas", "plain", "fast")
    model(x, None, y).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@needs_onednn
def test_linear_module_with_bias_equals_nn_linear(onednn):
    """`models.layers.Linear` (every layer's products): same parameters and state dict as nn.Linear, bias included,
    forward and gradients equal."""
    torch.manual_seed(1)
    ours = Linear(12, 20)
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
