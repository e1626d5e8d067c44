"""Incremental (cached) decoding of our Reformer (models/reformer_decoding.py): under a fixed hash seed the cached
steps give what re-running the whole prefix gives, logits and tokens, greedy and beam search, both layouts."""

import pytest
import torch

from models.generation import Uncached, generate
from models.reformer import ReformerConfig, ReformerModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding tiny models is hundreds of small ops per token: with several threads on a busy machine every op
    waits at an OpenMP barrier (10x slower measured at load 8), so these tests run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(
    vocab_size=40,
    d_model=32,
    d_kv=8,
    num_heads=2,
    d_ff=48,
    lsh_chunk_length=8,
    local_chunk_length=4,
    axial_pos_shape=[8, 16],
    axial_pos_dims=[16, 16],
    dropout_rate=0.0,
    hash_seed=3,
)
STACKS = {
    "local+lsh": dict(attn_layers=["local", "lsh"]),  # the presets' pattern: LSH feeds no later attention
    "lsh, 3 rounds, chunk after": dict(attn_layers=["lsh"], n_hashes=3, lsh_num_chunks_after=1),
    "factorised buckets, residual": dict(attn_layers=["local", "lsh"], n_buckets=[2, 4], reversible=False),
}


def _model(layout: str, **overrides) -> ReformerModel:
    torch.manual_seed(0)
    return ReformerModel(ReformerConfig(**{**SMALL, "layout": layout, **overrides})).eval()


def _prompt():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 40, (3, 11), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, -2:] = False
    return ids, mask


@pytest.mark.parametrize("layout", ["causal_lm", "encoder_decoder"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_cached_step_logits_equal_a_rerun_of_the_prefix(layout, stack):
    """Every step's logits, through the changes of chunk count, bucket count (re-hashing) and padding."""
    model = _model(layout, **STACKS[stack])
    ids, mask = _prompt()
    cached, rerun = model, Uncached(model)
    with torch.no_grad():
        states = [m.init_decoding(ids, mask, 1) for m in (cached, rerun)]
        tokens = ids if layout == "causal_lm" else torch.zeros(3, 1, dtype=torch.long)
        for _ in range(45):  # the prefix grows from one chunk to six, buckets from full attention to 8
            got, states[0] = cached.decode_step(tokens, states[0])
            want, states[1] = rerun.decode_step(tokens, states[1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tokens = want.argmax(-1, keepdim=True)
    assert states[0]["layers"][-1]["buckets"].length == states[0]["length"]  # the LSH layer hashed every key


@pytest.mark.parametrize("layout", ["causal_lm", "encoder_decoder"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_equals_uncached(layout, num_beams):
    model = _model(layout, **STACKS["local+lsh"])
    ids, mask = _prompt()
    want = generate(Uncached(model), ids, mask, max_new_tokens=40, num_beams=num_beams, eos_token_id=-1)
    got = model.generate(ids, mask, max_new_tokens=40, num_beams=num_beams, eos_token_id=-1)
    assert torch.equal(got, want)
    assert got.shape[1] == (11 if layout == "causal_lm" else 1) + 40


def test_later_tokens_may_be_fed_several_at_a_time():
    model = _model("causal_lm", **STACKS["local+lsh"])
    ids, _ = _prompt()
    with torch.no_grad():
        one = model.init_decoding(ids[:, :4], None, 1)
        model.decode_step(ids[:, :4], one)
        logits, _ = model.decode_step(ids[:, 4:], one)  # seven tokens in one call
        torch.testing.assert_close(logits, model(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_decoding_past_the_position_table_is_a_clear_error():
    model = _model("causal_lm", **STACKS["local+lsh"], axial_pos_shape=[2, 8])  # 16 positions
    ids, _ = _prompt()
    with pytest.raises(ValueError, match="exceeds the axial position grid"):
        model.generate(ids, max_new_tokens=10, eos_token_id=-1)
