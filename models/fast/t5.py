"""The speed paths of our T5 (`models/t5.py`, `models/t5_decoding.py`): each function takes the reference module (or
model) as its first argument and stands in for the method of the same name when `paths="fast"`, computing the same
numbers within rounding (tests/test_fast_t5.py).

- `forward`, `encode`: tied embeddings with one gradient tensor (`models.fast.tied`); in inference, an encoder over
  the real tokens of a padded batch only (`unpadded_spans`, `forward_unpadded`);
- `project_qkv`, `project_kv`: q, k, v (or k, v) in one product in training, from a stacked copy of the
  weights in inference, heads split so that their gradient is one buffer (`models.fast.attention`);
- `masks`, `attend`: on CPU with autograd, attention differentiated by hand (`BiasedAttention`) with the position
  bias and the hidden keys apart; the beams of an input share its encoder keys/values in beam search;
- `relu_feed_forward`, `gated_feed_forward`: one product for both gated inputs, dropout + relu in one pass, the
  1 / (1 - p) rescale on the (B, L, D) output;
- `init_decoding`, `decode_step`: cross-attention keys/values once per input (not per beam), the position bias of a
  step sliced from a table, decoding's product forms (`models.fast.products.decoding`).

Dimension legend: as in models/t5.py; R real (unpadded) tokens of a batch, K beams per input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.fast.attention import BiasedAttention, split_heads
from models.fast.products import copy_of, decoding, dense, linear
from models.fast.tied import Tied, dropped_relu_, tie
from models.layers import KVCache, additive_mask, drop_mask, padded_keys


def _use_math(backend: str, x: torch.Tensor) -> bool:
    """`BiasedAttention` rather than SDPA: when asked for (`eager`), or on CPU with autograd recording, where SDPA has
    no fused kernel that takes dropout or a mask needing a gradient and runs its unfused math through autograd."""
    return backend == "eager" or (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad)


# ---- the model ----


def _embed(model, ids: torch.Tensor, tied: Tied | None) -> torch.Tensor:
    return model.shared(ids) if tied is None else tied.lookup(ids)


def _logits(model, h: torch.Tensor, tied: Tied | None) -> torch.Tensor:
    return model.logits(h) if tied is None else tied.project(h * model.config.d_model**-0.5)


def forward(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, prefix_lengths):
    """`T5Model.forward` (arguments checked there)."""
    c = model.config
    tied = tie(model.shared.weight) if c.tie_word_embeddings else None  # embeddings and logits share one gradient
    if c.layout != "encoder_decoder":
        L = input_ids.shape[1]
        masks = model.decoder.self_mask(L, L, key_mask=attention_mask, causal=True, prefix=prefix_lengths)
        return _logits(model, model.decoder(_embed(model, input_ids, tied), *masks), tied)
    memory = encode(model, input_ids, attention_mask, tied)
    T = decoder_input_ids.shape[1]
    bias, hidden = model.decoder.self_mask(T, T, key_mask=decoder_attention_mask, causal=True)
    h = model.decoder(_embed(model, decoder_input_ids, tied), bias, hidden, memory, padded_keys(attention_mask))
    return _logits(model, h, tied)


def encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tied: Tied | None = None):
    """`T5Model.encode`: (B, S) -> (B, S, D); in inference over the real tokens only (padded positions: zeros)."""
    S = input_ids.shape[1]
    spans = unpadded_spans(model, input_ids, attention_mask)
    if spans is not None:
        real = attention_mask.bool()
        h = _encode_packed(model, input_ids, real, spans, tied)
        return h.new_zeros(*input_ids.shape, h.shape[-1]).index_put_((real,), h)
    return model.encoder(_embed(model, input_ids, tied), *model.encoder.self_mask(S, S, key_mask=attention_mask))


def _encode_packed(model, input_ids, real, spans, tied: Tied | None = None) -> torch.Tensor:
    """The encoder output of the real tokens `real` (B, S) only, packed item after item: (R, D)."""
    S = input_ids.shape[1]
    bias = model.encoder.position_bias(S, S)
    return forward_unpadded(model.encoder, _embed(model, input_ids[real], tied), spans, bias)


def unpadded_spans(model, input_ids, attention_mask) -> list[tuple[int, int, slice | torch.Tensor]] | None:
    """Where the real tokens of each item lie once packed (`forward_unpadded`), or None to run the padded batch: the
    unpadded encoder is for CPU inference (eval, no autograd, SDPA backend, not compiled) of a batch with padding in
    which every item has a real token. Padded positions cost the full matmuls of every layer in the padded batch,
    for outputs that nothing reads (cross-attention masks them), so skipping them saves their share of the encoder;
    on GPU the per-item attention calls would cost more launches than that. The encoder output at padded positions
    is then zero rather than a value computed from the real tokens."""
    if (
        attention_mask is None
        or model.training
        or torch.is_grad_enabled()
        or input_ids.device.type != "cpu"
        or model.config.attention_backend != "sdpa"
        or model.config.layout != "encoder_decoder"
        or torch.compiler.is_compiling()
    ):
        return None
    real = attention_mask.bool()
    lengths = real.sum(1)
    if bool(real.all()) or not bool(lengths.all()):  # no padding, or an item of padding only
        return None
    S = real.shape[1]
    first = real.to(torch.uint8).argmax(1)
    last = S - 1 - real.flip(1).to(torch.uint8).argmax(1)
    spans, start = [], 0
    for b, (n, lo, hi) in enumerate(zip(lengths.tolist(), first.tolist(), last.tolist(), strict=True)):
        pos = slice(lo, hi + 1) if hi - lo + 1 == n else real[b].nonzero()[:, 0]
        spans.append((start, start + n, pos))
        start += n
    return spans


def forward_unpadded(stack, h: torch.Tensor, spans: list[tuple[int, int, slice | torch.Tensor]], bias: torch.Tensor):
    """Inference over the real tokens only: h (R, D), the R real tokens of a batch packed item after item, item b in
    rows spans[b][0]:spans[b][1] with its positions spans[b][2] (a slice when they are consecutive, else their
    indices) -> (R, D). Row-wise work (norms, projections, feed-forward) runs on the R rows instead of B * S; each
    item attends within its own rows, under its slice of the (1, H, S, S) position bias, with no padding to mask."""
    n_heads, d_kv = stack.config.num_heads, stack.config.d_kv
    inner = n_heads * d_kv
    biases, masks = {}, []  # one (1, H, n, n) bias per distinct span of positions, shared by all layers
    for _, _, pos in spans:
        key = (pos.start, pos.stop) if isinstance(pos, slice) else tuple(pos.tolist())
        if key not in biases:
            cut = bias[:, :, pos, pos] if isinstance(pos, slice) else bias[:, :, pos][:, :, :, pos]
            biases[key] = cut.contiguous()
        masks.append(biases[key])
    for block in stack.block:
        layer = block.layer[0]
        attn = layer.SelfAttention
        qkv = linear(layer.layer_norm(h), stacked_qkv(attn))  # (R, 3 * I)
        out = h.new_empty(h.shape[0], inner)
        for (start, end, _), mask in zip(spans, masks, strict=True):
            n = end - start
            q, k, v = (
                qkv[start:end, j * inner : (j + 1) * inner].view(n, n_heads, d_kv).transpose(0, 1)[None]
                for j in range(3)
            )  # (1, H, n, Dk) views of the packed rows, no copies
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            out[start:end].view(n, n_heads, d_kv).copy_(o[0].transpose(0, 1))
        h = h + linear(out, attn.o.weight)
        h = block.layer[-1](h)
    return stack.final_layer_norm(h)


# ---- attention ----


def stacked_qkv(attn) -> torch.Tensor:
    """q, k and v weights stacked (3 * I, D), for inference: one product per layer and step instead of three (each a
    pass over the threads, which waits for every thread at its end). A copy kept while the weights are current
    (`models.fast.products.copy_of`), not a parameter or buffer: checkpoints and optimizers never see it."""
    return copy_of((attn.q.weight, attn.k.weight, attn.v.weight), "stacked", lambda *w: torch.cat(w))


def heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(B, L, I) -> (B, H, L, Dk), its gradient handed back as one buffer."""
    return split_heads(x, 1, attn.n_heads)[0]


def project_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`T5Attention.project_qkv`: (B, L, D) -> 3 x (B, H, L, Dk)."""
    if attn.training:  # one product beats three on the big activation
        return split_heads(dense(x, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight])), 3, attn.n_heads)
    if not torch.is_grad_enabled():  # inference: the stacked weights, kept between calls
        return split_heads(linear(x, stacked_qkv(attn)), 3, attn.n_heads)
    # eval with autograd (gradients wrt inputs or weights): three products, so gradients reach the weights
    q, k, v = (heads(attn, linear(x, w.weight)) for w in (attn.q, attn.k, attn.v))
    return q, k, v


def project_kv(attn, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`T5Attention.project_kv`: (B, S, D) -> 2 x (B, H, S, Dk)."""
    if attn.training:
        return split_heads(dense(memory, torch.cat([attn.k.weight, attn.v.weight])), 2, attn.n_heads)
    return heads(attn, linear(memory, attn.k.weight)), heads(attn, linear(memory, attn.v.weight))


def masks(stack, bias, hidden, cross_hidden, h: torch.Tensor):
    """The self- and cross-attention masks of `T5Stack.forward` as `attend` takes them: (bias, hidden) pairs for
    `BiasedAttention`, which adds the (1, H, Lq, Lk) bias and hides keys by a bool mask (no (B, H, Lq, Lk) tensor);
    for SDPA / FlexAttention one additive mask each, merged once per stack."""
    if _use_math(stack.config.attention_backend, h):
        return (bias, hidden), (None, cross_hidden)
    return additive_mask(bias, hidden, h.dtype), additive_mask(None, cross_hidden, h.dtype)


def attend(attn, q, k, v, mask) -> torch.Tensor:
    """`T5Attention.attend`: q (N, H, Lq, Dk), k/v (B, H, Lk, Dk), mask from `masks` -> (N, Lq, D). Beam search (N = K
    * B): the K beams of an input share its encoder keys/values (kept once per input, not per beam), so their
    queries are rows of one attention: (N, H, Lq, Dk) -> (B, H, K * Lq, Dk)."""
    N, H, Lq, Dk = q.shape
    B = k.shape[0]
    if B != N:
        q = q.view(B, N // B, H, Lq, Dk).transpose(1, 2).reshape(B, H, N // B * Lq, Dk)
        return attend(attn, q, k, v, mask).view(N, Lq, -1)  # rows back in (beam, position) order
    bias, hidden = mask if isinstance(mask, tuple) else (mask, None)
    if _use_math(attn.backend, q):
        out = BiasedAttention.apply(q, k, v, bias, hidden, attn.dropout if attn.training else 0.0)
    else:
        out = attn.attention(q, k, v, additive_mask(bias, hidden, q.dtype))
    return linear(out.transpose(1, 2).reshape(N, Lq, H * Dk), attn.o.weight)


# ---- feed-forward ----


def relu_feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """`T5DenseActDense.forward`: dropout before relu (they commute): one (B, L, F) tensor kept for relu and wo, and
    the 1 / (1 - p) rescale on the (B, L, D) output."""
    h = linear(x, ff.wi.weight)  # (B, L, F); in-place ops below are safe: the product does not keep its output
    if not ff.training or ff.dropout == 0.0:
        return linear(h.relu_(), ff.wo.weight)
    drop, scale = drop_mask(h, ff.dropout)
    return linear(dropped_relu_(h, drop), ff.wo.weight).mul_(scale)


def _gelu_new(x: torch.Tensor, fused: bool) -> torch.Tensor:
    """GELU, tanh approximation (the reference's "gelu_new"). Eval spells out `transformers`' formula so logits
    match it bit for bit; training uses the fused kernel (same function, <= 5e-7 rounding difference, less memory)."""
    if fused:
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gated_feed_forward(ff, x: torch.Tensor) -> torch.Tensor:
    """`T5DenseGatedActDense.forward`: both input projections in one product in training."""
    if ff.training:
        gate, up = dense(x, torch.cat([ff.wi_0.weight, ff.wi_1.weight])).chunk(2, dim=-1)
    else:
        gate, up = linear(x, ff.wi_0.weight), linear(x, ff.wi_1.weight)
    h = _gelu_new(gate, ff.training) * up  # (B, L, F)
    if not ff.training or ff.dropout == 0.0:
        return linear(h, ff.wo.weight)
    drop, scale = drop_mask(h, ff.dropout)
    return linear(h.masked_fill_(drop, 0.0), ff.wo.weight).mul_(scale)


# ---- decoding ----


def init_decoding(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
    """`models.t5_decoding.init_state`: the encoder over the real tokens, every layer's cross-attention keys/values
    projected once per input (the beams of an input attend to them together, `attend`)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)  # (N, S)
    state = {"caches": [KVCache() for _ in model.decoder.block], "length": 0}
    if model.config.layout != "encoder_decoder":
        state["key_mask"] = attention_mask  # grows by one column per decoded token
        state["prefix"] = input_ids.shape[1] if model.config.layout == "prefix_lm" else None
        return state
    real = attention_mask[::num_beams]  # once per input, not per beam
    spans = unpadded_spans(model, input_ids, real)
    if spans is None:
        memory = encode(model, input_ids, real)  # (B, S, D)
        kvs = [project_kv(b.layer[1].EncDecAttention, memory) for b in model.decoder.block]
        state["memory_kv"] = [(k.contiguous(), v.contiguous()) for k, v in kvs]  # read at every step
    else:  # the real tokens only, through the encoder and the cross-attention projections
        h = _encode_packed(model, input_ids, real, spans)
        state["memory_kv"] = [_scatter_kv(b.layer[1].EncDecAttention, h, real) for b in model.decoder.block]
    state["cross_hidden"] = padded_keys(real)
    return state


def _scatter_kv(attn, h: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys/values (B, H, S, Dk) of the packed real rows h (R, D) of an encoder output: each
    projection written head-major into its place; padded keys stay zero (masked, they add exactly 0)."""
    B, S = real.shape
    out = []
    for w in (attn.k.weight, attn.v.weight):
        buf = h.new_zeros(B, attn.n_heads, S, attn.d_kv)
        buf.transpose(1, 2)[real] = linear(h, w).view(h.shape[0], attn.n_heads, attn.d_kv)
        out.append(buf)
    return out[0], out[1]


def position_bias_row(stack, offset: int, k_len: int, rows: dict) -> torch.Tensor:
    """`stack.position_bias(1, k_len, offset)`, the bias of one query over keys 0 .. k_len - 1, for decoding: a slice
    of a table of every relative position in (-capacity, capacity) that `rows` (the decoding state's) keeps, built
    once and rebuilt twice as wide when outgrown, so a decoding step does no bucketing or lookup."""
    capacity = rows.get("capacity", 0)
    if max(offset + 1, k_len) > capacity:
        capacity = max(64, 2 * max(offset + 1, k_len))
        device = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.device
        relative = torch.arange(1 - capacity, capacity, device=device)  # key - query
        rows["capacity"], rows["table"] = capacity, stack.relative_bias(relative).T.contiguous()  # (H, 2 * cap - 1)
    start = capacity - 1 - offset  # the column of key 0 (relative position -offset)
    return rows["table"][None, :, None, start : start + k_len].contiguous()  # (1, H, 1, Lk)


def decode_step(model, tokens: torch.Tensor, state: dict, key_mask, prefix) -> tuple[torch.Tensor, dict]:
    """`models.t5_decoding.decode_step` (which gives `key_mask` and `prefix`): a one-token step's position bias from
    the state's table (`position_bias_row`), its products in the forms `decoding="shaped"` asks for."""
    offset, t = state["length"], tokens.shape[1]
    stack = model.decoder
    bias = position_bias_row(stack, offset, offset + t, state.setdefault("bias_rows", {})) if t == 1 else None
    bias, hidden = stack.self_mask(t, offset + t, offset, key_mask, True, prefix, bias)
    kvs, caches, cross_hidden = state.get("memory_kv"), state["caches"], state.get("cross_hidden")
    with decoding():
        h = stack(model.shared(tokens), bias, hidden, None, cross_hidden, kvs, caches)
        logits = model.logits(h[:, -1])
    state["length"] = offset + t
    return logits, state
