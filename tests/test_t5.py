"""Our T5 on tiny configs: config handling, masking, layouts, counts, checkpointing, torch.compile. The reference
path (the model file as written) unless a test says otherwise; the speed paths against it: tests/test_fast_t5.py."""

from __future__ import annotations

import math

import pytest
import torch

from models.t5 import PRESETS, T5Config, T5Model, relative_position_bucket
from tests.kernel_setting import computing


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


@pytest.mark.parametrize("paths", ["reference", "fast"])
def test_gradient_checkpointing_same_gradients(paths):
    with computing(paths=paths):
        _checkpointing_same_gradients()


def _checkpointing_same_gradients():
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
@pytest.mark.parametrize("paths", ["reference", "fast"])
def test_compiled_training_step_has_no_graph_breaks(paths):
    with computing(paths=paths):
        _compiled_step_has_no_graph_breaks()


def _compiled_step_has_no_graph_breaks():
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


@pytest.mark.slow
@pytest.mark.parametrize("paths", ["reference", "fast"])
def test_compiled_training_step_with_dropout_has_no_graph_breaks(paths):
    with computing(paths=paths):
        _compiled_step_with_dropout_has_no_graph_breaks()


def _compiled_step_with_dropout_has_no_graph_breaks():
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
