"""models/generation.py on our T5: cached decoding equals re-running the model, EOS/padding, beams, layouts."""

from __future__ import annotations

import pytest
import torch

from models.generation import generate
from models.t5 import T5Config, T5Model


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding tiny models is hundreds of small ops per token: with several threads on a busy machine every op
    waits at an OpenMP barrier (10x slower measured at load 8), so these tests run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(layout: str = "encoder_decoder", seed: int = 0, **kw) -> T5Model:
    torch.manual_seed(seed)
    base = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Model(T5Config(**{**base, "layout": layout, **kw})).eval()


def naive_greedy(model: T5Model, x, mask, n: int) -> torch.Tensor:
    """Greedy without caches: full forward over the whole prefix at every step."""
    with torch.no_grad():
        if model.config.layout == "encoder_decoder":
            seq = torch.zeros(x.shape[0], 1, dtype=torch.long)
            for _ in range(n):
                seq = torch.cat([seq, model(x, mask, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            return seq
        seq = x
        for _ in range(n):
            prefix = torch.full((x.shape[0],), x.shape[1]) if model.config.layout == "prefix_lm" else None
            full_mask = torch.cat([mask, torch.ones(x.shape[0], seq.shape[1] - x.shape[1], dtype=mask.dtype)], 1)
            logits = model(seq, full_mask, prefix_lengths=prefix)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq


@pytest.mark.parametrize("layout", ["encoder_decoder", "causal_lm", "prefix_lm"])
def test_cached_greedy_equals_uncached(layout):
    model = model_for(layout)
    x = torch.randint(2, 50, (3, 7))
    mask = torch.ones_like(x)
    if layout == "encoder_decoder":
        mask[1, 5:] = 0
    else:
        mask[1, :2] = 0  # decoder-only prompts are left-padded
    got = model.generate(x, mask, max_new_tokens=9, eos_token_id=-1)
    assert torch.equal(got, naive_greedy(model, x, mask, 9))
    if layout != "encoder_decoder":
        assert torch.equal(got[:, :7], x)  # prompt + continuation


def test_eos_stops_and_pads():
    model = model_for()
    x = torch.randint(2, 50, (4, 6))
    free = model.generate(x, max_new_tokens=8, eos_token_id=-1)
    eos = int(free[0, 3])  # make a token that row 0 emits the EOS
    first = free[0, 1:].tolist().index(eos) + 1
    out = generate(model, x, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out[0, first] == eos and (out[0, first + 1 :] == 0).all()
    for row, ref in zip(out.tolist(), free.tolist(), strict=True):  # before EOS, the same tokens
        cut = row.index(eos, 1) + 1 if eos in row[1:] else len(row)
        assert row[:cut] == ref[:cut]
    if not (free[:, 1:] == eos).any(dim=1).all():
        assert out.shape[1] == 9  # some row never emits EOS: runs to max_new_tokens


def sequence_logprob(model: T5Model, x, seq: torch.Tensor) -> float:
    with torch.no_grad():
        logp = model(x, None, seq[:, :-1]).log_softmax(-1)
    return logp.gather(-1, seq[:, 1:, None]).sum().item()


def test_beam_search_scores_at_least_greedy():
    model = model_for(seed=2)
    x = torch.randint(2, 50, (1, 6))
    greedy = model.generate(x, max_new_tokens=6, eos_token_id=-1)
    beam = model.generate(x, max_new_tokens=6, num_beams=4, eos_token_id=-1)
    assert beam.shape == greedy.shape
    assert sequence_logprob(model, x, beam) >= sequence_logprob(model, x, greedy) - 1e-5


def test_beam_search_batch_rows_independent():
    model = model_for(seed=3)
    x = torch.randint(2, 50, (3, 6))
    batched = model.generate(x, max_new_tokens=5, num_beams=3, eos_token_id=-1)
    for i in range(3):
        alone = model.generate(x[i : i + 1], max_new_tokens=5, num_beams=3, eos_token_id=-1)
        assert torch.equal(batched[i : i + 1], alone)


def test_beam_search_decoder_only():
    model = model_for("causal_lm", seed=4)
    x = torch.randint(2, 50, (2, 5))
    out = model.generate(x, max_new_tokens=4, num_beams=3, eos_token_id=-1)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], x)


def test_one_beam_is_greedy():
    model = model_for(seed=5)
    x = torch.randint(2, 50, (2, 6))
    assert torch.equal(generate(model, x, max_new_tokens=5, num_beams=1), model.generate(x, max_new_tokens=5))
    with pytest.raises(ValueError):
        generate(model, x, num_beams=0)


@pytest.mark.parametrize("layout", ["encoder_decoder", "prefix_lm"])
def test_cached_greedy_equals_uncached_past_cache_growth(layout):
    model = model_for(layout, seed=6)
    x = torch.randint(2, 50, (2, 5))
    mask = torch.ones_like(x)
    got = model.generate(x, mask, max_new_tokens=70, eos_token_id=-1)  # the caches double past 64 positions
    assert torch.equal(got, naive_greedy(model, x, mask, 70))


def test_beam_search_reorders_grown_caches():
    model = model_for(seed=7)
    x = torch.randint(2, 50, (2, 6))
    beams = model.generate(x, max_new_tokens=70, num_beams=3, eos_token_id=-1)
    assert beams.shape == (2, 71)
    greedy = model.generate(x, max_new_tokens=70, eos_token_id=-1)
    assert sequence_logprob(model, x[:1], beams[:1]) >= sequence_logprob(model, x[:1], greedy[:1]) - 1e-4
