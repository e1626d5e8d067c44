"""The Reformer's hand-written autograd kernels (models/lsh_kernels.py) against plain-autograd references, and the
one dropout both families use (models/common.py)."""

import math

import pytest
import torch


def test_shared_qk_scores_match_autograd_reference():
    from models.lsh_kernels import SharedQKScores

    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 5, 6, dtype=torch.double, requires_grad=True)  # (B, H, C, S, K)
    k = torch.randn(2, 3, 4, 10, 6, dtype=torch.double, requires_grad=True)  # (B, H, C, W, K)
    banned = torch.rand(2, 3, 4, 5, 10) < 0.4
    own = torch.rand(2, 3, 4, 5, 10) < 0.1
    banned[0, 0, 0, 0] = True  # a query that sees only itself: lse at the self value, its gradient zero
    own[0, 0, 0, 0] = False
    own[0, 0, 0, 0, 3] = True
    grad_probs, grad_lse = torch.randn(2, 3, 4, 5, 10, dtype=torch.double), torch.randn(2, 3, 4, 5, dtype=torch.double)

    def reference(q, k):
        dots = (q @ k.transpose(-1, -2)).masked_fill(banned, -1e9).masked_fill(own, -1e5)
        lse = dots.logsumexp(-1)
        return torch.exp(dots - lse.unsqueeze(-1)), lse

    results = []
    for fn in (reference, lambda q, k: SharedQKScores.apply(q, k, banned, own)):
        probs, lse = fn(q, k)
        gq, gk = torch.autograd.grad((probs * grad_probs).sum() + (lse * grad_lse).sum(), (q, k))
        results.append((probs, lse, gq, gk))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert results[1][1][0, 0, 0, 0] == -1e5


@pytest.mark.parametrize("before,after", [(1, 0), (2, 1), (0, 1), (3, 0)])
def test_look_adjacent_equals_roll_and_cat(before, after):
    from models.lsh_kernels import LookAdjacent

    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.double, requires_grad=True)  # (B, H, C, S, K), C=4 wraps with 3
    expected = torch.cat([x.roll(-i, dims=2) for i in range(-before, after + 1)], dim=3)
    got = LookAdjacent.apply(x, before, after)
    assert torch.equal(got, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    positions = torch.arange(20).view(1, 1, 4, 5)  # integer positions (no grad) go through the same function
    assert torch.equal(
        LookAdjacent.apply(positions, before, after)[0, 0, 1, :5], torch.arange(5) + 5 * ((1 - before) % 4)
    )


def test_normalise_keys_and_permute_rows_gradients():
    from models.lsh_kernels import NormaliseKeys, PermuteRows

    x = torch.randn(3, 7, 8, dtype=torch.double, requires_grad=True)
    keys = NormaliseKeys.apply(x)
    torch.testing.assert_close(keys, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(8))
    assert torch.autograd.gradcheck(NormaliseKeys.apply, (x,))
    # every row of x used twice (two hash rounds), in shuffled order
    rows = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    index = torch.randperm(12) % 6
    inverse = torch.argsort(index, stable=True)  # positions of row 0 (twice), row 1 (twice), ...
    got = PermuteRows.apply(rows, index, inverse, 2)
    assert torch.equal(got, rows[index])
    assert torch.autograd.gradcheck(lambda r: PermuteRows.apply(r, index, inverse, 2), (rows,))


def test_dropout_rate_scale_and_replay_on_the_global_generator():
    from models.common import dropout

    x = torch.ones(200_000)
    assert dropout(x, 0.3, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(1)
    y = dropout(x, 0.3, True)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    values = y.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.01
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.3, True), y)  # the global generator decides: the reversible backward replays it
    assert not torch.equal(dropout(x, 0.3, True), y)
