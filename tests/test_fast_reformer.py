"""The speed paths of our Reformer (models/fast/reformer.py, models/fast/lsh.py) against the reference
(models/reformer.py, models/chunked_attention.py): the same model and inputs computed both ways give the same
logits, training gradients and generated tokens, within rounding. Dropout and the random LSH rotations come from the
global generator in the same order on both paths, so training steps with dropout and fresh rotations compare too.
Each test also checks that the fast forms really ran.

LSH hashing is an argmax: rounding could move a vector across a bucket boundary and change which keys a query sees.
The comparisons run in float64, where the two paths' rounding differences (~1e-16) are far below any boundary
distance of these inputs, and one float32 run checks the sort orders agree before comparing."""

from __future__ import annotations

import pytest
import torch

import models.fast.reformer as fast_reformer
from models.reformer import ReformerConfig, ReformerModel
from tests.kernel_setting import Spy, both, computing

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
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
)
CASES = {
    "causal local+lsh, fresh rotations": dict(layout="causal_lm"),
    "causal lsh, 3 rounds, a chunk after": dict(
        layout="causal_lm", attn_layers=["lsh"], n_hashes=3, lsh_num_chunks_after=1
    ),
    "encoder-decoder, seeded, factorised": dict(layout="encoder_decoder", hash_seed=4, n_buckets=[2, 4]),
    "full attention, residual": dict(layout="causal_lm", use_full_attention=True, reversible=False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(case: str, dtype=torch.float64, **kw) -> ReformerModel:
    torch.manual_seed(0)
    return ReformerModel(ReformerConfig(**{**SMALL, **CASES[case], **kw})).to(dtype)


def inputs(model: ReformerModel, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(2, 40, (2, 29), generator=g), torch.randint(2, 40, (2, 19), generator=g)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 23:] = False
    if model.config.layout == "encoder_decoder":
        y_mask = torch.ones_like(y, dtype=torch.bool)
        y_mask[0, 15:] = False
        return x, mask, y, y_mask
    return x, mask


def close(a, b, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_logits_and_gradients_equal_the_reference(case, monkeypatch):
    model = model_for(case).train()
    args = inputs(model)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(*args)
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    spy = Spy(monkeypatch, fast_reformer, ["lsh_attention", "local_attention"])
    (ref_logits, ref), (logits, fast) = both(step)
    assert spy.calls["lsh_attention"] + spy.calls["local_attention"] > 0
    close(logits, ref_logits)
    for n, g in ref.items():
        close(fast[n], g)
    with computing(paths="reference"):  # dropout and rotations are live: another draw gives other logits
        torch.manual_seed(6)
        assert not torch.allclose(step()[0], ref_logits, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_eval_logits_equal_the_reference(case):
    model = model_for(case).eval()
    args = inputs(model)
    with torch.no_grad():
        ref, fast = both(lambda: model(*args))
    close(fast, ref)


def test_float32_sorts_alike_and_agrees_within_rounding(monkeypatch):
    """In float32 too: the same sort orders on both paths (no vector changed bucket), then logits and gradients
    within float32 rounding."""
    model = model_for("causal lsh, 3 rounds, a chunk after", torch.float32).train()
    args = inputs(model)
    orders = []
    attn = model.decoder.layers[0].attention.self_attention
    sort_order = attn.sort_order
    monkeypatch.setattr(attn, "sort_order", lambda *a: orders.append(sort_order(*a)) or orders[-1])

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(*args)
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (ref_logits, ref), (logits, fast) = both(step)
    assert len(orders) == 4 and torch.equal(orders[0], orders[2])  # forward, reversible recompute; per path
    close(logits, ref_logits, 1e-5)
    for n, g in ref.items():
        close(fast[n], g, 1e-4)


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("case", ["causal local+lsh, fresh rotations", "encoder-decoder, seeded, factorised"])
def test_generation_equals_the_reference(case, beams):
    model = model_for(case, hash_seed=3 if "fresh" in case else 4).eval()
    args = inputs(model)
    with torch.no_grad():
        ref, fast = both(lambda: model.generate(args[0], args[1], max_new_tokens=7, num_beams=beams, eos_token_id=-1))
    assert torch.equal(fast, ref)
