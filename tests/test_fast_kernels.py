"""The speed paths' hand-written pieces (models/fast/) against plain autograd: T5's attention with a bias
(`BiasedAttention`), head splits whose gradient is one buffer, the tied-embedding gradient, dropout + relu; and the
guards of the private torch ops they use: each public fallback gives the private op's numbers. The Reformer's kernels:
tests/test_lsh_kernels.py; the dense products and decoding forms: tests/test_dense.py, tests/test_t5_decoding.py."""

from __future__ import annotations

import pytest
import torch

import models
import models.fast.t5 as fast_t5
from models import settings
from models.fast import attention, private, products
from models.fast.attention import BiasedAttention, split_heads
from models.fast.lsh import SharedQKScores
from models.fast.tied import dropped_relu_
from models.layers import drop_mask
from models.t5 import T5Config, T5Model
from tests.kernel_setting import computing


@pytest.fixture(autouse=True)
def _fast_paths():
    with computing(paths="fast"):
        yield


def tiny(**kw) -> T5Config:
    base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Config(**{**base, **kw})


def _plain_attention(q, k, v, bias, hidden, drop=None, scale=1.0):
    scores = (q @ k.transpose(-1, -2) + bias).masked_fill(hidden, torch.finfo(q.dtype).min)
    probs = scores.softmax(-1)
    if drop is not None:
        probs = probs.masked_fill(drop, 0.0) * scale
    return probs @ v


@pytest.mark.parametrize("per_item", [False, True], ids=["matmul", "bmm-per-item-on-strided-heads"])
@pytest.mark.parametrize("full_row", [False, True], ids=["padding", "a-row-all-hidden"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_biased_attention_matches_autograd(p, full_row, per_item, monkeypatch):
    """Against autograd on plain ops; q, k, v are head views of one projection, (B, L, 3, H, Dk) memory, as the
    model's are. `per_item`: the products go through `_bmm`'s per-item bmm on the strided heads (the path above
    `_IN_PLACE_WORK`, T5-small and up), else through matmul (the tiny shapes here)."""
    monkeypatch.setattr(attention, "_IN_PLACE_WORK", 0 if per_item else 2**20)
    torch.manual_seed(0)
    B, H, Lq, Lk, Dk = 3, 4, 6, 7, 5
    packed = torch.randn(B, Lk, 3, H, Dk, dtype=torch.float64, requires_grad=True)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    q = q[:, :, :Lq]
    bias = torch.randn(1, H, Lq, Lk, dtype=torch.float64, requires_grad=True)
    hidden = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    hidden[1, :, :, 5:] = True  # padded keys
    hidden[2] = torch.ones(Lq, Lk).triu(1).bool()  # a causal row pattern
    if full_row:  # uniform softmax there: its gradient must still not reach the hidden keys' bias
        hidden[0, :, 3] = True
    grad = torch.randn(B, H, Lq, Dk, dtype=torch.float64)
    torch.manual_seed(1)
    drop, scale = drop_mask(torch.empty(B, H, Lq, Lk, dtype=torch.float64), p) if p else (None, 1.0)
    want = _plain_attention(q, k, v, bias, hidden, drop, scale)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), grad)
    torch.manual_seed(1)  # the same dropout mask inside
    got = BiasedAttention.apply(q, k, v, bias, hidden, p)
    got_grads = torch.autograd.grad(got, (q, k, v, bias), grad)
    assert torch.allclose(got, want, atol=1e-12)
    assert got.transpose(1, 2).is_contiguous()  # (B, Lq, H, Dk) memory: the output projection reads it as is
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, atol=1e-12)


@pytest.mark.parametrize("per_item", [False, True], ids=["matmul", "bmm-per-item-on-strided-heads"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_split_heads_gradient_is_the_attention_buffer_with_no_copy(p, per_item, monkeypatch):
    """q, k, v from `split_heads` of one packed projection: BiasedAttention writes their gradients into one
    (B, L, 3 * H * Dk) buffer, which is the projection's gradient as is (no stack, cat or reshape copy), and equals
    autograd's through view / permute / unbind; cross-attention's k, v (two slots) and q (one) likewise. Gradients of
    another layout, or a slot without gradient, take the copying path and are still right."""
    from torch.profiler import profile

    monkeypatch.setattr(attention, "_IN_PLACE_WORK", 0 if per_item else 2**20)
    torch.manual_seed(0)
    B, L, S, H, Dk = 3, 6, 7, 4, 5
    x = torch.randn(B, L, 3 * H * Dk, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(B, S, 2 * H * Dk, dtype=torch.float64, requires_grad=True)
    xq = torch.randn(B, L, H * Dk, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, H, L, L, dtype=torch.float64)
    grad, grad2 = torch.randn(B, H, L, Dk, dtype=torch.float64), torch.randn(B, H, L, Dk, dtype=torch.float64)

    def plain(t, n):
        return t.view(B, t.shape[1], n, H, Dk).permute(2, 0, 3, 1, 4).unbind(0)

    def run(split):
        torch.manual_seed(1)
        q, k, v = split(x, 3)
        out = BiasedAttention.apply(q, k, v, bias, None, p)
        (cq,), (ck, cv) = split(xq, 1), split(mem, 2)
        cross = BiasedAttention.apply(cq, ck, cv, None, None, p)
        return torch.autograd.grad((out, cross), (x, mem, xq), (grad, grad2))

    want = run(plain)
    tiled, calls = attention._tiled, []
    monkeypatch.setattr(attention, "_tiled", lambda *a: calls.append(tiled(*a)) or calls[-1])
    with profile(record_shapes=True) as prof:
        got = run(lambda t, n: split_heads(t, n, H))
    # two shared buffers (q, k, v; the cross k, v), then three projections whose gradient is passed on as is
    assert len(calls) == 5 and all(c is not None for c in calls)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-12)
    packed_shapes = ([B, L, 3 * H * Dk], [B, S, 2 * H * Dk], [3, B, H, L, Dk], [2, B, H, S, Dk])
    copies = [e for e in prof.events() if e.name in ("aten::stack", "aten::cat", "aten::clone", "aten::_unsafe_view")]
    assert not [e for e in copies if any(list(s) in packed_shapes for s in e.input_shapes if s)], copies

    # the copying path: grads from plain ops (another layout) and a slot that gets none
    q, k, v = split_heads(x, 3, H)
    (g,) = torch.autograd.grad((q * 2).sum() + (v.exp()).sum(), x)
    q0, k0, v0 = plain(x, 3)
    (w,) = torch.autograd.grad((q0 * 2).sum() + (v0.exp()).sum(), x)
    assert torch.equal(g, w) and g.is_contiguous()


@pytest.mark.parametrize("layout", ["encoder_decoder", "causal_lm", "prefix_lm"])
def test_tied_embedding_gradient_is_one_dense_tensor_equal_to_plain_autograd(layout, monkeypatch):
    """Tied weights (v1.0): the lookups' rows are added into the projection's gradient in place (`models.fast.tied`).
    Every gradient equals plain autograd's (nn.Embedding + F.linear), also when a second backward accumulates;
    `.grad` is dense and contiguous; and the backward builds no other (V, D) tensor: no dense embedding backward
    and no (V, D) addition (what cost ~120 ms of a T5-small step)."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = T5Model(tiny(layout=layout, vocab_size=96)).train()
    x, y = torch.randint(0, 96, (2, 11)), torch.randint(0, 96, (2, 5))
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    kw = {"prefix_lengths": torch.tensor([3, 6])} if layout == "prefix_lm" else {}
    args = (x, mask, y) if layout == "encoder_decoder" else (x, mask)

    def grads(runs: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for i in range(runs):
            logits = model(*args, **kw)
            (logits.square().mean() * (i + 1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    with profile(record_shapes=True) as prof:
        grads(1)
    first_inputs = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::add", "aten::add_", "aten::fill_")]
    assert [96, 32] not in first_inputs, "a (V, D) tensor was zeroed or added"
    lookups = [e for e in prof.events() if e.name == "aten::embedding_dense_backward"]
    assert not [e for e in lookups if e.input_shapes[0][-1] == 32], "a dense token-embedding backward"  # D = 32
    assert lookups, "the position-bias tables (4 heads) still take the dense backward"
    weight = model.shared.weight
    assert weight.grad.layout == torch.strided and weight.grad.is_contiguous()
    tied = grads(2)
    monkeypatch.setattr(fast_t5, "tie", lambda weight: None)  # the plain path: nn.Embedding + F.linear
    plain = grads(2)
    for name, g in plain.items():
        assert torch.allclose(tied[name], g, atol=1e-6), name
    assert tied["shared.weight"].abs().sum() > 0


def test_dropped_relu_matches_autograd():
    """The feed-forward's dropout + relu with a one-pass backward gives autograd's value and gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    drop, _ = drop_mask(x, 0.3)
    assert drop.any() and not drop.all()
    grad = torch.randn(4, 7, 16, dtype=torch.float64)
    want = x.clone().masked_fill(drop, 0.0).relu()
    got = dropped_relu_(x.clone(), drop)
    assert torch.equal(got, want)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    (got_grad,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got_grad, want_grad)
    assert (got_grad[drop] == 0).all() and (got_grad[~drop & (x > 0)] != 0).all()


def test_tied_embedding_gradient_under_autocast_matches_plain_autograd(monkeypatch):
    """bf16 autocast (the GPU script's precision; CPU autocast here): the tied path's backward runs its products in
    the forward's dtype and returns float32 gradients, as autograd through autocast's casts does."""
    torch.manual_seed(0)
    model = T5Model(tiny(vocab_size=96)).train()
    x, y = torch.randint(0, 96, (2, 11)), torch.randint(0, 96, (2, 5))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x, torch.ones_like(x), y)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    tied = grads()
    assert {g.dtype for g in tied.values()} == {torch.float32}
    monkeypatch.setattr(fast_t5, "tie", lambda weight: None)
    plain = grads()
    for name, g in plain.items():
        assert torch.allclose(tied[name], g, rtol=2e-2, atol=1e-4), name


# ---- the private ops' guards ----


def test_each_private_op_is_taken_where_this_torch_has_it():
    """The guards' probes accept the private ops of this torch build (a probe that failed for another reason would
    silently move the speed paths to the slower fallbacks)."""
    assert private.fused_softmax_backward() == hasattr(torch, "_softmax_backward_data")
    assert private.threshold_backward() == hasattr(torch.ops.aten, "threshold_backward")
    ops = torch.ops.mkldnn
    present = torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )
    assert models.onednn_available() == present


@pytest.mark.parametrize("fused", [True, False], ids=["private", "public-fallback"])
def test_softmax_backward_fallback_gives_the_private_ops_gradients(fused, monkeypatch):
    """`BiasedAttention` and `SharedQKScores` differentiate softmax with torch's fused private kernel or the formula
    in public ops: the same gradients (float64: to 1e-12)."""
    monkeypatch.setattr(private, "FUSED_SOFTMAX_BACKWARD", fused and private.fused_softmax_backward())
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    hidden = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    hidden[1, ..., 3:] = True
    grad = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    got = torch.autograd.grad(BiasedAttention.apply(q, k, v, bias, hidden, 0.0), (q, k, v, bias), grad)
    want = torch.autograd.grad(_plain_attention(q, k, v, bias, hidden), (q, k, v, bias), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    own = torch.eye(5, dtype=torch.bool).expand(2, 3, 5, 5)
    probs, lse = SharedQKScores.apply(q, k, None, own)
    got = torch.autograd.grad((probs * q.sum(-1, keepdim=True)).sum() + lse.sum(), (q, k))
    dots = (q @ k.transpose(-1, -2)).masked_fill(own, -1e5)
    want = torch.autograd.grad((dots.softmax(-1) * q.sum(-1, keepdim=True)).sum() + dots.logsumexp(-1).sum(), (q, k))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_relu_backward_fallback_is_exactly_the_private_op(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16, requires_grad=True)
    drop, _ = drop_mask(x, 0.3)
    grad = torch.randn(4, 7, 16)
    grads = []
    for flag in (private.threshold_backward(), False):
        monkeypatch.setattr(private, "THRESHOLD_BACKWARD", flag)
        grads.append(torch.autograd.grad(dropped_relu_(x.clone(), drop), x, grad)[0])
    assert torch.equal(grads[0], grads[1])


def test_without_the_onednn_ops_nothing_asks_for_them(monkeypatch):
    """Where torch lacks oneDNN's linear (the guard says so): the kernel cannot be chosen (a clear error), `auto`
    resolves to the BLAS even on AMD, decoding never picks the packed form, and shaped decoding still generates what
    plain decoding does."""
    for module in (settings, products, models):
        monkeypatch.setattr(module, "onednn_available", lambda: False)
    monkeypatch.setattr(settings, "processor_vendor", lambda: "AuthenticAMD")
    with pytest.raises(ValueError, match="no oneDNN linear"):
        models.set_cpu_kernels("onednn", "plain", "fast")
    assert models.set_cpu_kernels("auto", "shaped", "fast").matmul == "blas"
    shapes = [(rows, out, 512) for rows in (1, 4, 32, 128) for out in (512, 1536, 32128)]
    assert {products.decoding_form(*shape, torch.float32) for shape in shapes} == {"linear", "right"}
    torch.manual_seed(0)
    model = T5Model(tiny(vocab_size=512)).eval()
    ids = torch.randint(2, 512, (4, 9))
    with torch.no_grad():
        shaped = model.generate(ids, max_new_tokens=5, num_beams=2, eos_token_id=-1)
        models.set_cpu_kernels("blas", "plain", "fast")
        assert torch.equal(model.generate(ids, max_new_tokens=5, num_beams=2, eos_token_id=-1), shaped)
