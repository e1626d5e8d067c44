"""Our T5's incremental decoding (models/t5_decoding.py) gives what the full forward gives, on both paths; and the
fast decode step's shortcuts (models/fast/t5.py, models/fast/products.py) give what the general code gives: the
position-bias row table, the stacked q/k/v weights of inference, the weight copies of the decoding forms (current
after optimizer steps), and q in row-major order for SDPA."""

from __future__ import annotations

import copy

import pytest
import torch

import models.fast.t5 as fast_t5
from models.fast import products
from models.fast.products import linear
from models.generation import Uncached, generate
from models.layers import KVCache
from models.t5 import T5Attention, T5Config, T5Model
from tests.kernel_setting import computing


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fast():
    """The speed paths for one test (plain decoding forms unless the test asks for `shaped`)."""
    with computing(paths="fast"):
        yield


def transposed(w: torch.Tensor) -> torch.Tensor:
    """The contiguous W^T copy the "right" decoding form reads."""
    return products.copy_of((w,), "T", lambda w: w.T.contiguous())


def model_for(layout: str = "encoder_decoder", **kw) -> T5Model:
    torch.manual_seed(0)
    base = dict(vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Model(T5Config(**{**base, "layout": layout, **kw})).eval()


@pytest.mark.parametrize("layout", ["encoder_decoder", "prefix_lm"])  # unidirectional and bidirectional buckets
def test_position_bias_row_equals_the_computed_bias_across_table_growth(layout):
    stack = model_for(layout, relative_attention_max_distance=20).decoder
    rows: dict = {}
    for offset in [0, 1, 5, 63, 64, 100, 130, 300]:  # the table starts at 64 positions and doubles when outgrown
        for k_len in sorted({offset + 1, max(1, offset - 3)}):
            got = fast_t5.position_bias_row(stack, offset, k_len, rows)
            want = stack.position_bias(1, k_len, offset)
            assert got.shape == want.shape == (1, 4, 1, k_len)
            assert torch.equal(got, want), (offset, k_len)
    assert rows["capacity"] >= 301


@pytest.mark.parametrize("paths", ["reference", "fast"])
def test_decode_step_matches_the_full_forward(paths):
    """Every step's logits equal the full forward's at that position (fast: the row table past its first capacity,
    the cross-attention keys/values of the real tokens only)."""
    model = model_for()
    x = torch.randint(2, 60, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padded keys: the cross-attention must hide them at every step
    with torch.no_grad(), computing(paths=paths):
        state = model.init_decoding(x, mask, 1)
        assert state["cross_hidden"] is not None
        seq = torch.zeros(3, 1, dtype=torch.long)
        for step in range(70):  # past the table's first capacity (64)
            logits, state = model.decode_step(seq[:, -1:], state)
            if step in (0, 1, 63, 64, 69):
                full = model(x, mask, decoder_input_ids=seq)[:, -1]
                torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert ("bias_rows" in state) == (paths == "fast")
    if paths == "fast":
        assert state["bias_rows"]["capacity"] >= 70


@pytest.mark.parametrize("paths", ["reference", "fast"])
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_equals_uncached_with_padding(beams, paths):
    model = model_for()
    x = torch.randint(2, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    with computing(paths=paths):
        got = model.generate(x, mask, max_new_tokens=12, num_beams=beams, eos_token_id=-1)
        want = generate(Uncached(model), x, mask, max_new_tokens=12, num_beams=beams, eos_token_id=-1)
    assert torch.equal(got, want)


def test_stacked_qkv_follows_weight_updates_and_is_not_a_parameter(fast):
    attn = T5Attention(T5Config(vocab_size=10, d_model=16, d_kv=4, num_heads=2, d_ff=8, num_layers=1)).eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        q, k, v = attn.project_qkv(x)
        with computing(paths="reference"):
            torch.testing.assert_close(q, attn.heads(attn.q(x)))
            torch.testing.assert_close(v, attn.heads(attn.v(x)))
        attn.k.weight.mul_(2.0)  # an in-place update: the stacked copy must be rebuilt
        _, k2, _ = attn.project_qkv(x)
    torch.testing.assert_close(k2, 2 * k)
    assert not any("qkv" in name for name, _ in attn.named_parameters())
    assert not any("qkv" in name for name in attn.state_dict())
    x.requires_grad_(True)  # with autograd, gradients reach the weights through the three projections
    q, k, v = attn.project_qkv(x)
    (q.sum() + k.sum() + v.sum()).backward()
    assert all(w.weight.grad is not None for w in (attn.q, attn.k, attn.v))


@pytest.mark.parametrize("fused", [False, True])
def test_inference_after_optimizer_steps_uses_the_updated_weights(fused, fast):
    """The fused AdamW kernel updates parameters in place without bumping their version counters: copies keyed on
    the version alone (the stacked q/k/v, linear's transposed and packed forms) went stale after the first fused
    step, and every validation after the first computed with the q/k/v of the one before."""
    model = model_for()
    ids, targets = torch.randint(2, 60, (2, 7)), torch.randint(2, 60, (2, 5))
    with torch.no_grad():
        model(ids, decoder_input_ids=targets)  # builds the stacked q/k/v copies
        stale = transposed(model.shared.weight).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(ids, decoder_input_ids=targets).flatten(0, 1), targets.flatten()
        ).backward()
        opt.step()
    model.eval()
    fresh = copy.deepcopy(model)  # new storage for every weight: nothing kept from before the steps
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, decoder_input_ids=targets), fresh(ids, decoder_input_ids=targets), rtol=0, atol=0
        )
        assert torch.equal(transposed(model.shared.weight), model.shared.weight.T)
        assert not torch.equal(stale, model.shared.weight.T)


@pytest.mark.parametrize("form", products.FORMS)
def test_every_form_of_linear_is_row_major_and_equals_f_linear(form, monkeypatch):
    if form == "packed" and not products.onednn_available():
        pytest.skip("this torch has no oneDNN weight packing")
    monkeypatch.setattr(products, "decoding_form", lambda *shape: form)
    x, w = torch.randn(4, 1, 32), torch.randn(24, 32)
    with torch.no_grad(), computing(paths="fast", decoding="shaped"), products.decoding():
        out = linear(x, w)
    assert out.is_contiguous()  # SDPA's fused CPU kernel needs q, k, v row-major
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.fixture
def shaped():
    """The fast paths with `decoding="shaped"` for one test, the process's setting restored after it."""
    with computing(paths="fast", decoding="shaped"):
        yield


def test_decoding_forms_are_a_fixed_rule_of_the_shape():
    packed = "packed" if products.onednn_available() else "linear"
    vocab, qkv, wo = (32128, 512), (1536, 512), (512, 2048)
    assert products.decoding_form(1, *vocab, torch.float32) == "right"
    assert [products.decoding_form(r, *vocab, torch.float32) for r in (2, 4, 32, 128)] == [packed] * 4
    assert products.decoding_form(1, *qkv, torch.float32) == "linear"
    assert products.decoding_form(3, *qkv, torch.float32) == "linear"
    assert products.decoding_form(4, *qkv, torch.float32) == packed
    assert products.decoding_form(16, *wo, torch.float32) == "linear"  # fewer outputs than inputs: as it is
    assert products.decoding_form(16, *qkv, torch.bfloat16) == "linear"  # oneDNN's packing is for fp32 here
    # and nothing but the shape decides: the same answer however often and whenever it is asked
    assert len({products.decoding_form(8, *qkv, torch.float32) for _ in range(100)}) == 1


def test_linear_follows_the_setting_and_the_rule(monkeypatch, shaped):
    monkeypatch.setattr(products, "_COPIES", {})
    x, w = torch.randn(1, 16), torch.randn(160, 16)  # one row against a vocabulary-like weight: "right"
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), products.dense(x, w), rtol=0, atol=0)  # outside decoding: dense
        assert not products._COPIES
        with products.decoding():
            got = linear(x, w)
        assert torch.equal(got, x @ w.T.contiguous())  # the "right" form, exactly
        assert {key[1] for key in products._COPIES if key[0] == id(w)} == {"T"}
        with computing(paths="fast", decoding="plain"), products.decoding():
            assert torch.equal(linear(x, w), products.dense(x, w))  # plain: every product through dense


def test_greedy_and_beam_decoding_give_the_same_tokens_and_scores_every_time(shaped):
    """The decoding forms are fixed: re-running a generation gives identical tokens and identical logits (no
    measurement moves a shape from one form to another between calls, as the timed choice used to)."""
    torch.manual_seed(0)
    model = T5Model(T5Config.from_preset("tiny", vocab_size=256, dropout_rate=0.0)).eval()
    ids = torch.randint(2, 256, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        for beams in (1, 3):
            runs = [model.generate(ids, mask, max_new_tokens=6, num_beams=beams, eos_token_id=-1) for _ in range(5)]
            assert all(torch.equal(runs[0], r) for r in runs[1:])
        state = model.init_decoding(ids, mask, 1)
        first, _ = model.decode_step(torch.zeros(4, 1, dtype=torch.long), state)
        for _ in range(3):
            again, _ = model.decode_step(torch.zeros(4, 1, dtype=torch.long), model.init_decoding(ids, mask, 1))
            assert torch.equal(first, again)


def test_transposed_copy_follows_weight_updates():  # the copies live in models.fast.products
    w = torch.randn(8, 4)
    with torch.no_grad():
        first = transposed(w)
        assert torch.equal(first, w.T) and first.is_contiguous()
        assert transposed(w) is first  # kept between calls
        w.mul_(2.0)  # an in-place update bumps the version: rebuilt
        assert torch.equal(transposed(w), w.T)
    key = (id(w), "T")
    assert key in products._COPIES
    del w  # the copy goes with its weight
    assert key not in products._COPIES


def test_kv_cache_reorders_through_its_spare_buffers_and_keeps_appending():
    cache, want = KVCache(), torch.zeros(4, 2, 0, 5)
    indices = [[1, 1, 3, 0], [2, 0, 0, 1], [3, 2, 1, 0], [0, 0, 2, 2], [1, 3, 3, 2]]
    for t, index in zip((3, 1, 1, 70, 1), indices, strict=True):  # the fourth append grows the buffers
        k = torch.randn(4, 2, t, 5)
        cache.append(k, -k)
        before = cache.k
        cache.reorder(torch.tensor(index))
        assert cache.k is not before and cache.k.shape == before.shape  # swapped with the spare, not copied back
        want = torch.cat([want, k], dim=2)[index]  # what concatenating and selecting rows would keep
        assert torch.equal(cache.k[:, :, : cache.length], want)
        assert torch.equal(cache.v[:, :, : cache.length], -want)
