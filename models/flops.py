"""FLOPs of one training step of each family, from the config alone (no model is built): what the matched-compute
budgets (`pipeline/budget.py`), throughput and MFU reporting use, through `FamilySpec.training_flops` and each
model's `training_flops` method. Configs are read by field name only (`T5Config`, `ReformerConfig`).
"""

from __future__ import annotations

from typing import Any


def t5_training_flops(c: Any, batch_size: int, input_len: int, target_len: int = 0) -> float:
    """FLOPs of one training step, from the config alone: 6 per weight per token it is applied to, plus the
    attention matmuls. Attention scores and the weighted sum cost 2 * Lq * Lk * I multiply-adds per layer forward,
    so 4 * Lq * Lk * I FLOPs, tripled for forward + backward (SDPA computes the full causal square)."""
    inner = c.num_heads * c.d_kv
    attn_w = 4 * c.d_model * inner  # q, k, v, o
    ff_w = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    head_w = c.d_model * c.vocab_size
    if c.layout == "encoder_decoder":
        S, T = input_len, target_len
        linear = c.num_layers * (attn_w + ff_w) * S  # encoder
        linear += c.num_decoder_layers * ((attn_w + ff_w + attn_w // 2) * T + (attn_w // 2) * S)  # cross k,v on S
        linear += head_w * T
        attention = c.num_layers * S * S + c.num_decoder_layers * (T * T + T * S)
    else:
        L = input_len + target_len
        linear = (c.num_layers * (attn_w + ff_w) + head_w) * L
        attention = c.num_layers * L * L
    return float(batch_size * (6 * linear + 12 * attention * inner))


def _layer_weights(c: Any, attn_type: str, cross: bool) -> int:
    """Multiply-adds per position of one layer's weight matrices: attention projections (LSH: shared query-key and
    value; local: query, key and value), its output, the cross-attention's (keys and values read both streams)
    and the feed-forward's."""
    inner = c.num_heads * c.d_kv
    weights = (2 if attn_type == "lsh" else 3) * c.d_model * inner + inner * c.d_model
    if cross:
        weights += c.d_model * inner + 2 * (2 * c.d_model) * inner + inner * c.d_model
    return weights + 2 * c.d_model * c.d_ff


def reformer_training_flops(c: Any, batch_size: int, input_len: int, target_len: int = 0) -> float:
    """Estimated FLOPs of one training step, from the config alone: 2 per multiply-add, backward = 2x forward, plus
    the reversible recomputation (one more forward of every layer) when `reversible`."""
    inner = c.num_heads * c.d_kv
    passes = 4 if c.reversible else 3

    def stack_flops(attn_layers: list[str], after: int | None, length: int, cross_len: int) -> float:
        total = 0.0
        for attn_type in attn_layers:
            if attn_type == "lsh":
                chunks_after = c.lsh_num_chunks_after if after is None else after
                full = c.use_full_attention or length <= c.lsh_chunk_length
                window = (1 + c.lsh_num_chunks_before + chunks_after) * c.lsh_chunk_length
                keys = length if full else window * c.n_hashes
            else:
                chunks_after = c.local_num_chunks_after if after is None else after
                full = length <= c.local_chunk_length
                keys = length if full else (1 + c.local_num_chunks_before + chunks_after) * c.local_chunk_length
            keys += cross_len
            total += length * (2 * _layer_weights(c, attn_type, cross_len > 0) + 4 * inner * keys)
        return passes * batch_size * total

    head = 6 * batch_size * 2 * c.d_model * c.vocab_size
    if c.layout == "causal_lm":
        length = input_len + target_len
        return stack_flops(c.attn_layers, None, length, 0) + head * length
    encoder = c.encoder_attn_layers or c.attn_layers
    return (
        stack_flops(encoder, c.encoder_num_chunks_after, input_len, 0)
        + stack_flops(c.attn_layers, None, target_len, input_len)
        + head * target_len
    )
