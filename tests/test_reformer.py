"""Our Reformer (models/reformer.py): config, attention mechanisms, layouts, generation, sizes."""

import math
from types import SimpleNamespace

import pytest
import torch

from models.reformer import (
    PRESETS,
    LocalSelfAttention,
    LSHSelfAttention,
    ReformerConfig,
    ReformerModel,
)

SMALL = dict(
    vocab_size=40,
    d_model=32,
    d_kv=8,
    num_heads=2,
    d_ff=48,
    lsh_chunk_length=8,
    local_chunk_length=8,
    axial_pos_shape=[8, 8],
    axial_pos_dims=[16, 16],
    dropout_rate=0.0,
)


def _config(**overrides) -> ReformerConfig:
    return ReformerConfig(**{**SMALL, **overrides})


# ---------------------------------------------------------------- config


def test_presets_roundtrip_through_dict():
    for name in PRESETS:
        config = ReformerConfig.from_preset(name, n_hashes=8)
        assert config.n_hashes == 8
        d = config.to_dict()
        assert ReformerConfig.from_dict(d) == config
        assert all(not isinstance(v, tuple) for v in d.values())


def test_unknown_keys_and_bad_values_are_reported():
    with pytest.raises(ValueError, match="bogus.*hashes_n"):
        ReformerConfig.from_dict({"bogus": 1, "hashes_n": 2})
    with pytest.raises(ValueError, match="unknown Reformer preset"):
        ReformerConfig.from_preset("huge")
    with pytest.raises(ValueError) as err:
        _config(attn_layers=["lsh", "full"], n_buckets=3, axial_pos_dims=[16, 8], layout="seq2seq")
    for fragment in ("attn_layers", "n_buckets", "axial_pos_dims", "layout"):
        assert fragment in str(err.value)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        _config(tie_word_embeddings=True)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
@pytest.mark.parametrize("layout", ["encoder_decoder", "causal_lm"])
def test_presets_match_t5_non_embedding_size(name, layout):
    t5 = pytest.importorskip("models.t5")
    with torch.device("meta"):
        ours = ReformerModel(ReformerConfig.from_preset(name, layout=layout)).num_parameters(non_embedding=True)
        theirs = t5.T5Model(t5.T5Config.from_preset(name, layout=layout)).num_parameters(non_embedding=True)
    assert abs(ours / theirs - 1) < 0.10, (ours, theirs)


def test_num_parameters_and_flops():
    model = ReformerModel(_config(layout="encoder_decoder"))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embeddings.", "lm_head.")))
    assert model.num_parameters() == total
    assert model.num_parameters(non_embedding=True) == total - embedding
    # chunked attention: cost per token is flat in length once the sequence exceeds the chunks
    model = ReformerModel(_config(layout="causal_lm"))
    per_token = [model.training_flops(2, n) / n for n in (64, 128, 256)]
    assert per_token[0] == pytest.approx(per_token[2])
    full = ReformerModel(_config(layout="causal_lm", use_full_attention=True, attn_layers=["lsh"]))
    assert full.training_flops(1, 256) / 256 > full.training_flops(1, 64) / 64


# ---------------------------------------------------------------- attention


def _lsh(causal=True, **overrides) -> LSHSelfAttention:
    torch.manual_seed(0)
    return LSHSelfAttention(_config(**overrides), causal=causal, num_chunks_after=0).eval()


def test_full_attention_switch_equals_plain_causal_attention():
    attn = _lsh(use_full_attention=True)
    hidden = torch.randn(2, 40, 32)
    with torch.no_grad():
        got = attn(hidden)
        qk = attn.query_key(hidden).view(2, 40, 2, 8).transpose(1, 2)
        v = attn.value(hidden).view(2, 40, 2, 8).transpose(1, 2)
        k = qk / qk.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() / math.sqrt(8)
        scores = qk @ k.transpose(-1, -2)
        banned = torch.ones(40, 40, dtype=torch.bool).triu(0)  # the future and oneself ...
        banned[0, 0] = False  # ... unless nothing else is visible
        expected = (scores.masked_fill(banned, float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_lsh_approaches_full_attention_as_rounds_grow():
    hidden = torch.randn(2, 64, 32)
    full = _lsh(use_full_attention=True)
    with torch.no_grad():
        reference = full(hidden)
    errors = []
    for n_hashes in (1, 2, 4, 8, 16):
        total = 0.0
        for seed in range(4):
            attn = _lsh(n_hashes=n_hashes, hash_seed=seed, n_buckets=8)
            attn.load_state_dict(full.state_dict())
            with torch.no_grad():
                total += ((attn(hidden) - reference).norm() / reference.norm()).item()
        errors.append(total / 4)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("kind", ["lsh", "local"])
def test_causal_and_padding_masks_block_gradients(kind):
    """Outputs before position t never depend on positions >= t, nor on padded positions."""
    torch.manual_seed(0)
    cls = LSHSelfAttention if kind == "lsh" else LocalSelfAttention
    attn = cls(_config(n_hashes=3, hash_seed=1), causal=True, num_chunks_after=0)
    hidden = torch.randn(2, 48, 32, requires_grad=True)
    attn(hidden)[:, :20].sum().backward()
    assert hidden.grad[:, 20:].abs().max() == 0
    assert hidden.grad[:, :20].abs().min() > 0 or hidden.grad[:, :20].abs().sum() > 0
    # bidirectional with padding: real positions must not read padded ones
    attn = cls(_config(n_hashes=2, hash_seed=1), causal=False, num_chunks_after=1)
    hidden = torch.randn(2, 48, 32, requires_grad=True)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, 30:] = False
    attn(hidden, mask)[0, :30].sum().backward()
    assert hidden.grad[0, 30:].abs().max() == 0
    assert hidden.grad[0, 40].abs().sum() == 0 and hidden.grad[0, 25].abs().sum() > 0


def test_hashing_buckets_seed_and_training_redraw():
    attn = _lsh(n_hashes=3, hash_seed=4)
    vectors = torch.randn(2, 2, 64, 8)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 50:] = False
    buckets = attn.hash(vectors, 8, mask).view(2, 2, 3, 64)
    for r in range(3):  # rounds occupy disjoint id ranges, padding its own bucket (id 8 of 0..8)
        local = buckets[:, :, r] - r * 9
        assert local.min() >= 0 and local.max() <= 8
        assert bool((local[1, :, 50:] == 8).all()) and bool((local[0] < 8).all())
    assert torch.equal(buckets, attn.hash(vectors, 8, mask).view(2, 2, 3, 64))  # same seed, same buckets
    # seeded: the same output every call; unseeded in training: a fresh draw every forward
    hidden = torch.randn(1, 64, 32)
    with torch.no_grad():
        assert torch.equal(attn(hidden), attn(hidden))
        attn = _lsh(n_hashes=1, hash_seed=None, n_buckets=8).train()
        assert not torch.equal(attn(hidden), attn(hidden))


def test_n_buckets_derived_from_length():
    attn = _lsh(lsh_chunk_length=8, max_position_embeddings=4096, axial_pos_shape=None, axial_pos_dims=None)
    for length in (64, 100, 512, 1 << 16):
        n = attn.n_buckets(length)  # about two buckets per chunk, a power of two
        assert math.prod([n] if isinstance(n, int) else n) == 2 ** int(math.log2(2 * length // 8))
        # many buckets are factorised (fewer rotations to draw); the limit follows transformers
        assert isinstance(n, list) == (2 * length // 8 > 2 * max(int(math.sqrt(4096 // 8)), 8))


def test_local_attention_sees_configured_chunks():
    torch.manual_seed(0)
    attn = LocalSelfAttention(_config(local_num_chunks_before=2), causal=True, num_chunks_after=0)
    hidden = torch.randn(1, 64, 32, requires_grad=True)
    attn(hidden)[0, 40].sum().backward()  # chunk 5 (40..47) sees chunks 3 and 4 (24..39), and itself up to 40
    reached = hidden.grad[0].abs().sum(-1) > 0
    assert reached[24:41].all() and not reached[:24].any() and not reached[41:].any()


# ---------------------------------------------------------------- model


def test_axial_positions():
    model = ReformerModel(_config(layout="causal_lm"))
    table = model.embeddings.position_embeddings(50)
    w0, w1 = model.embeddings.position_embeddings.weights
    for p in (0, 7, 8, 49):
        torch.testing.assert_close(table[p], torch.cat([w0[p // 8, 0], w1[0, p % 8]]))
    with pytest.raises(ValueError, match="axial position grid"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_positions_do_not_drown_the_tokens(name):
    """At initialisation two different tokens at one position must embed differently: with transformers' axial
    std 1.0 against word embeddings of std 0.02 they were nearly the same vector (cosine ~1), and a tiny model
    never learned which digits its input held (`sort` exact match 0.005)."""
    from models.reformer import ReformerEmbeddings

    torch.manual_seed(0)
    config = ReformerConfig.from_preset(name, vocab_size=64)
    embeddings = ReformerEmbeddings(config).eval()
    holder = SimpleNamespace(config=config)  # the model's own initialisation, without building the whole model
    for module in embeddings.modules():
        ReformerModel._init_weights(holder, module)
    with torch.no_grad():
        table = embeddings(torch.arange(2, 34).view(32, 1))[:, 0]  # 32 different tokens at position 0
    cosine = torch.nn.functional.normalize(table, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    off_diagonal = cosine[~torch.eye(32, dtype=torch.bool)]
    assert off_diagonal.mean() < 0.8, f"{name}: tokens at one position have mean cosine {off_diagonal.mean():.3f}"


@pytest.mark.parametrize("layout", ["causal_lm", "encoder_decoder"])
def test_forward_backward_shapes(layout):
    model = ReformerModel(_config(layout=layout, attn_layers=["local", "lsh"], dropout_rate=0.1)).train()
    ids = torch.randint(0, 40, (3, 37))
    if layout == "causal_lm":
        logits = model(ids)
        assert logits.shape == (3, 37, 40)
        with pytest.raises(ValueError):
            model(ids, decoder_input_ids=ids)
    else:
        logits = model(ids, decoder_input_ids=ids[:, :11])
        assert logits.shape == (3, 11, 40)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_chunked_feed_forward_and_head_change_nothing():
    torch.manual_seed(0)
    plain = ReformerModel(_config(layout="causal_lm", hash_seed=0)).eval()
    chunked = ReformerModel(_config(layout="causal_lm", hash_seed=0, ff_chunk_size=5, lm_head_chunk_size=7)).eval()
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(chunked(ids), plain(ids), rtol=0, atol=1e-6)


def test_encoder_padding_is_ignored_by_decoder():
    model = ReformerModel(_config(layout="encoder_decoder", hash_seed=0)).eval()
    ids = torch.randint(2, 40, (1, 30))
    other = ids.clone()
    other[0, 20:] = 5
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 20:] = False
    dec = torch.randint(2, 40, (1, 9))
    with torch.no_grad():
        a = model(ids, mask, dec)
        b = model(other, mask, dec)
        c = model(other, None, dec)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("layout", ["causal_lm", "encoder_decoder"])
def test_greedy_generation_equals_stepwise_argmax(layout):
    pytest.importorskip("models.generation")
    torch.manual_seed(0)
    model = ReformerModel(_config(layout=layout, hash_seed=3, n_hashes=2)).eval()
    ids = torch.randint(2, 40, (2, 12))
    out = model.generate(ids, max_new_tokens=10, eos_token_id=-1)
    seq = ids.clone() if layout == "causal_lm" else torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(10):
            logits = model(seq) if layout == "causal_lm" else model(ids, decoder_input_ids=seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    beams = model.generate(ids, max_new_tokens=5, num_beams=3, eos_token_id=-1)
    assert beams.shape == (2, seq.shape[1] - 5)


@pytest.mark.slow
def test_tiny_preset_learns():
    torch.manual_seed(0)
    model = ReformerModel(ReformerConfig.from_preset("tiny", vocab_size=64, layout="causal_lm")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(128).remainder(16).add(2).repeat(1, 1)  # a periodic sequence: learnable in a few steps
    losses = []
    for _ in range(15):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_reversible_backward_reuses_the_lsh_sort():
    """The recomputing backward takes the sort order kept by the forward instead of hashing again."""
    model = ReformerModel(_config(layout="causal_lm", attn_layers=["lsh", "lsh"], hash_seed=None)).train()
    calls = []
    for layer in model.decoder.layers:
        attn = layer.attention.self_attention
        attn.hash = lambda *a, _hash=attn.hash, **kw: calls.append(1) or _hash(*a, **kw)
    ids = torch.randint(0, 40, (2, 64))
    loss = model(ids).logsumexp(-1).mean()
    assert len(calls) == 2
    loss.backward()
    assert len(calls) == 2
    model.config.reversible = False  # an ordinary stack has nothing to recompute
    model(ids).logsumexp(-1).mean().backward()
    assert len(calls) == 4


def test_bf16_autocast_forward_backward():
    """The hand-written backward passes cope with the mixed dtypes autocast produces."""
    torch.manual_seed(0)
    model = ReformerModel(_config(layout="causal_lm", dropout_rate=0.1)).train()
    ids = torch.randint(0, 40, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
