"""The speed paths of our Reformer's attention (`models/reformer.py`): each function takes the reference module as its
first argument and stands in for its `forward` when `paths="fast"`, computing the same numbers within rounding
(tests/test_fast_reformer.py).

- the projections in one product (LSH: [qk, v] per head side by side; local: q, k / sqrt(K), v);
- LSH: the sort and unsort as row gathers with a gather-only backward (`PermuteRows`), both hash rounds' rows read
  from the one projection, the kernels of `models/fast/lsh.py` for chunks, scores and keys.

Dimension legend: as in models/reformer.py.
"""

from __future__ import annotations

import math

import torch

from models.chunked_attention import full_attention, merge_heads
from models.fast.lsh import NormaliseKeys, PermuteRows, chunked_attention
from models.fast.products import dense


def normalise_keys(qk: torch.Tensor) -> torch.Tensor:
    """`models.chunked_attention.normalise_keys` with a two-pass backward."""
    return NormaliseKeys.apply(qk)


def lsh_attention(attn, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, cache: dict | None = None):
    """`LSHSelfAttention.forward`: (B, L, D) -> (B, L, H*K)."""
    B, L, _ = hidden.shape
    H, R, K = attn.num_heads, attn.config.n_hashes, attn.d_kv
    # both projections in one product, per head [qk, v] side by side: (B, L, H, 2K)
    weight = torch.cat([attn.query_key.weight.view(H, K, -1), attn.value.weight.view(H, K, -1)], dim=1)
    qkv = dense(hidden, weight.flatten(0, 1)).view(B, L, H, 2 * K)
    drop, training = attn.config.attention_dropout_rate, attn.training
    if attn.config.use_full_attention or L <= attn.chunk_length:
        qk, v = qkv.transpose(1, 2).split(K, dim=-1)  # (B, H, L, K)
        return merge_heads(full_attention(qk, NormaliseKeys.apply(qk), v, key_mask, attn.causal, True, drop, training))
    order = attn.sort_order(qkv[..., :K].transpose(1, 2), key_mask, cache)  # (B, H, N)
    with torch.no_grad():
        arange = lambda n: torch.arange(n, device=order.device)  # noqa: E731
        pos = order % L
        # sorted vector (b, h, i) is row `rows` of qkv as (B*L*H, 2K); its unsorted place is (b, pos, h, round)
        rows = (pos + arange(B).view(B, 1, 1) * L) * H + arange(H).view(1, H, 1)  # (B, H, N)
        undo = torch.empty_like(order).scatter_(-1, order, arange(R * L).expand_as(order))  # inverse permutation
        # the other way: (b, l, h, r) -> row of the sorted (B*H*N, K); each qkv row is used by R of them
        back = undo.view(B, H, R, L).permute(0, 3, 1, 2) + (arange(B * H).view(B, 1, H, 1) * (R * L))
        rows, back, unsorted = rows.flatten(), back.flatten(), (rows * R + order // L).flatten()
    qkv = PermuteRows.apply(qkv.view(B * L * H, 2 * K), rows, back, R)  # a row gather, not an expanded `gather`
    qk, v = qkv.view(B, H, R * L, 2 * K).split(K, dim=-1)
    keys = NormaliseKeys.apply(qk)
    before, after = attn.config.lsh_num_chunks_before, attn.num_chunks_after
    out, lse = chunked_attention(
        qk, keys, v, pos, key_mask, attn.chunk_length, before, after, attn.causal, True, drop, training
    )
    out = PermuteRows.apply(out.view(B * H * R * L, K), back, unsorted, 1).view(B, L, H, R, K)
    lse = PermuteRows.apply(lse.view(B * H * R * L, 1), back, unsorted, 1).view(B, L, H, R, 1)
    # rounds combined through their normalisers; written as exp(lse - logsumexp) rather than softmax because a
    # query that only sees itself has lse near the self-mask value, where the two round differently in fp32
    weights = torch.exp(lse - torch.logsumexp(lse, dim=3, keepdim=True))
    return (out * weights).sum(dim=3).view(B, L, H * K)


def local_attention(attn, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`LocalSelfAttention.forward`: (B, L, D) -> (B, L, H*K)."""
    B, L, _ = hidden.shape
    # the three projections in one product (keys pre-scaled by 1/sqrt(d_kv)): (B, L, 3, H, K)
    weight = torch.cat([attn.query.weight, attn.key.weight / math.sqrt(attn.d_kv), attn.value.weight])
    q, k, v = dense(hidden, weight).view(B, L, 3, attn.num_heads, attn.d_kv).transpose(1, 3).unbind(2)
    drop, training = attn.config.attention_dropout_rate, attn.training  # q, k, v: (B, H, L, K)
    if L <= attn.chunk_length:
        return merge_heads(full_attention(q, k, v, key_mask, attn.causal, False, drop, training))
    pos = torch.arange(L, device=hidden.device).view(1, 1, L)  # the same for every row and head
    before, after = attn.config.local_num_chunks_before, attn.num_chunks_after
    out, _ = chunked_attention(
        q, k, v, pos, key_mask, attn.chunk_length, before, after, attn.causal, False, drop, training
    )
    return merge_heads(out.view(B, attn.num_heads, L, attn.d_kv))
