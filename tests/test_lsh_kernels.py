"""The Reformer's hand-written autograd kernels (models/fast/lsh.py) against plain-autograd references and against the
reference arithmetic of models/chunked_attention.py, and the one dropout both families use (models/layers.py)."""

import math

import pytest
import torch


def test_shared_qk_scores_match_autograd_reference():
    from models.fast.lsh import SharedQKScores

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
    from models.fast.lsh import LookAdjacent

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
    from models.fast.lsh import NormaliseKeys, PermuteRows

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
    from models.layers import dropout

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


@pytest.mark.parametrize("before,after", [(1, 0), (2, 1), (0, 0)])
def test_reference_look_adjacent_is_roll_and_cat_and_the_kernel_equals_it(before, after):
    from models.chunked_attention import look_adjacent
    from models.fast.lsh import look_adjacent as fast_look_adjacent

    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.double, requires_grad=True)
    want = x if before == after == 0 else torch.cat([x.roll(-i, dims=2) for i in range(-before, after + 1)], dim=3)
    assert torch.equal(look_adjacent(x, before, after), want)
    assert torch.equal(fast_look_adjacent(x, before, after), want)


def test_normalise_keys_kernel_equals_the_reference():
    from models.chunked_attention import normalise_keys
    from models.fast.lsh import NormaliseKeys

    x = torch.randn(3, 7, 8, dtype=torch.double, requires_grad=True)
    grad = torch.randn(3, 7, 8, dtype=torch.double)
    want = normalise_keys(x)
    got = NormaliseKeys.apply(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("drop", [0.0, 0.2])
@pytest.mark.parametrize(
    "self_mask,causal,shared,before,after",
    [(True, True, False, 1, 0), (True, False, False, 1, 1), (False, True, True, 1, 0), (False, False, True, 2, 1)],
    ids=["lsh-causal", "lsh-bidirectional", "local-causal", "local-bidirectional"],
)
def test_chunked_attention_kernels_equal_the_reference(self_mask, causal, shared, before, after, drop, padded):
    """`models.fast.lsh.chunked_attention` (kernels, and SDPA's fused kernel without padding or dropout) against the
    plain `models.chunked_attention.chunked_attention`: outputs, log-sum-exps and gradients, with the same dropout
    draws. LSH rows have their own (sorted) positions; local rows share theirs."""
    from models.chunked_attention import chunked_attention
    from models.fast.lsh import chunked_attention as fast_chunked_attention

    torch.manual_seed(0)
    B, H, N, K, S = 2, 3, 24, 5, 4
    q, k, v = (torch.randn(B, H, N, K, dtype=torch.double, requires_grad=True) for _ in range(3))
    L = N if shared else N // 2  # LSH: two rounds of L positions, each position twice
    pos = torch.arange(N).view(1, 1, N) if shared else torch.stack([torch.randperm(N) % L for _ in range(B * H)])
    pos = pos.view(1, 1, N) if shared else pos.view(B, H, N)
    key_mask = None
    if padded:
        key_mask = torch.ones(B, L, dtype=torch.bool)
        key_mask[1, L - 3 :] = False
    grads = [torch.randn(B, H, N // S, S, K, dtype=torch.double), torch.randn(B, H, N // S, S, dtype=torch.double)]
    results = []
    for fn in (chunked_attention, fast_chunked_attention):
        torch.manual_seed(1)
        out, lse = fn(q, k, v, pos, key_mask, S, before, after, causal, self_mask, drop, True)
        total = (out * grads[0]).sum() + ((lse * grads[1]).sum() if lse is not None else 0)
        results.append((out, lse, *torch.autograd.grad(total, (q, k, v))))
    for got, want in zip(results[1], results[0], strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
