"""The pieces both families share (models/layers.py): the one dropout and decoding's key/value cache; the cache's
use in beam search is in tests/test_t5_decoding.py."""

from __future__ import annotations

import pytest
import torch

from models.layers import KVCache, drop_mask, dropout


def test_drop_mask_rate_lanes_and_rescale():
    torch.manual_seed(0)
    x = torch.ones(1000, 1024)
    drop, scale = drop_mask(x, 0.1)
    assert drop.dtype == torch.bool and drop.shape == x.shape
    p = round(0.1 * 2**16) / 2**16  # the rounded rate the rescale is computed from
    assert scale == pytest.approx(1 / (1 - p))
    lanes = drop.view(-1, 4).float().mean(0)  # each of the four 16-bit lanes of a draw is unbiased
    assert (lanes - p).abs().max().item() < 0.003
    assert not torch.equal(drop, drop_mask(x, 0.1)[0])  # fresh randomness per call
    y = dropout(x, 0.1, training=True)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    values = y.unique()
    assert values.numel() == 2 and values[0] == 0.0 and values[1].item() == pytest.approx(scale)
    assert dropout(x, 0.1, training=False) is x


def test_kv_cache_grows_in_place_and_reorders():
    cache, ks = KVCache(), []
    for t in (5, 1, 60, 1, 70):  # crosses the first capacity (64) and a doubling
        k = torch.randn(3, 2, t, 4)
        ks.append(k)
        got_k, got_v = cache.append(k, -k)
        assert torch.equal(got_k, torch.cat(ks, dim=2)) and torch.equal(got_v, -torch.cat(ks, dim=2))
    assert cache.k.shape[2] >= cache.length == 137
    buffer = cache.k
    cache.append(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    assert cache.k is buffer  # room left: written in place, no new tensor
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k[:, :, :137], torch.cat(ks, dim=2)[[2, 2, 0]])
