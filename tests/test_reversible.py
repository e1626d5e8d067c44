"""The reversible residual mechanism (models/reversible.py): exact gradients, replayed randomness, O(1) memory."""

import pytest
import torch
from torch import nn

from models.reformer import ReformerConfig, ReformerModel
from models.reversible import reversible_stack


class ToyBlock(nn.Module):
    """f reads x2 and a context tensor, g reads y1; both use dropout so the replay of randomness matters."""

    def __init__(self, dim: int, p: float):
        super().__init__()
        self.lin_f, self.lin_c, self.lin_g = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def f(self, x2, context, scale=1.0, cache=None):
        return scale * self.drop(torch.tanh(self.lin_f(x2) + self.lin_c(context).mean(1, keepdim=True)))

    def g(self, y1):
        return self.drop(torch.tanh(self.lin_g(y1)))


def _grads(blocks, x, context, reversible, seed):
    x = x.clone().requires_grad_(True)
    context = context.clone().requires_grad_(True)
    for p in blocks.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = reversible_stack(x, blocks, (context,), reversible, scale=0.7)
    (out.sin() * torch.linspace(0, 1, out.shape[-1])).mean().backward()
    return out.detach(), x.grad, context.grad, [p.grad.clone() for p in blocks.parameters()]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reversible_gradients_equal_ordinary_residual(p):
    torch.manual_seed(0)
    blocks = nn.ModuleList(ToyBlock(6, p) for _ in range(4)).train()
    x, context = torch.randn(3, 5, 12), torch.randn(3, 7, 6)
    rev = _grads(blocks, x, context, True, seed=11)
    ordinary = _grads(blocks, x, context, False, seed=11)
    torch.testing.assert_close(rev[0], ordinary[0], rtol=0, atol=1e-6)
    for a, b in zip(rev[1:3] + tuple(rev[3]), ordinary[1:3] + tuple(ordinary[3]), strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_backward_replays_randomness_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    blocks = nn.ModuleList(ToyBlock(4, 0.5) for _ in range(2)).train()
    x, context = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 4)
    torch.manual_seed(5)
    out = reversible_stack(x, blocks, (context,), True)
    state = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)  # the recomputation restores the caller's generator
    # without the replay the recomputed dropout masks would differ and the gradients would be wrong
    grad_rev = x.grad.clone()
    x.grad = None
    torch.manual_seed(5)
    reversible_stack(x, blocks, (context,), False).sum().backward()
    torch.testing.assert_close(grad_rev, x.grad, rtol=0, atol=1e-5)


def _saved_bytes(depth: int, reversible: bool) -> int:
    """Bytes autograd keeps for backward over a stack of `depth` toy blocks."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(ToyBlock(16, 0.0) for _ in range(depth))
    x, context = torch.randn(2, 64, 32, requires_grad=True), torch.randn(2, 4, 16)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if not isinstance(t, nn.Parameter) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reversible_stack(x, blocks, (context,), reversible)
    return sum(saved)


def test_reversible_memory_does_not_grow_with_depth():
    assert _saved_bytes(8, True) == _saved_bytes(2, True)
    assert _saved_bytes(8, False) > 3 * _saved_bytes(2, False)


def _pair(layout, **overrides):
    """The same weights as a reversible and as an ordinary residual Reformer."""
    kw = dict(
        vocab_size=50,
        layout=layout,
        d_model=32,
        d_kv=8,
        num_heads=2,
        d_ff=48,
        attn_layers=["lsh", "local", "lsh"],
        lsh_chunk_length=4,
        local_chunk_length=8,
        n_hashes=3,
        axial_pos_shape=[4, 8],
        axial_pos_dims=[16, 16],
        dropout_rate=0.2,
        attention_dropout_rate=0.1,
        hash_seed=None,  # fresh rotations from the global RNG: the backward must replay them
        hidden_act="gelu",
    )
    kw.update(overrides)
    torch.manual_seed(0)
    rev = ReformerModel(ReformerConfig(**kw, reversible=True)).train()
    ordinary = ReformerModel(ReformerConfig(**kw, reversible=False)).train()
    ordinary.load_state_dict(rev.state_dict())
    return rev, ordinary


@pytest.mark.parametrize("layout", ["causal_lm", "encoder_decoder"])
def test_reformer_reversible_gradients_match_ordinary_stack(layout):
    rev, ordinary = _pair(layout)
    ids = torch.randint(2, 50, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 19:] = False
    dec = torch.randint(2, 50, (2, 16))
    grads = []
    for model in (rev, ordinary):
        torch.manual_seed(3)
        if layout == "causal_lm":
            logits = model(ids, mask)
        else:
            logits = model(ids, mask, decoder_input_ids=dec)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, : logits.shape[1]].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    if layout == "encoder_decoder":  # gradients reach the encoder through the decoder's recomputing backward
        assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in grads[0].items())
    for name in grads[0]:
        assert grads[0][name] is not None, name
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5, msg=name)
