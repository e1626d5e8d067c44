"""Our T5 on tiny configs: config handling, masking, layouts, counts, checkpointing, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from models.t5 import PRESETS, T5Config, T5Model, relative_position_bucket


def tiny(**kw) -> T5Config:
    base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Config(**{**base, **kw})


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_load_and_round_trip(name):
    config = T5Config.from_preset(name, vocab_size=512)
    assert T5Config.from_dict(config.to_dict()) == config
    assert config.num_decoder_layers is not None


def test_paper_sizes():
    # non-embedding counts don't depend on vocab; the paper's ~60M / ~220M include the 32128-token embedding
    for name, expected in (("small", 60e6), ("base", 220e6)):
        model = T5Model(T5Config.from_preset(name))
        assert abs(model.num_parameters() - expected) / expected < 0.05, name


def test_config_rejects_unknown_and_impossible():
    with pytest.raises(ValueError, match="bogus"):
        T5Config.from_dict({**tiny().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="layout"):
        tiny(layout="sideways")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        tiny(feed_forward_proj="swish")
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny(pad_token_id=64)


def test_buckets_bidirectional_and_causal():
    rel = torch.arange(-300, 301)
    bi = relative_position_bucket(rel, True, 32, 128)
    causal = relative_position_bucket(rel, False, 32, 128)
    assert bi.min() >= 0 and bi.max() == 31 and causal.max() == 31
    assert (causal[rel >= 0] == 0).all()  # future keys all share bucket 0 in the causal case
    assert torch.equal(bi[rel.abs() < 8], torch.where(rel[rel.abs() < 8] > 0, 16, 0) + rel[rel.abs() < 8].abs())
    assert (bi[rel >= 128] == 31).all() and (bi[rel <= -128] == 15).all()
    assert (torch.diff(causal[rel <= 0].flip(0)) >= 0).all()  # monotone in distance


def test_forward_shapes_and_backward():
    model = T5Model(tiny(num_decoder_layers=3, dropout_rate=0.1)).train()
    x, y = torch.randint(0, 64, (2, 11)), torch.randint(0, 64, (2, 5))
    logits = model(x, torch.ones_like(x), y)
    assert logits.shape == (2, 5, 64)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_padding_is_ignored():
    model = T5Model(tiny()).eval()
    x, y = torch.randint(2, 64, (1, 9)), torch.randint(2, 64, (1, 4))
    padded = torch.cat([x, torch.randint(2, 64, (1, 3))], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(model(x, None, y), model(padded, mask, y), atol=1e-5)


def test_decoder_is_causal():
    model = T5Model(tiny()).eval()
    x, y = torch.randint(2, 64, (1, 7)), torch.randint(2, 64, (1, 6))
    y2 = y.clone()
    y2[0, 4] = (y[0, 4] + 1) % 64
    with torch.no_grad():
        a, b = model(x, None, y), model(x, None, y2)
    assert torch.allclose(a[:, :4], b[:, :4]) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_causal_lm_masking():
    model = T5Model(tiny(layout="causal_lm")).eval()
    x = torch.randint(2, 64, (1, 10))
    x2 = x.clone()
    x2[0, 6] = (x[0, 6] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert a.shape == (1, 10, 64)
    assert torch.allclose(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])
    with pytest.raises(ValueError):
        model(x, decoder_input_ids=x)


def test_prefix_lm_masking():
    model = T5Model(tiny(layout="prefix_lm")).eval()
    x = torch.randint(2, 64, (1, 10))
    prefix = torch.tensor([5])
    inside, after = x.clone(), x.clone()
    inside[0, 3] = (x[0, 3] + 1) % 64  # within the prefix: every prefix position sees it
    after[0, 7] = (x[0, 7] + 1) % 64  # after the prefix: only later positions see it
    with torch.no_grad():
        base, a, b = (
            model(x, prefix_lengths=prefix),
            model(inside, prefix_lengths=prefix),
            model(after, prefix_lengths=prefix),
        )
    assert not torch.allclose(base[:, :3], a[:, :3])  # earlier prefix positions changed: bidirectional
    assert torch.allclose(base[:, :7], b[:, :7]) and not torch.allclose(base[:, 7:], b[:, 7:])
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(x)


def test_tied_output_rescale():
    model = T5Model(tiny()).eval()
    h = torch.randn(2, 3, 32)
    assert torch.allclose(model.logits(h), h @ model.shared.weight.T / math.sqrt(32), atol=1e-6)
    untied = T5Model(tiny(tie_word_embeddings=False, feed_forward_proj="gated-gelu"))
    assert torch.allclose(untied.logits(h), h @ untied.lm_head.weight.T, atol=1e-6)


def test_position_bias_shared_by_layers():
    model = T5Model(tiny(num_layers=3))
    owners = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert owners == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ]


def test_num_parameters_against_numel():
    for kw in (dict(), dict(tie_word_embeddings=False, feed_forward_proj="gated-gelu"), dict(layout="causal_lm")):
        model = T5Model(tiny(**kw))
        total = sum(p.numel() for p in model.parameters())
        assert model.num_parameters() == total
        embedding = model.shared.weight.numel() + (0 if model.config.tie_word_embeddings else 64 * 32)
        bias = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("relative_attention_bias"))
        assert model.num_parameters(non_embedding=True) == total - embedding - bias


def test_training_flops_against_6nd():
    c = tiny(num_decoder_layers=2)
    model = T5Model(c)
    B, L = 4, 16
    non_embedding = model.num_parameters(non_embedding=True)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    n_matmul = non_embedding - norms + c.d_model * c.vocab_size  # weights used in matmuls, output head included
    inner = c.num_heads * c.d_kv
    attention = 3 * 4 * B * L * L * inner * (c.num_layers + 2 * c.num_decoder_layers)  # enc self, dec self + cross
    assert model.training_flops(B, L, L) == pytest.approx(6 * n_matmul * B * L + attention, rel=1e-9)
    lm = T5Model(tiny(layout="causal_lm"))
    n_lm = lm.num_parameters(non_embedding=True) - sum(p.numel() for n, p in lm.named_parameters() if "norm" in n)
    expected = 6 * (n_lm + 32 * 64) * B * L + 12 * B * L * L * inner * 2
    assert lm.training_flops(B, L) == pytest.approx(expected, rel=1e-9)


def test_init_stds_follow_reference():
    c = T5Config.from_preset("tiny", vocab_size=4096)
    model = T5Model(c)
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert attn.q.weight.std().item() == pytest.approx((c.d_model * c.d_kv) ** -0.5, rel=0.1)
    assert attn.k.weight.std().item() == pytest.approx(c.d_model**-0.5, rel=0.1)
    assert model.shared.weight.std().item() == pytest.approx(1.0, rel=0.05)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.std().item() == pytest.approx(c.d_ff**-0.5, rel=0.1)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = T5Model(tiny()).train()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    model(x, None, y).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.config.gradient_checkpointing = True
    model(x, None, y).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


@pytest.mark.parametrize("backend", ["eager"])
def test_backends_agree(backend):
    torch.manual_seed(0)
    model = T5Model(tiny()).eval()
    other = T5Model(tiny(attention_backend=backend)).eval()
    other.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.allclose(model(x, mask, y), other(x, mask, y), atol=1e-5)


def test_tiny_preset_learns():
    torch.manual_seed(0)
    model = T5Model(T5Config.from_preset("tiny", vocab_size=256, dropout_rate=0.0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(2, 256, (8, 32))
    y = x[:, :8]  # copy task
    dec_in = torch.cat([torch.zeros(8, 1, dtype=torch.long), y[:, :-1]], dim=1)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x, None, dec_in).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_compiled_training_step_has_no_graph_breaks():
    torch.manual_seed(0)
    model = T5Model(tiny(feed_forward_proj="gated-gelu", tie_word_embeddings=False)).train()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0

    def loss_fn(x, mask, y):
        logits = model(x, mask, y)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    eager = loss_fn(x, mask, y)
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # fullgraph=True raises on any graph break; AOTAutograd traces the backward of the same graph
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, mask, y)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, eager_grads[n], atol=1e-5), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path runs on CUDA")
def test_flex_backend_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    model = T5Model(tiny()).cuda().eval()
    flex = T5Model(tiny(attention_backend="flex")).cuda().eval()
    flex.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 64, (2, 9), device="cuda"), torch.randint(0, 64, (2, 5), device="cuda")
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.allclose(model(x, mask, y), flex(x, mask, y), atol=1e-4)


def test_drop_mask_rate_lanes_and_rescale():
    from models.common import drop_mask, dropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1024)
    drop, scale = drop_mask(x, 0.1)
    assert drop.dtype == torch.bool and drop.shape == x.shape
    p = round(0.1 * 2**16) / 2**16  # the rounded rate the rescale is computed from
    assert scale == pytest.approx(1 / (1 - p))
    lanes = drop.view(-1, 4).float().mean(0)  # each of the four 16-bit lanes of a draw is unbiased
    assert (lanes - p).abs().max().item() < 0.003
    assert not torch.equal(drop, drop_mask(x, 0.1)[0])  # fresh randomness per call
    y = dropout(x, 0.1, training=True)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    values = y.unique()
    assert values.numel() == 2 and values[0] == 0.0 and values[1].item() == pytest.approx(scale)
    assert dropout(x, 0.1, training=False) is x


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
    import models.common
    from models.common import BiasedAttention, drop_mask

    monkeypatch.setattr(models.common, "_IN_PLACE_WORK", 0 if per_item else 2**20)
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

    import models.common
    from models.common import BiasedAttention, split_heads

    monkeypatch.setattr(models.common, "_IN_PLACE_WORK", 0 if per_item else 2**20)
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
    tiled, calls = models.common._tiled, []
    monkeypatch.setattr(models.common, "_tiled", lambda *a: calls.append(tiled(*a)) or calls[-1])
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


def test_kv_cache_grows_in_place_and_reorders():
    from models.common import KVCache

    cache, ks = KVCache(), []
    for t in (5, 1, 60, 1, 70):  # crosses the first capacity (64) and a doubling
        k = torch.randn(3, 2, t, 4)
        ks.append(k)
        got_k, got_v = cache.append(k, -k)
        assert torch.equal(got_k, torch.cat(ks, dim=2)) and torch.equal(got_v, -torch.cat(ks, dim=2))
    assert cache.k.shape[2] >= cache.length == 137
    buffer = cache.k
    cache.append(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    assert cache.k is buffer  # room left: written in place, no new tensor
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k[:, :, :137], torch.cat(ks, dim=2)[[2, 2, 0]])


@pytest.mark.slow
def test_compiled_training_step_with_dropout_has_no_graph_breaks():
    torch.manual_seed(0)
    model = T5Model(tiny(dropout_rate=0.1, num_layers=1)).train()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0

    def loss_fn(x, mask, y):
        return torch.nn.functional.cross_entropy(model(x, mask, y).flatten(0, 1), y.flatten())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # raises on a graph break
    loss = compiled(x, mask, y)
    loss.backward()
    assert math.isfinite(loss.item()) and compiled(x, mask, y).item() != loss.item()  # dropout is live
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("layout", ["encoder_decoder", "causal_lm", "prefix_lm"])
def test_tied_embedding_gradient_is_one_dense_tensor_equal_to_plain_autograd(layout, monkeypatch):
    """Tied weights (v1.0): the lookups' rows are added into the projection's gradient in place (`TiedEmbedding`).
    Every gradient equals plain autograd's (nn.Embedding + F.linear), also when a second backward accumulates;
    `.grad` is dense and contiguous; and the backward builds no other (V, D) tensor: no dense embedding backward
    and no (V, D) addition (what cost ~120 ms of a T5-small step)."""
    from torch.profiler import profile

    from models.common import TiedEmbedding

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
    monkeypatch.setattr(TiedEmbedding, "tie", lambda self: None)  # the plain path: nn.Embedding + F.linear
    plain = grads(2)
    for name, g in plain.items():
        assert torch.allclose(tied[name], g, atol=1e-6), name
    assert tied["shared.weight"].abs().sum() > 0


def test_dropped_relu_matches_autograd():
    """The feed-forward's dropout + relu with a one-pass backward gives autograd's value and gradient."""
    from models.common import drop_mask, dropped_relu_

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
    from models.common import TiedEmbedding

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
    monkeypatch.setattr(TiedEmbedding, "tie", lambda self: None)
    plain = grads()
    for name, g in plain.items():
        assert torch.allclose(tied[name], g, rtol=2e-2, atol=1e-4), name
