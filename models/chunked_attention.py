"""The attention arithmetic of our Reformer (`models/reformer.py`), in plain PyTorch: attention within chunks and
their neighbours (the LSH and local layers), full attention, and the shared-QK keys (Kitaev et al. 2020, section 2).
The fast forms (`models/fast/lsh.py`: fewer passes over memory, less kept for backward) are tested equal to these.

Dimension legend: B batch, H heads, L length, N vectors (R * L for LSH, all rounds side by side), C chunks, S chunk
length, W attended keys per chunk ((before + 1 + after) * S), K d_kv.
"""

from __future__ import annotations

import math

import torch

from models.layers import dropout


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*K) -> (B, H, L, K)"""
    return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, K) -> (B, L, H*K)"""
    return x.transpose(1, 2).flatten(2)


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(masked, self) logit values; the self value is only a penalty so a token alone may still attend to itself."""
    return (-1e4, -1e3) if dtype == torch.float16 else (-1e9, -1e5)


def normalise_keys(qk: torch.Tensor) -> torch.Tensor:
    """Shared-QK keys (section 2.2): the query vectors at unit RMS per head, then the usual 1/sqrt(K); (..., K)."""
    return qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(qk.shape[-1])


def look_adjacent(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, H, C, S, ...) -> (B, H, C, (before + 1 + after) * S, ...): each chunk preceded by `before` and followed by
    `after` neighbouring chunks, wrapping around (the first chunk's "before" is the last chunk)."""
    if before == 0 and after == 0:
        return x
    return torch.cat([x.roll(-shift, dims=2) for shift in range(-before, after + 1)], dim=3)


def banned_keys(key_mask, q_pos, k_pos, causal: bool) -> torch.Tensor | None:
    """Keys a query may not see, bool (B|1, H|1, C, S|1, W): padding (`key_mask` (B, L) marks real positions) and,
    when `causal`, keys after the query; `q_pos` (B|1, H|1, C, S), `k_pos` (B|1, H|1, C, W) are positions in the
    sequence (after sorting, for LSH). None when there are none."""
    banned = None
    with torch.no_grad():
        if key_mask is not None:
            B, C = key_mask.shape[0], k_pos.shape[2]
            if k_pos.shape[0] == 1 and k_pos.shape[1] == 1:  # shared positions: index once for all heads
                banned = ~key_mask[:, k_pos.flatten()].view(B, 1, C, 1, -1)
            else:
                H = k_pos.shape[1]
                banned = ~key_mask.view(B, 1, -1).expand(B, H, -1).gather(2, k_pos.flatten(2)).view(B, H, C, 1, -1)
        if causal:
            future = q_pos.unsqueeze(-1) < k_pos.unsqueeze(-2)  # (B|1, H|1, C, S, W)
            banned = future if banned is None else banned | future
    return banned


def chunked_attention(q, k, v, pos, key_mask, chunk_length, before, after, causal, self_mask, drop, training):
    """Attention within chunks of `chunk_length` and their neighbours; q, k, v (B, H, N, K).

    `pos` (B, H, N), or (1, 1, N) when the same for every row, holds each vector's position in the sequence
    (positions after sorting, for LSH); it drives the causal, padding (`key_mask` (B, L) bool) and self masks.
    Returns the output (B, H, C, S, K) and, for `self_mask` (LSH), the log-sum-exp of the logits (B, H, C, S),
    which weighs the hash rounds against each other (section 2.3).
    """
    B, H, N, K = q.shape
    C, S = N // chunk_length, chunk_length
    q = q.view(B, H, C, S, K)
    k = look_adjacent(k.view(B, H, C, S, K), before, after)  # (B, H, C, W, K)
    v = look_adjacent(v.view(B, H, C, S, K), before, after)
    q_pos = pos.view(pos.shape[0], pos.shape[1], C, S)
    k_pos = look_adjacent(q_pos, before, after)  # (B|1, H|1, C, W)
    dots = q @ k.transpose(-1, -2)  # (B, H, C, S, W)
    mask_value, self_value = mask_values(dots.dtype)
    banned = banned_keys(key_mask, q_pos, k_pos, causal)
    if banned is not None:
        dots = dots.masked_fill(banned, mask_value)
    if self_mask:  # shared-QK: a query's own key would dominate its dot products (section 2.2); penalised
        dots = dots.masked_fill(q_pos.unsqueeze(-1) == k_pos.unsqueeze(-2), self_value)
    probs = dropout(dots.softmax(-1), drop, training)
    return probs @ v, dots.logsumexp(-1) if self_mask else None


def full_attention(q, k, v, key_mask, causal, self_mask, drop, training):
    """Ordinary attention over the whole sequence, q, k, v (B, H, L, K) -> (B, H, L, K); stores only one (L, L) map
    per head."""
    L = q.shape[2]
    dots = torch.matmul(q, k.transpose(-1, -2))  # (B, H, L, L)
    mask_value, self_value = mask_values(dots.dtype)
    if key_mask is not None:
        dots.masked_fill_(~key_mask[:, None, None, :], mask_value)
    if causal:
        dots.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1), mask_value)
    if self_mask:
        dots.diagonal(dim1=-2, dim2=-1).fill_(self_value)
    probs = dropout(torch.softmax(dots, dim=-1), drop, training)
    return torch.matmul(probs, v)
