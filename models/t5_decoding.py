"""Incremental decoding for our T5 (`models/t5.py`), the protocol of `models/generation.py`.

`init_state` runs the encoder once per input and projects every decoder layer's cross-attention keys/values once;
each `decode_step` feeds the new token(s) through the decoder, whose self-attention appends their keys/values to one
`KVCache` per layer and attends to everything cached, with the position bias of the new query rows. The logits of a
step equal those of the full forward at the same position (tests/test_t5_decoding.py). Under the speed paths the
same protocol runs in its fast form (`models/fast/t5.py`: encoder over the real tokens only, keys/values once per
input rather than per beam, a table of position-bias rows, decoding's product forms).

Dimension legend: B batch, K beams, N = B * K rows, S encoder length, t new tokens, D d_model, V vocabulary.
"""

from __future__ import annotations

import torch

from models.fast import t5 as fast
from models.layers import KVCache, padded_keys
from models.settings import fast_paths


def init_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
    """Empty caches; for encoder-decoder, every layer's cross-attention keys/values of the encoder output, repeated
    for each beam; for decoder-only, the prompt's key mask (it grows by one column per decoded token)."""
    if fast_paths():
        return fast.init_decoding(model, input_ids, attention_mask, num_beams)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    state = {"caches": [KVCache() for _ in model.decoder.block], "length": 0}
    mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)  # (N, S)
    if model.config.layout != "encoder_decoder":
        state["key_mask"] = mask
        state["prefix"] = input_ids.shape[1] if model.config.layout == "prefix_lm" else None
        return state
    memory = model.encode(input_ids, attention_mask).repeat_interleave(num_beams, dim=0)  # (N, S, D)
    state["memory_kv"] = [block.layer[1].EncDecAttention.project_kv(memory) for block in model.decoder.block]
    state["cross_hidden"] = padded_keys(mask)
    return state


def step_masks(state: dict, t: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Decoder-only: the key mask (N, length + t), the prompt's padding then real tokens, and the prefix lengths (N,)
    of a prefix LM (else None); encoder-decoder: (None, None)."""
    if "key_mask" not in state:
        return None, None
    key_mask, grown = state["key_mask"], state["length"] + t
    if key_mask.shape[1] < grown:
        key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], grown - key_mask.shape[1])], dim=1)
        state["key_mask"] = key_mask
    if state["prefix"] is None:
        return key_mask, None
    return key_mask, torch.full((key_mask.shape[0],), state["prefix"], device=key_mask.device)


def decode_step(model, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
    """tokens (N, t) new since the last call -> logits of the last position (N, V), updated state."""
    offset, t = state["length"], tokens.shape[1]
    key_mask, prefix = step_masks(state, t)
    if fast_paths():
        return fast.decode_step(model, tokens, state, key_mask, prefix)
    bias, hidden = model.decoder.self_mask(t, offset + t, offset, key_mask, True, prefix)
    kvs, caches, cross_hidden = state.get("memory_kv"), state["caches"], state.get("cross_hidden")
    h = model.decoder(model.shared(tokens), bias, hidden, None, cross_hidden, kvs, caches)  # (N, t, D)
    state["length"] = offset + t
    return model.logits(h[:, -1]), state


def reorder_state(state: dict, beam_idx: torch.Tensor) -> dict:
    """Keep the cache rows of the surviving beams (`beam_idx` (N,) indexes the rows); the rest of the state is the
    same for every beam of an input."""
    for cache in state["caches"]:
        cache.reorder(beam_idx)
    return state
