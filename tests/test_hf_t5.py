"""Parity with `transformers`' T5: logits, export round trip, local checkpoints, greedy and beam generation; the
logits, gradients and generation on both paths (the reference model file and the speed paths)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import models.fast.t5 as fast_t5  # noqa: E402
from models.hf.t5 import load_t5_checkpoint, save_t5_pretrained, t5_from_hf, t5_to_hf  # noqa: E402
from tests.kernel_setting import computing  # noqa: E402

CONFIGS = {
    "v1.0-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "odd-heads-buckets": dict(
        num_heads=5, d_kv=6, relative_attention_num_buckets=10, relative_attention_max_distance=17, num_layers=3
    ),
    "v1.1-deeper-decoder": dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3, num_heads=3, d_kv=16
    ),
}


@pytest.fixture(params=["reference", "fast"])
def paths(request):
    """The test on the reference path, then on the speed paths."""
    with computing(paths=request.param):
        yield request.param


@pytest.fixture
def fast():
    with computing(paths="fast"):
        yield


def make_reference(seed: int = 0, **kw):
    """A random-weight transformers T5 (untied lm_head drawn separately: recent versions tie at construction)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=101, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, decoder_start_token_id=0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**base, **kw}))
    if kw.get("tie_word_embeddings") is False:
        ref.lm_head.weight = torch.nn.Parameter(torch.randn(base["vocab_size"], base["d_model"]))
    return ref.eval()


def inputs(seed: int = 1, B: int = 3, S: int = 23, T: int = 9, vocab: int = 101):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, S - 5 :] = 0
    am[2, 4:] = 0
    y = torch.randint(2, vocab, (B, T), generator=g)
    dm = torch.ones(B, T, dtype=torch.long)
    dm[2, T - 3 :] = 0
    return x, am, y, dm


def ref_logits(ref, x, am, y, dm):
    with torch.no_grad():
        return ref(input_ids=x, attention_mask=am, decoder_input_ids=y, decoder_attention_mask=dm).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, paths):
    ref = make_reference(**CONFIGS[name])
    ours = t5_from_hf(ref).eval()
    assert ours.config.tie_word_embeddings == CONFIGS[name].get("tie_word_embeddings", True)
    for S, T in ((23, 9), (7, 15)):  # encoder longer, then shorter than the decoder
        x, am, y, dm = inputs(S=S, T=T)
        with torch.no_grad():
            got = ours(x, am, y, dm)
        want = ref_logits(ref, x, am, y, dm)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5


def test_untied_head_is_used():
    ref = make_reference(**CONFIGS["v1.1-gated-untied"])
    ours = t5_from_hf(ref).eval()
    assert not torch.equal(ours.lm_head.weight, ours.shared.weight)
    x, am, y, dm = inputs()
    with torch.no_grad():
        before = ours(x, am, y, dm)
        ours.lm_head.weight.mul_(2.0)
        assert not torch.allclose(ours(x, am, y, dm), before)


@pytest.mark.parametrize("name", ["v1.0-relu-tied", "v1.1-gated-untied"])
def test_export_round_trip(name, tmp_path):
    ours = t5_from_hf(make_reference(**CONFIGS[name])).eval()
    x, am, y, dm = inputs()
    with torch.no_grad():
        want = ours(x, am, y, dm)
    save_t5_pretrained(ours, tmp_path / "export")
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    assert (ref_logits(loaded, x, am, y, dm) - want).abs().max().item() <= 1e-5
    in_memory = t5_to_hf(ours).eval()
    assert (ref_logits(in_memory, x, am, y, dm) - want).abs().max().item() <= 1e-5
    back = t5_from_hf(loaded).eval()  # and back again: the same weights
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["v1.0-relu-tied", "v1.1-gated-untied"])
def test_load_local_checkpoint_and_finetune(name, tmp_path):
    ref = make_reference(**CONFIGS[name])
    ref.save_pretrained(tmp_path / "ckpt")
    ours = load_t5_checkpoint(tmp_path / "ckpt").eval()
    x, am, y, dm = inputs()
    with torch.no_grad():
        assert (ours(x, am, y, dm) - ref_logits(ref, x, am, y, dm)).abs().max().item() <= 1e-5
    ours.train()  # a fine-tuning step from the loaded weights moves the loss down
    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        logits = ours(x, am, y, dm)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_load_checkpoint_rejects_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    make_reference().save_pretrained(tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    state.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight")
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match="DenseReluDense.wo"):
        load_t5_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("name", ["v1.0-relu-tied", "v1.1-gated-untied", "odd-heads-buckets"])
def test_greedy_generation_matches_transformers(name, paths):
    ref = make_reference(seed=3, **CONFIGS[name])
    ours = t5_from_hf(ref).eval()
    x, am, _, _ = inputs(seed=4)
    want = ref.generate(x, attention_mask=am, max_new_tokens=12, do_sample=False, num_beams=1)
    got = ours.generate(x, attention_mask=am, max_new_tokens=12)
    assert torch.equal(got, want)


def _until_eos(seqs: torch.Tensor, eos: int) -> list[list[int]]:
    """Tokens up to and including the first EOS (transformers fills after EOS with EOS when pad is 0)."""
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos, 1) + 1] if eos in row[1:] else row)
    return out


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(num_beams, paths):
    for name in ("v1.0-relu-tied", "v1.1-gated-untied"):
        ref = make_reference(seed=5, **CONFIGS[name])
        ours = t5_from_hf(ref).eval()
        x, am, _, _ = inputs(seed=6)
        want = ref.generate(x, attention_mask=am, max_new_tokens=10, do_sample=False, num_beams=num_beams)
        got = ours.generate(x, attention_mask=am, max_new_tokens=10, num_beams=num_beams)
        assert _until_eos(got, 1) == _until_eos(want, 1)


@pytest.mark.parametrize("name", ["v1.0-relu-tied", "v1.1-gated-untied"])
def test_logits_and_gradients_match_with_autograd(name, paths):
    """With autograd on (eval and train without dropout): logits and every parameter's gradient match the reference's
    autograd; on the fast path our CPU attention is then the hand-differentiated `BiasedAttention`."""
    ref = make_reference(**CONFIGS[name], dropout_rate=0.0)
    ours = t5_from_hf(ref)
    x, am, y, dm = inputs()
    for train in (False, True):
        ref.train(train), ours.train(train)
        want = ref(input_ids=x, attention_mask=am, decoder_input_ids=y, decoder_attention_mask=dm).logits
        got = ours(x, am, y, dm)
        assert (got - want).abs().max().item() <= 1e-5
    want.square().mean().backward()
    got.square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for key, param in ours.named_parameters():
        want_grad = ref_params[key].grad
        assert (param.grad - want_grad).abs().max().item() <= 1e-5 * max(1.0, want_grad.abs().max().item()), key


def _holes(x: torch.Tensor) -> torch.Tensor:
    """A mask with right padding, left padding and a hole in the middle (positions not consecutive)."""
    am = torch.ones_like(x)
    am[0, -6:] = 0
    am[1, :5] = 0
    am[2, 7:12] = 0
    return am


@pytest.mark.parametrize("num_beams", [1, 4])
def test_unpadded_encoder_generates_what_transformers_does(num_beams, monkeypatch, fast):
    """The fast path's inference runs the encoder over the real tokens only (`models.fast.t5.forward_unpadded`): with
    left padding and a hole in the mask, generation still equals transformers' on the padded batch, and the path was
    really taken."""
    calls = []
    unpadded = fast_t5.forward_unpadded
    monkeypatch.setattr(fast_t5, "forward_unpadded", lambda *a: calls.append(a[2]) or unpadded(*a))
    ref = make_reference(seed=7, **CONFIGS["v1.0-relu-tied"])
    ours = t5_from_hf(ref).eval()
    x, _, _, _ = inputs(seed=8)
    am = _holes(x)
    want = ref.generate(x, attention_mask=am, max_new_tokens=10, do_sample=False, num_beams=num_beams)
    got = ours.generate(x, attention_mask=am, max_new_tokens=10, num_beams=num_beams)
    assert _until_eos(got, 1) == _until_eos(want, 1)
    assert len(calls) == 1  # once per generate: encoder and cross-attention keys/values from the packed rows
    positions = [p if isinstance(p, slice) else p.tolist() for _, _, p in calls[0]]
    assert positions[:2] == [slice(0, x.shape[1] - 6), slice(5, x.shape[1])]
    assert positions[2] == [*range(7), *range(12, x.shape[1])]


def test_unpadded_encoder_output_equals_the_padded_batch(fast):
    """At real positions the unpadded encoder gives the padded batch's output (and transformers'); padded positions
    are zero. With autograd on, an item of padding only, or no padding, the padded batch runs."""
    ref = make_reference(seed=9, **CONFIGS["v1.1-gated-untied"])
    ours = t5_from_hf(ref).eval()
    x, _, _, _ = inputs(seed=10)
    am = _holes(x)
    real = am.bool()
    with torch.no_grad():
        assert fast_t5.unpadded_spans(ours, x, am) is not None
        got = ours.encode(x, am)
        want = ref.encoder(input_ids=x, attention_mask=am).last_hidden_state
    padded = ours.encode(x, am).detach()  # autograd on: the padded batch
    torch.testing.assert_close(got[real], padded[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert not got[~real].any() and padded[~real].abs().sum() > 0
    with torch.no_grad():  # decoding's cross-attention keys/values, projected from the packed rows
        kvs = ours.init_decoding(x, am, 1)["memory_kv"]
        for block, (k, v) in zip(ours.decoder.block, kvs, strict=True):
            for got_kv, want_kv in zip((k, v), block.layer[1].EncDecAttention.project_kv(padded), strict=True):
                keys = real[:, None, :, None].expand_as(got_kv)
                torch.testing.assert_close(got_kv[keys], want_kv[keys], atol=1e-5, rtol=1e-5)
                assert not got_kv[~keys].any()
    empty = am.clone()
    empty[1] = 0
    with torch.no_grad():
        assert fast_t5.unpadded_spans(ours, x, empty) is None
        assert fast_t5.unpadded_spans(ours, x, torch.ones_like(am)) is None
        assert fast_t5.unpadded_spans(ours, x, None) is None
    assert fast_t5.unpadded_spans(ours, x, am) is None  # autograd on
