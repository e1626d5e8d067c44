"""Incremental decoding for our Reformer (`models/reformer.py`): cached keys, values and LSH buckets.

The first call runs the decoder stack over the prompt (or the start token) exactly as `forward` does and keeps, per
layer, the projections of every position. Each later token runs through the layers alone:

- local attention: its query against the cached keys of its own chunk and the `before` chunks (section 2, the
  chunked baseline), which is what the full forward computes at the last position;
- LSH attention: the new key is hashed with the same rotations as the cached ones (re-hashed only when the bucket
  count, derived from the padded length, changes), the whole sequence is sorted by (round, bucket, position) as the
  forward sorts it, padding included, and the query attends to the chunk it falls in and its neighbours, rounds
  combined through their log-sum-exp (sections 2.2-2.3);
- cross-attention: the encoder's keys/values, projected once per layer;
- feed-forward and the two reversible streams: per position, so nothing to cache.

So a cached step gives the same logits as re-running the whole prefix under a fixed `hash_seed`, as long as the
hidden states of earlier positions do not change when the sequence grows: true for local and full attention, and
for an LSH layer whose outputs feed no later attention layer (the `tiny` preset: local then LSH) or while the
sequence fits one LSH chunk. In a stack with attention after an LSH layer, a re-run would re-sort the earlier
positions together with the new ones and change their hidden states; decoding keeps the states they had when they
were produced (as `transformers`' cached Reformer does), which is what makes it incremental.

Dimension legend: N rows (batch * beams), H heads, K d_kv, L positions so far, Lp padded length, R hash rounds,
S chunk length, W attended keys ((1 + before + after) * S), D d_model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from models.chunked_attention import mask_values, normalise_keys
from models.fast import reformer as fast
from models.layers import linear
from models.settings import fast_paths

_PAD_BUCKET = 2**40  # after every real bucket, as the forward's padding bucket


class Growing:
    """Tensors that grow along dim 2 in buffers doubled when full (one copy per doubling, not one per token)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.length = 0

    def append(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Add (N, H, t, ...) pieces (one per tensor kept); returns views of everything so far."""
        start, end = self.length, self.length + xs[0].shape[2]
        if not self.parts or end > self.parts[0].shape[2]:
            capacity = max(64, 2 * end)
            old = self.parts
            self.parts = [x.new_empty(*x.shape[:2], capacity, *x.shape[3:]) for x in xs]
            for new, previous in zip(self.parts, old, strict=False):  # old: [] on the first call
                new[:, :, :start] = previous[:, :, :start]
        for buffer, x in zip(self.parts, xs, strict=True):
            buffer[:, :, start:end] = x
        self.length = end
        return self.views()

    def rows(self, index: int, positions: torch.Tensor) -> torch.Tensor:
        """Tensor `index` at `positions` (N, H, M) of each row and head -> (N, H, M, ...), as one row gather."""
        buffer = self.parts[index]
        N, H, capacity = buffer.shape[:3]
        base = torch.arange(N * H, device=positions.device).view(N, H, 1) * capacity
        flat = buffer.view(N * H * capacity, -1).index_select(0, (positions + base).flatten())
        return flat.view(*positions.shape, *buffer.shape[3:])

    def views(self) -> list[torch.Tensor]:
        return [buffer[:, :, : self.length] for buffer in self.parts]

    def replace(self, index: int, x: torch.Tensor) -> None:
        """Overwrite tensor `index` with x (N, H, length, ...) (LSH buckets re-hashed with new rotations)."""
        self.parts[index][:, :, : self.length] = x

    def reorder(self, rows: torch.Tensor) -> None:
        for buffer in self.parts:
            buffer[:, :, : self.length] = buffer[:, :, : self.length].index_select(0, rows)


def _is_lsh(attention: torch.nn.Module) -> bool:
    return hasattr(attention, "query_key")


def _weights(attention: torch.nn.Module) -> torch.Tensor:
    """The layer's projections as one matrix: LSH [qk; v], local [q; k / sqrt(K); v] (as its forward scales k)."""
    if _is_lsh(attention):
        return torch.cat([attention.query_key.weight, attention.value.weight])
    return torch.cat([attention.query.weight, attention.key.weight / math.sqrt(attention.d_kv), attention.value.weight])


def _project(attention: torch.nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden (N, t, D) -> per-head projections (N, H, t, K): LSH (qk, keys, v), local (q, k / sqrt(K), v)."""
    N, t, _ = hidden.shape
    H, K = attention.num_heads, attention.d_kv
    parts = linear(hidden, weight).view(N, t, -1, H, K).permute(2, 0, 3, 1, 4).unbind(0)
    if _is_lsh(attention):
        qk, v = parts
        return qk, fast.normalise_keys(qk) if fast_paths() else normalise_keys(qk), v
    return parts


def _raw_buckets(attention, qk: torch.Tensor, n_buckets, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket of every vector per round, without the round offset: (N, H, L, K) -> (N, H, L, R)."""
    N, H, L, _ = qk.shape
    R = attention.config.n_hashes
    total = math.prod([n_buckets] if isinstance(n_buckets, int) else n_buckets)
    rounds = torch.arange(R, device=qk.device).view(1, 1, R, 1) * total
    return (attention.hash(qk, n_buckets, None, rotations).view(N, H, R, L) - rounds).transpose(2, 3)


def _padded_length(length: int, stack: torch.nn.Module) -> int:
    """The length `forward` pads a sequence to (`ReformerModel._run_stack`)."""
    return length + (-length) % stack.pad_multiple if length > stack.min_chunk else length


def _local_step(attention, q, keys, values, key_mask, padded: int) -> torch.Tensor:
    """Query (N, H, 1, K) at the last position t against the keys of its chunk and the `before` chunks."""
    t, S = keys.shape[2] - 1, attention.chunk_length
    start = 0 if padded <= S else max(0, (t // S - attention.config.local_num_chunks_before) * S)
    dots = q @ keys[:, :, start:].transpose(-1, -2)  # (N, H, 1, W); later chunks are all in the future
    dots.masked_fill_(~key_mask[:, None, None, start : t + 1], mask_values(dots.dtype)[0])
    return dots.softmax(-1) @ values[:, :, start:]


def _lsh_step(attention, qk, store: Growing, buckets, key_mask, padded: int) -> torch.Tensor:
    """Shared-QK query (N, H, 1, K) at the last position t: the chunk it falls in after sorting, and neighbours.
    `store` holds the (qk, keys, values) of every position so far."""
    _, keys, values = store.views()
    N, H, L, K = keys.shape
    t = L - 1
    mask_value, self_value = mask_values(keys.dtype)
    if attention.config.use_full_attention or padded <= attention.chunk_length:  # the forward's full attention
        dots = qk @ keys.transpose(-1, -2)  # (N, H, 1, L)
        dots.masked_fill_(~key_mask[:, None, None, :], mask_value)
        dots[..., t] = self_value
        return dots.softmax(-1) @ values
    S, R = attention.chunk_length, attention.config.n_hashes
    before, after = attention.config.lsh_num_chunks_before, attention.num_chunks_after
    # sort keys of the forward: padding (masked prompt tokens, then the padded tail) in a bucket after the others
    sort_key = buckets.transpose(2, 3).masked_fill(~key_mask[:, None, None, :], _PAD_BUCKET)  # (N, H, R, L)
    sort_key = F.pad(sort_key, (0, padded - L), value=_PAD_BUCKET)  # (N, H, R, Lp)
    order = torch.argsort(sort_key, dim=-1, stable=True)  # positions, round by round
    rank = (order == t).int().argmax(dim=-1)  # (N, H, R): where the query sits in its round
    start = ((rank + torch.arange(R, device=rank.device) * padded) // S - before) * S  # first attended slot
    slots = (start[..., None] + torch.arange((1 + before + after) * S, device=rank.device)) % (R * padded)
    positions = order.flatten(2).gather(2, slots.flatten(2)).view(N, H, R, -1)  # (N, H, R, W)
    real = F.pad(key_mask, (0, padded - L), value=False)  # (N, Lp)
    banned = (positions > t) | ~real.gather(1, positions.flatten(1)).view(positions.shape)
    index = positions.clamp(max=t).flatten(2)  # (N, H, R*W)
    dots = (store.rows(1, index).view(N, H, R, -1, K) @ qk.transpose(-1, -2)[:, :, None]).squeeze(-1)
    dots.masked_fill_(banned, mask_value).masked_fill_(positions == t, self_value)  # (N, H, R, W)
    lse = dots.logsumexp(-1, keepdim=True)  # (N, H, R, 1)
    out = (torch.exp(dots - lse)[..., None, :] @ store.rows(2, index).view(N, H, R, -1, K)).squeeze(-2)
    weights = torch.exp(lse - lse.logsumexp(2, keepdim=True))  # rounds weighed by their normalisers (2.3)
    return (out * weights).sum(2, keepdim=True)  # (N, H, 1, K)


def _hash_new(attention, cache: dict, qk_all: torch.Tensor, qk_new: torch.Tensor, padded: int) -> torch.Tensor:
    """Buckets (N, H, L, R) of every cached key; re-hashed when the padded length changes the bucket count."""
    n_buckets = attention.n_buckets(padded)
    store: Growing = cache["buckets"]
    if cache.get("n_buckets") != n_buckets:
        cache["n_buckets"], cache["rotations"] = n_buckets, attention.rotations(n_buckets, qk_all)
        fresh = _raw_buckets(attention, qk_all, n_buckets, cache["rotations"])
        if store.length < fresh.shape[2]:
            store.append(fresh[:, :, store.length :])
        store.replace(0, fresh)
    else:
        store.append(_raw_buckets(attention, qk_new, n_buckets, cache["rotations"]))
    return store.views()[0]


def _self_attention_step(attention, hidden, cache: dict, key_mask, padded: int) -> torch.Tensor:
    """One new position through a layer's self-attention (after its layer norm): (N, 1, D) -> (N, 1, H*K)."""
    if _is_lsh(attention):
        qk, keys, v = _project(attention, hidden, cache["weight"])
        qk_all = cache["kv"].append(qk, keys, v)[0]
        if not (attention.config.use_full_attention or padded <= attention.chunk_length):
            buckets = _hash_new(attention, cache, qk_all, qk, padded)
        else:
            buckets = None
        out = _lsh_step(attention, qk, cache["kv"], buckets, key_mask, padded)
    else:
        q, k, v = _project(attention, hidden, cache["weight"])
        keys, values = cache["kv"].append(k, v)
        out = _local_step(attention, q, keys, values, key_mask, padded)
    return out.transpose(1, 2).flatten(2)


def init_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict[str, Any]:
    """Empty per-layer caches; for encoder-decoder the encoder output's keys/values per layer, expanded per beam."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)  # (N, P)
    state: dict[str, Any] = {"layers": [{"kv": Growing(), "buckets": Growing()} for _ in model.decoder.layers]}
    state["length"] = 0
    if model.config.layout == "encoder_decoder":
        encoder_out = model.encode(input_ids, attention_mask).repeat_interleave(num_beams, dim=0)
        state["encoder_kv"] = [layer.crossattention.project_kv(encoder_out) for layer in model.decoder.layers]
        state["encoder_mask"] = mask
        state["key_mask"] = mask.new_zeros(mask.shape[0], 0)
    else:
        state["key_mask"] = mask  # the prompt's mask; tokens appended later are real
    return state


def _prefill(model, tokens: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """The first call: the stack over all of `tokens` as `forward` runs it, keeping every layer's projections."""
    stack, L = model.decoder, tokens.shape[1]
    key_mask = state["key_mask"]
    padded = _padded_length(L, stack)
    ids = F.pad(tokens, (0, padded - L), value=model.config.pad_token_id)
    mask = None if padded == L and bool(key_mask.all()) else F.pad(key_mask, (0, padded - L), value=False)
    encoder_mask = state.get("encoder_mask")
    x1 = x2 = model.embeddings(ids)
    for i, (layer, cache) in enumerate(zip(stack.layers, state["layers"], strict=True)):
        attention = layer.attention.self_attention
        cache["weight"] = _weights(attention)
        projected = _project(attention, layer.attention.layer_norm(x2[:, :L]), cache["weight"])
        cache["kv"].append(*(projected if _is_lsh(attention) else projected[1:]))  # LSH: qk, keys, v; local: k, v
        out = layer.attention(x2, mask)
        if layer.crossattention is not None:
            out = out + layer.crossattention(x2 + out, None, encoder_mask, kv=state["encoder_kv"][i])
        x1 = x1 + out
        x2 = x2 + layer.g(x1)
    hidden = stack.layer_norm(torch.cat([x1[:, L - 1], x2[:, L - 1]], dim=-1))  # (N, 2D)
    return model.lm_head(hidden)


def _position(model, state: dict[str, Any], t: int) -> torch.Tensor:
    """Position embedding (1, D) of position t, from a table regrown (doubled) only when t passes its end."""
    table = state.get("positions")
    if table is None or t >= table.shape[0]:
        length = min(2 * (t + 1), model.config.max_positions) if t < model.config.max_positions else t + 1
        table = state["positions"] = model.embeddings.position_embeddings(length)  # raises past the table
    return table[t : t + 1]


def _step(model, token: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """One new token (N, 1) at position `state["length"]` through the cached stack -> logits (N, V)."""
    stack, t = model.decoder, state["length"]
    padded = _padded_length(t + 1, stack)
    key_mask, encoder_mask = state["key_mask"], state.get("encoder_mask")
    x1 = x2 = model.embeddings.word_embeddings(token) + _position(model, state, t)  # (N, 1, D)
    for i, (layer, cache) in enumerate(zip(stack.layers, state["layers"], strict=True)):
        attention = layer.attention
        out = _self_attention_step(attention.self_attention, attention.layer_norm(x2), cache, key_mask, padded)
        out = attention.output(out)
        if layer.crossattention is not None:
            out = out + layer.crossattention(x2 + out, None, encoder_mask, kv=state["encoder_kv"][i])
        x1 = x1 + out
        x2 = x2 + layer.g(x1)
    return model.lm_head(stack.layer_norm(torch.cat([x1[:, 0], x2[:, 0]], dim=-1)))


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """tokens (N, t) new since the last call -> logits of the last position (N, V); the caches grow by t."""
    t = tokens.shape[1]
    grown = state["length"] + t
    if state["key_mask"].shape[1] < grown:
        state["key_mask"] = F.pad(state["key_mask"], (0, grown - state["key_mask"].shape[1]), value=True)
    if state["length"] == 0:
        state["key_mask"] = state["key_mask"][:, :t]
        logits = _prefill(model, tokens, state)
        state["length"] = t
        return logits, state
    full_mask = state["key_mask"]
    for i in range(t):  # one position at a time
        state["key_mask"] = full_mask[:, : state["length"] + 1]
        logits = _step(model, tokens[:, i : i + 1], state)
        state["length"] += 1
    return logits, state


def reorder_state(state: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Keep the cache rows of the surviving beams; `rows` (N,) indexes the N rows."""
    for cache in state["layers"]:
        cache["kv"].reorder(rows)
        if cache["buckets"].parts:
            cache["buckets"].reorder(rows)
    state["key_mask"] = state["key_mask"].index_select(0, rows)
    return state
