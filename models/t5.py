"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer")
and its v1.1 revision, in plain PyTorch.

Parameter names follow `transformers`' T5 (`shared`, `encoder.block.0.layer.0.SelfAttention.q`, ...) so that
weight conversion (`models/hf/t5.py`) is a table. Layouts: encoder-decoder, and the decoder-only causal LM and
prefix LM of the paper's Table 2 (one stack, named `decoder`, without cross-attention).

Dimension legend:
    B batch, N batch * beams, S encoder (source) length, T decoder (target) length, Lq / Lk query / key length,
    D d_model, H heads, Dk d_kv (per-head size), I = H * Dk (inner attention size), F d_ff, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import generation
from models.common import (
    BiasedAttention,
    KVCache,
    Tied,
    TiedEmbedding,
    decoding,
    dense,
    drop_mask,
    dropout,
    dropped_relu_,
    linear,
    neg_inf,
    split_heads,
    weight_state,
)

LAYOUTS = ("encoder_decoder", "causal_lm", "prefix_lm")
FEED_FORWARD = ("relu", "gated-gelu")
BACKENDS = ("sdpa", "flex", "eager")

_V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True, dropout_rate=0.1)  # paper (v1.0)
_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)  # v1.1: no pretraining dropout
PRESETS: dict[str, dict] = {
    # CPU default pipeline: a few hundred steps at length 128 in about a minute on two cores.
    "tiny": dict(_V10, vocab_size=8192, d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
    "small": dict(_V10, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),  # ~60M
    "base": dict(_V10, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),  # ~220M
    "large": dict(_V10, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),  # ~770M
    "3b": dict(_V10, d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "11b": dict(_V10, d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
    "v1_1-small": dict(_V11, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6),
    "v1_1-base": dict(_V11, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "v1_1-large": dict(_V11, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
    "v1_1-xl": dict(_V11, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "v1_1-xxl": dict(_V11, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


@dataclass
class T5Config:
    """Hyper-parameters of T5; field names are those of `transformers.T5Config` where they exist."""

    vocab_size: int = 32128  # set by the pipeline from the tokenizer
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # size of one attention head
    d_ff: int = 2048  # hidden size of the feed-forward block
    num_layers: int = 6  # encoder layers (encoder-decoder) or the single stack's layers (decoder-only)
    num_decoder_layers: int | None = None  # decoder layers; None means the same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32  # position buckets shared by all layers of a stack
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    dropout_rate: float = 0.1  # paper: 0.1 everywhere (v1.1 pretraining: 0.0)
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0  # scales every init std (as in the reference)
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1)
    tie_word_embeddings: bool = True  # v1.0: output = input embedding, decoder output scaled by d_model**-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    layout: str = "encoder_decoder"  # "encoder_decoder" | "causal_lm" | "prefix_lm"
    gradient_checkpointing: bool = False  # recompute each block in backward (activation checkpointing)
    attention_backend: str = "sdpa"  # "sdpa" | "flex" (GPU FlexAttention with a score_mod) | "eager"

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        problems = []
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.relative_attention_num_buckets < 4:
            problems.append(f"relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            problems.append("relative_attention_max_distance must exceed relative_attention_num_buckets // 4")
        if not 0.0 <= self.dropout_rate < 1.0:
            problems.append(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.layer_norm_epsilon <= 0:
            problems.append(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        for name, allowed in (
            ("layout", LAYOUTS),
            ("feed_forward_proj", FEED_FORWARD),
            ("attention_backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if isinstance(self.vocab_size, int) and not 0 <= value < self.vocab_size:
                problems.append(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if problems:
            raise ValueError("invalid T5Config: " + "; ".join(problems))

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> T5Config:
        if name not in PRESETS:
            raise ValueError(f"unknown T5 preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown T5Config keys: {', '.join(unknown)}")
        return cls(**d)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """Map `key_pos - query_pos` to a bucket (paper section 2.1; Mesh TensorFlow's bucketing).

    Half the buckets (per direction when bidirectional) are exact small distances, the other half grow
    logarithmically up to `max_distance`; farther distances share the last bucket. In the causal case keys
    after the query (positive distances) all fall into bucket 0.
    """
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        offset = 0
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log(distance / max_exact) / log(max_distance / max_exact) spans [0, 1) over [max_exact, max_distance)
    scaled = torch.log(distance.float().clamp(min=1.0) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, far)


def _all_true(mask: torch.Tensor) -> bool:
    """Whether a padding mask masks nothing (skips the mask); under torch.compile always False (no graph break)."""
    return not torch.compiler.is_compiling() and bool(mask.all())


def _merge(bias: torch.Tensor | None, hidden: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """One additive mask for SDPA: `bias` (1, H, Lq, Lk) with the keys `hidden` (B or 1, 1, Lq or 1, Lk) set to -inf."""
    if hidden is None:
        return bias
    if bias is None:
        return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, neg_inf(dtype))
    return bias.masked_fill(hidden, neg_inf(dtype)).contiguous()


def _use_math(backend: str, x: torch.Tensor) -> bool:
    """Our own attention (`BiasedAttention`) rather than SDPA: when asked for, or on CPU with autograd recording.

    There SDPA has no fused kernel that takes dropout or a mask needing a gradient (the position bias), so it runs
    its unfused math through autograd: a merged (B, H, Lq, Lk) mask per stack, float dropout noise, and a fresh
    (B, H, Lq, Lk) tensor for every step forward and backward.
    """
    return backend == "eager" or (x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad)


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction and no bias (paper section 3.1.1)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(Dk) scaling (folded into the init of `q`, as in Mesh TensorFlow)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        self.backend = config.attention_backend
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:  # only in the first layer of a stack; the others reuse its bias
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self._qkv: tuple[tuple, torch.Tensor] | None = None  # inference's stacked q, k, v weights (`_stacked_qkv`)

    def _stacked_qkv(self) -> torch.Tensor:
        """q, k and v weights stacked (3 * I, D), for inference: one matmul per layer and step instead of three (each
        a pass over the threads, which waits for every thread at its end). Built on first use and rebuilt when any
        of the three may have changed (`weight_state`: new storage, a version bump, or any optimizer step since);
        it is a plain attribute, not a parameter or buffer, so checkpoints and optimizers never see it."""
        weights = (self.q.weight, self.k.weight, self.v.weight)
        key = tuple(weight_state(w) for w in weights)
        if self._qkv is None or self._qkv[0] != key:
            self._qkv = (key, torch.cat(weights).detach())
        return self._qkv[1]

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        # (B, L, n * I) -> n tensors (B, H, L, Dk)
        return split_heads(x, n, self.n_heads)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections (B, L, D) -> 3 x (B, H, L, Dk)."""
        if self.training:  # training: one fused matmul beats three on the big activation
            return self._heads(dense(x, torch.cat([self.q.weight, self.k.weight, self.v.weight])), 3)
        if not torch.is_grad_enabled():  # inference: the stacked weights, kept between calls
            return self._heads(linear(x, self._stacked_qkv()), 3)
        # eval with autograd (gradients wrt inputs or weights): three matmuls, so gradients reach the weights
        q, k, v = (self._heads(linear(x, w.weight), 1)[0] for w in (self.q, self.k, self.v))
        return q, k, v

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the encoder output (B, S, D) -> 2 x (B, H, S, Dk)."""
        if self.training:
            return self._heads(dense(memory, torch.cat([self.k.weight, self.v.weight])), 2)
        return self._heads(linear(memory, self.k.weight), 1)[0], self._heads(linear(memory, self.v.weight), 1)[0]

    def attend(self, q, k, v, bias: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, Lq, Dk), k/v (B, H, Lk, Dk), additive bias (1 or B, H, Lq, Lk), hidden keys bool -> (B, Lq, D)."""
        p = self.dropout if self.training else 0.0
        if _use_math(self.backend, q):
            out = BiasedAttention.apply(q, k, v, bias, hidden, p)
        elif self.backend == "flex" and q.is_cuda:
            out = _flex_attention(q, k, v, _merge(bias, hidden, q.dtype))
        else:
            mask = _merge(bias, hidden, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        B, H, Lq, Dk = out.shape
        return linear(out.transpose(1, 2).reshape(B, Lq, H * Dk), self.o.weight)


def _flex_attention(q, k, v, mask):
    """FlexAttention with the position bias + padding mask added by a score_mod (GPU; compiled by the caller)."""
    from torch.nn.attention.flex_attention import flex_attention

    if mask is None:
        return flex_attention(q, k, v, scale=1.0)
    bias = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, scale=1.0)


class T5DenseActDense(nn.Module):
    """v1.0 feed-forward: wo(dropout(relu(wi x)))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.wi.weight)  # (B, L, F); in-place ops below are safe: the matmul does not keep its output
        if not self.training or self.dropout == 0.0:
            return linear(h.relu_(), self.wo.weight)
        # dropout before relu (they commute): one (B, L, F) tensor kept for relu and wo; 1 / (1 - p) on (B, L, D)
        drop, scale = drop_mask(h, self.dropout)
        return linear(dropped_relu_(h, drop), self.wo.weight).mul_(scale)


def _gelu_new(x: torch.Tensor, fused: bool) -> torch.Tensor:
    """GELU, tanh approximation (the reference's "gelu_new"). Eval spells out the reference's formula so logits
    match it bit for bit; training uses the fused kernel (same function, <= 5e-7 rounding difference, less memory).
    """
    if fused:
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5DenseGatedActDense(nn.Module):
    """v1.1 feed-forward (Shazeer 2020, GEGLU): wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # one matmul for both input projections
            gate, up = dense(x, torch.cat([self.wi_0.weight, self.wi_1.weight])).chunk(2, dim=-1)
        else:
            gate, up = linear(x, self.wi_0.weight), linear(x, self.wi_1.weight)
        h = _gelu_new(gate, self.training) * up  # (B, L, F)
        if not self.training or self.dropout == 0.0:
            return linear(h, self.wo.weight)
        drop, scale = drop_mask(h, self.dropout)
        return linear(h.masked_fill_(drop, 0.0), self.wo.weight).mul_(scale)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h, bias, hidden, cache: KVCache | None = None):
        attn = self.SelfAttention
        q, k, v = attn.project_qkv(self.layer_norm(h))  # pre-norm residual block
        if cache is not None:  # incremental decoding: this step's keys/values join the cached ones
            k, v = cache.append(k, v)
        return h + dropout(attn.attend(q, k, v, bias, hidden), self.dropout, self.training)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h, memory_kv, bias, hidden):
        attn = self.EncDecAttention
        q = attn._heads(linear(self.layer_norm(h), attn.q.weight), 1)[0]  # (N, H, Lq, Dk)
        N, H, Lq, Dk = q.shape
        B = memory_kv[0].shape[0]
        if B == N:
            return h + dropout(attn.attend(q, *memory_kv, bias, hidden), self.dropout, self.training)
        # beam search: the K = N / B beams of an input share its encoder keys/values (kept once per input, not per
        # beam), so their queries are rows of one attention: (N, H, Lq, Dk) -> (B, H, K * Lq, Dk)
        q = q.view(B, N // B, H, Lq, Dk).transpose(1, 2).reshape(B, H, N // B * Lq, Dk)
        out = attn.attend(q, *memory_kv, bias, hidden).view(N, Lq, -1)  # rows back in (beam, position) order
        return h + dropout(out, self.dropout, self.training)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h):
        return h + dropout(self.DenseReluDense(self.layer_norm(h)), self.dropout, self.training)


class T5Block(nn.Module):
    """Self-attention, [cross-attention,] feed-forward; `layer` indices as in the reference."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, has_cross_attention: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if has_cross_attention:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, h, bias, hidden, memory=None, memory_kv=None, cross_bias=None, cross_hidden=None, cache=None):
        h = self.layer[0](h, bias, hidden, cache)
        if len(self.layer) == 3:
            if memory_kv is None:  # training: project the encoder output here (checkpointed with the block)
                memory_kv = self.layer[1].EncDecAttention.project_kv(memory)
            h = self.layer[1](h, memory_kv, cross_bias, cross_hidden)
        return self.layer[-1](h)


class T5Stack(nn.Module):
    """A stack of blocks with one relative position bias, computed once and shared by all its layers."""

    def __init__(self, config: T5Config, num_layers: int, has_cross_attention: bool, bidirectional: bool):
        super().__init__()
        self.config, self.bidirectional = config, bidirectional
        self.block = nn.ModuleList([T5Block(config, i == 0, has_cross_attention) for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def position_bias(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """(1, H, Lq, Lk) bias for queries at positions offset .. offset + Lq - 1 and keys at 0 .. Lk - 1."""
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        device = table.weight.device
        relative = (
            torch.arange(k_len, device=device)[None, :] - torch.arange(offset, offset + q_len, device=device)[:, None]
        )
        c = self.config
        buckets = relative_position_bucket(
            relative, self.bidirectional, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        return table(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()  # contiguous: read once per layer

    def position_bias_row(self, offset: int, k_len: int, rows: dict) -> torch.Tensor:
        """`position_bias(1, k_len, offset)`, the bias of one query over keys 0 .. k_len - 1, for decoding: a slice of
        a table of every relative position in (-capacity, capacity) that `rows` (the decoding state's) keeps, built
        once and rebuilt twice as wide when outgrown, so a decoding step does no bucketing or lookup."""
        capacity = rows.get("capacity", 0)
        if max(offset + 1, k_len) > capacity:
            capacity = max(64, 2 * max(offset + 1, k_len))
            table = self.block[0].layer[0].SelfAttention.relative_attention_bias
            relative = torch.arange(1 - capacity, capacity, device=table.weight.device)  # key - query
            c = self.config
            buckets = relative_position_bucket(
                relative, self.bidirectional, c.relative_attention_num_buckets, c.relative_attention_max_distance
            )
            rows["capacity"], rows["table"] = capacity, table(buckets).T.contiguous()  # (H, 2 * capacity - 1)
        start = capacity - 1 - offset  # the column of key 0 (relative position -offset)
        return rows["table"][None, :, None, start : start + k_len].contiguous()  # (1, H, 1, Lk)

    def self_mask(self, q_len, k_len, offset=0, key_mask=None, causal=False, prefix=None, rows=None):
        """(bias, hidden): the position bias (1, H, Lq, Lk), with keys after the query at -inf (dtype min) when
        `causal`, and the keys each query may not see, bool (B or 1, 1, Lq or 1, Lk), or None when there are none.

        `key_mask` (B, Lk) marks real keys; `prefix` (B,) lengths of the bidirectional prefix (prefix LM): then the
        causal pattern depends on the row and goes into `hidden`. Batch-free masks stay in the (1, H, Lq, Lk) bias so
        no (B, H, Lq, Lk) tensor is built per stack. `rows`: a decoding state's table for `position_bias_row`.
        """
        if rows is not None and q_len == 1:  # one query (a decoding step): slice the table of this decoding
            bias = self.position_bias_row(offset, k_len, rows)
        else:
            bias = self.position_bias(q_len, k_len, offset)  # (1, H, Lq, Lk)
        hidden = None
        if causal and (q_len > 1 or prefix is not None):
            device = bias.device
            k_pos, q_pos = torch.arange(k_len, device=device), torch.arange(offset, offset + q_len, device=device)
            future = k_pos[None, :] > q_pos[:, None]  # (Lq, Lk)
            if prefix is None:
                bias = bias.masked_fill(future, neg_inf(bias.dtype))
            else:
                in_prefix = k_pos < prefix.to(device)[:, None]  # (B, Lk)
                hidden = (future & ~in_prefix[:, None, :])[:, None]  # (B, 1, Lq, Lk)
        if key_mask is not None and not _all_true(key_mask):
            padding = ~key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
            hidden = padding if hidden is None else hidden | padding
        return bias, hidden

    def forward(self, h, bias, hidden, memory=None, cross_hidden=None, memory_kvs=None, caches=None, cross_bias=None):
        """h (B, L, D) embeddings -> (B, L, D) hidden states; `caches` (one `KVCache` per layer) when decoding.

        `cross_bias`: `cross_hidden` already merged into an additive mask (decoding merges it once per input)."""
        h = dropout(h, self.dropout, self.training)
        if not _use_math(self.config.attention_backend, h):  # SDPA / FlexAttention take one mask: merge once here
            bias, hidden = _merge(bias, hidden, h.dtype), None
            if cross_bias is None or cross_bias.dtype != h.dtype:
                cross_bias = _merge(None, cross_hidden, h.dtype)
            cross_hidden = None
        else:
            cross_bias = None
        for i, block in enumerate(self.block):
            args = (h, bias, hidden, memory, None if memory_kvs is None else memory_kvs[i], cross_bias, cross_hidden)
            cache = None if caches is None else caches[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, *args, cache, use_reentrant=False)
            else:
                h = block(*args, cache)
        return dropout(self.final_layer_norm(h), self.dropout, self.training)

    def forward_unpadded(self, h: torch.Tensor, spans: list[tuple[int, int, slice | torch.Tensor]], bias):
        """Inference over the real tokens only: h (R, D), the R real tokens of a batch packed item after item, item
        b in rows spans[b][0]:spans[b][1] with its positions spans[b][2] (a slice when they are consecutive, else
        their indices) -> (R, D). Row-wise work (norms, projections, feed-forward) runs on the R rows instead of
        B * S; each item attends within its own rows, under its slice of the (1, H, S, S) position bias, with no
        padding to mask. For a bidirectional stack without dropout or autograd (`T5Model.encode` decides)."""
        n_heads, d_kv = self.config.num_heads, self.config.d_kv
        inner = n_heads * d_kv
        biases, masks = {}, []  # one (1, H, n, n) bias per distinct span of positions, shared by all layers
        for _, _, pos in spans:
            key = (pos.start, pos.stop) if isinstance(pos, slice) else tuple(pos.tolist())
            if key not in biases:
                cut = bias[:, :, pos, pos] if isinstance(pos, slice) else bias[:, :, pos][:, :, :, pos]
                biases[key] = cut.contiguous()
            masks.append(biases[key])
        for block in self.block:
            layer = block.layer[0]
            attn = layer.SelfAttention
            qkv = linear(layer.layer_norm(h), attn._stacked_qkv())  # (R, 3 * I)
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
        return self.final_layer_norm(h)


class T5Model(generation.GenerationMixin, nn.Module):
    """T5 encoder-decoder, or decoder-only causal / prefix LM; `forward` returns logits (no loss inside)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        c = config
        # tied (v1.0): the output projection too, one gradient tensor for both uses in training (`TiedEmbedding`)
        self.shared = (TiedEmbedding if c.tie_word_embeddings else nn.Embedding)(c.vocab_size, c.d_model)
        if c.layout == "encoder_decoder":
            self.encoder = T5Stack(c, c.num_layers, has_cross_attention=False, bidirectional=True)
            self.decoder = T5Stack(c, c.num_decoder_layers, has_cross_attention=True, bidirectional=False)
        else:  # prefix LM: bidirectional buckets (the prefix sees both ways), causal mask after the prefix
            self.decoder = T5Stack(c, c.num_layers, has_cross_attention=False, bidirectional=c.layout == "prefix_lm")
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal init with the reference's per-kind std (Mesh TensorFlow), scaled by `initializer_factor`."""
        c, f = self.config, self.config.initializer_factor
        if isinstance(module, T5LayerNorm):
            module.weight.fill_(f)
        elif isinstance(module, T5Model):
            module.shared.weight.normal_(0.0, f)
            if hasattr(module, "lm_head"):
                module.lm_head.weight.normal_(0.0, f)
        elif isinstance(module, (T5DenseActDense, T5DenseGatedActDense)):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    getattr(module, name).weight.normal_(0.0, f * c.d_model**-0.5)
            module.wo.weight.normal_(0.0, f * c.d_ff**-0.5)
        elif isinstance(module, T5Attention):
            module.q.weight.normal_(0.0, f * (c.d_model * c.d_kv) ** -0.5)  # replaces the 1/sqrt(Dk) logit scale
            module.k.weight.normal_(0.0, f * c.d_model**-0.5)
            module.v.weight.normal_(0.0, f * c.d_model**-0.5)
            module.o.weight.normal_(0.0, f * (c.num_heads * c.d_kv) ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                module.relative_attention_bias.weight.normal_(0.0, f * c.d_model**-0.5)

    def logits(self, h: torch.Tensor, tied: Tied | None = None) -> torch.Tensor:
        """Output projection (…, D) -> (…, V); tied embeddings rescale by d_model**-0.5 (Mesh TensorFlow)."""
        if self.config.tie_word_embeddings:
            return self.shared.project(h * self.config.d_model**-0.5, tied)
        return linear(h, self.lm_head.weight)

    @staticmethod
    def _padding(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, S) 1 = real -> padded keys (B, 1, 1, S) bool, or None when nothing is padded (SDPA's fast paths)."""
        if attention_mask is None or _all_true(attention_mask):
            return None
        return ~attention_mask.bool()[:, None, None, :]

    def embed(self, ids: torch.Tensor, tied: Tied | None = None) -> torch.Tensor:
        """Token embeddings; `tied`: this forward's `TiedEmbedding.tie()`, when it also projects with the weight."""
        return self.shared(ids) if tied is None else self.shared(ids, tied)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tied: Tied | None = None
    ) -> torch.Tensor:
        """(B, S) -> encoder output (B, S, D)."""
        S = input_ids.shape[1]
        spans = self._unpadded_spans(input_ids, attention_mask)
        if spans is not None:  # inference with padding: only the real tokens go through the encoder
            real = attention_mask.bool()
            h = self._encode_packed(input_ids, real, spans, tied)
            return h.new_zeros(*input_ids.shape, h.shape[-1]).index_put_((real,), h)  # padding rows: zeros
        return self.encoder(self.embed(input_ids, tied), *self.encoder.self_mask(S, S, key_mask=attention_mask))

    def _encode_packed(self, input_ids, real, spans, tied: Tied | None = None) -> torch.Tensor:
        """The encoder output of the real tokens `real` (B, S) only, packed item after item: (R, D)."""
        S = input_ids.shape[1]
        return self.encoder.forward_unpadded(self.embed(input_ids[real], tied), spans, self.encoder.position_bias(S, S))

    def _unpadded_spans(self, input_ids, attention_mask) -> list[tuple[int, int, slice | torch.Tensor]] | None:
        """Where the real tokens of each item lie once packed (`T5Stack.forward_unpadded`), or None to run the
        padded batch: the unpadded encoder is for CPU inference (eval, no autograd, SDPA backend, not compiled) of a
        batch with padding in which every item has a real token. Padded positions cost the full matmuls of every
        layer in the padded batch, for outputs that nothing reads (cross-attention masks them), so skipping them
        saves their share of the encoder; on GPU the per-item attention calls would cost more launches than that.
        The encoder output at padded positions is then zero rather than a value computed from the real tokens."""
        if (
            attention_mask is None
            or self.training
            or torch.is_grad_enabled()
            or input_ids.device.type != "cpu"
            or self.config.attention_backend != "sdpa"
            or self.config.layout != "encoder_decoder"
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

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for encoder-decoder, (B, L, V) for decoder-only layouts."""
        c = self.config
        tied = self.shared.tie() if c.tie_word_embeddings else None  # embeddings and logits share one gradient
        if c.layout != "encoder_decoder":
            if decoder_input_ids is not None or decoder_attention_mask is not None:
                raise ValueError(f"layout {c.layout!r} has no decoder inputs; pass the sequence as input_ids")
            if (prefix_lengths is not None) != (c.layout == "prefix_lm"):
                raise ValueError("prefix_lengths is required for layout 'prefix_lm' and only allowed there")
            L = input_ids.shape[1]
            masks = self.decoder.self_mask(L, L, key_mask=attention_mask, causal=True, prefix=prefix_lengths)
            return self.logits(self.decoder(self.embed(input_ids, tied), *masks), tied)
        if decoder_input_ids is None:
            raise ValueError("encoder_decoder layout needs decoder_input_ids (targets shifted right)")
        if prefix_lengths is not None:
            raise ValueError("prefix_lengths is only for layout 'prefix_lm'")
        memory = self.encode(input_ids, attention_mask, tied)
        T = decoder_input_ids.shape[1]
        bias, hidden = self.decoder.self_mask(T, T, key_mask=decoder_attention_mask, causal=True)
        cross_hidden = self._padding(attention_mask)
        h = self.decoder(self.embed(decoder_input_ids, tied), bias, hidden, memory=memory, cross_hidden=cross_hidden)
        return self.logits(h, tied)

    # ---- incremental decoding (protocol of models/generation.py) ----

    def init_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
        """Run the encoder once and precompute every layer's cross-attention keys/values, once per input: the
        beams of an input attend to them together (`T5LayerCrossAttention`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)  # (N, S)
        state = {"caches": [KVCache() for _ in self.decoder.block], "length": 0}
        if self.config.layout != "encoder_decoder":
            state["key_mask"] = attention_mask  # grows by one column per decoded token
            state["prefix"] = input_ids.shape[1] if self.config.layout == "prefix_lm" else None
            return state
        real = attention_mask[::num_beams]  # once per input, not per beam
        spans = self._unpadded_spans(input_ids, real)
        if spans is None:
            memory = self.encode(input_ids, real)  # (B, S, D)
            kvs = [b.layer[1].EncDecAttention.project_kv(memory) for b in self.decoder.block]
            state["memory_kv"] = [(k.contiguous(), v.contiguous()) for k, v in kvs]  # read at every step
        else:  # the real tokens only, through the encoder and the cross-attention projections (`encode`)
            h = self._encode_packed(input_ids, real, spans)
            state["memory_kv"] = [self._scatter_kv(b.layer[1].EncDecAttention, h, real) for b in self.decoder.block]
        state["cross_hidden"] = self._padding(attention_mask[::num_beams])
        dtype = state["memory_kv"][0][0].dtype
        state["cross_bias"] = _merge(None, state["cross_hidden"], dtype)  # for SDPA, merged once
        return state

    @staticmethod
    def _scatter_kv(attn: T5Attention, h: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values (B, H, S, Dk) of the packed real rows h (R, D) of an encoder output: each
        projection written head-major into its place; padded keys stay zero (masked, they add exactly 0)."""
        B, S = real.shape
        out = []
        for w in (attn.k.weight, attn.v.weight):
            buf = h.new_zeros(B, attn.n_heads, S, attn.d_kv)
            buf.transpose(1, 2)[real] = linear(h, w).view(h.shape[0], attn.n_heads, attn.d_kv)
            out.append(buf)
        return out[0], out[1]

    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """tokens (N, t) new since the last call -> logits of the last position (N, V), updated state.

        The position bias is computed for the t new query rows only (one row: a slice of a table kept in the state,
        `T5Stack.position_bias_row`); keys/values go into each layer's `KVCache`.
        """
        offset, t = state["length"], tokens.shape[1]
        key_mask, prefix = None, None
        if "key_mask" in state:  # decoder-only: the prompt's padding stays masked
            key_mask = state["key_mask"]
            if key_mask.shape[1] < offset + t:
                ones = key_mask.new_ones(key_mask.shape[0], offset + t - key_mask.shape[1])
                key_mask = torch.cat([key_mask, ones], dim=1)
            state["key_mask"] = key_mask
            if state["prefix"] is not None:
                prefix = torch.full((tokens.shape[0],), state["prefix"], device=tokens.device)
        rows = state.setdefault("bias_rows", {})  # the position bias by relative position, kept for the decoding
        bias, hidden = self.decoder.self_mask(t, offset + t, offset, key_mask, True, prefix, rows)
        with decoding():  # products in the forms `CpuKernels.decoding` asks for (models.common)
            h = self.decoder(
                self.shared(tokens),
                bias,
                hidden,
                cross_hidden=state.get("cross_hidden"),
                memory_kvs=state.get("memory_kv"),
                caches=state["caches"],
                cross_bias=state.get("cross_bias"),
            )
            logits = self.logits(h[:, -1])
        state["length"] = offset + t
        return logits, state

    def reorder_state(self, state: dict, beam_idx: torch.Tensor) -> dict:
        """Keep the cache rows of the surviving beams (beam_idx indexes the N rows)."""
        # Only the self-attention caches differ between beams; the rest is identical within a batch item.
        for cache in state["caches"]:
            cache.reorder(beam_idx)
        return state

    # ---- accounting ----

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding` leaves out token embeddings, output projection and position biases."""
        total = 0
        for name, p in self.named_parameters():
            if non_embedding and (name.startswith(("shared.", "lm_head.")) or "relative_attention_bias" in name):
                continue
            total += p.numel()
        return total

    def training_flops(self, batch_size: int, input_len: int, target_len: int = 0) -> float:
        """FLOPs of one training step (`training_flops` of the config)."""
        return training_flops(self.config, batch_size, input_len, target_len)


def training_flops(c: T5Config, batch_size: int, input_len: int, target_len: int = 0) -> float:
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


# ------------------------------------------------------------------------------------------ family spec


def _benchmark_config(config: T5Config, num_layers: int | None, length: int) -> T5Config:
    """`num_layers` blocks in each stack; relative positions need no table growth for `length`."""
    from dataclasses import replace

    return config if num_layers is None else replace(config, num_layers=num_layers, num_decoder_layers=num_layers)


def _activation_checkpointing(config: T5Config, enabled: bool) -> None:
    config.gradient_checkpointing = enabled  # each block is recomputed in the backward pass


def _load_checkpoint(directory) -> T5Model:
    from models.hf.t5 import load_t5_checkpoint  # needs transformers' file layout, not transformers itself

    return load_t5_checkpoint(directory)


from models.spec import FamilySpec  # noqa: E402  (the spec closes the module)

SPEC = FamilySpec(
    name="t5",
    config_class=T5Config,
    model_class=T5Model,
    presets=PRESETS,
    benchmark_config=_benchmark_config,
    activation_checkpointing=_activation_checkpointing,
    load_checkpoint=_load_checkpoint,
    training_flops=training_flops,
    # Long Range Arena (Tay et al. 2021), table 1, test accuracy of the vanilla Transformer: full attention, as T5
    published={"lra_listops": {"Transformer": 0.3637}},
)
