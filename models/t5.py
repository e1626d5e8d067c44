"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer")
and its v1.1 revision, in plain PyTorch.

Parameter names follow `transformers`' T5 (`shared`, `encoder.block.0.layer.0.SelfAttention.q`, ...) so that
weight conversion (`models/hf/t5.py`) is a table. Layouts: encoder-decoder, and the decoder-only causal LM and
prefix LM of the paper's Table 2 (one stack, named `decoder`, without cross-attention).

This file is the reference: what it computes is the model. When a process asks for the speed paths
(`models.set_cpu_kernels(paths="fast")`, the pipeline's default), a few methods hand over to their fast form in
`models/fast/t5.py` (first line `if fast_paths(): ...`): fused and stacked projections, attention differentiated by
hand, one gradient tensor for tied embeddings, an encoder over the real tokens only, decoding shortcuts. Each is
tested equal to the code here (tests/test_fast_t5.py); none is needed to read the model.

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

from models import generation, t5_decoding
from models.fast import t5 as fast
from models.flops import t5_training_flops as training_flops
from models.layers import KVCache, Linear, additive_mask, all_true, dropout, linear, neg_inf, padded_keys
from models.settings import fast_paths

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


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction and no bias (paper section 3.1.1)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head attention (paper section 2.1) without the 1/sqrt(Dk) logit scale, which Mesh TensorFlow folds into
    the initialisation of `q`; the relative position bias comes in through the additive mask."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False):
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        self.backend = config.attention_backend
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:  # only in the first layer of a stack; the others reuse its bias
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, I) -> (B, H, L, Dk)"""
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention queries, keys and values: (B, L, D) -> 3 x (B, H, L, Dk)."""
        if fast_paths():
            return fast.project_qkv(self, x)
        return self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output: (B, S, D) -> 2 x (B, H, S, Dk)."""
        if fast_paths():
            return fast.project_kv(self, memory)
        return self.heads(self.k(memory)), self.heads(self.v(memory))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with heads merged and projected by `o`: q (B, H, Lq, Dk), k and v (B, H, Lk, Dk), mask additive
        (1 or B, H or 1, Lq or 1, Lk) or None -> (B, Lq, D)."""
        if fast_paths():
            return fast.attend(self, q, k, v, mask)
        B, H, Lq, Dk = q.shape
        return self.o(self.attention(q, k, v, mask).transpose(1, 2).reshape(B, Lq, H * Dk))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T + mask) v, dropout on the probabilities in training -> (B, H, Lq, Dk)."""
        p = self.dropout if self.training else 0.0
        if self.backend == "eager":  # the formula, spelled out
            scores = q @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
            return dropout((scores if mask is None else scores + mask).softmax(-1), p, True) @ v
        if self.backend == "flex" and q.is_cuda:
            return _flex_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)


def _flex_attention(q, k, v, mask):
    """FlexAttention with the additive mask added by a score_mod (GPU; compiled by the caller)."""
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
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), through (B, L, F)."""
        if fast_paths():
            return fast.relu_feed_forward(self, x)
        return self.wo(dropout(F.relu(self.wi(x)), self.dropout, self.training))


class T5DenseGatedActDense(nn.Module):
    """v1.1 feed-forward (Shazeer 2020, GEGLU): wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), through (B, L, F)."""
        if fast_paths():
            return fast.gated_feed_forward(self, x)
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, F)
        return self.wo(dropout(h, self.dropout, self.training))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        attn = self.SelfAttention
        q, k, v = attn.project_qkv(self.layer_norm(h))  # pre-norm residual block
        if cache is not None:  # incremental decoding: this step's keys/values join the cached ones
            k, v = cache.append(k, v)
        return h + dropout(attn.attend(q, k, v, mask), self.dropout, self.training)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], mask) -> torch.Tensor:
        attn = self.EncDecAttention
        q = attn.heads(attn.q(self.layer_norm(h)))  # (B, H, T, Dk) against the encoder's (B, H, S, Dk)
        return h + dropout(attn.attend(q, *memory_kv, mask), self.dropout, self.training)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + dropout(self.DenseReluDense(self.layer_norm(h)), self.dropout, self.training)


class T5Block(nn.Module):
    """Self-attention, [cross-attention,] feed-forward, each a pre-norm residual block (indices as the reference's)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, has_cross_attention: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if has_cross_attention:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, h, mask, memory=None, memory_kv=None, cross_mask=None, cache: KVCache | None = None):
        h = self.layer[0](h, mask, cache)
        if len(self.layer) == 3:
            if memory_kv is None:  # training: project the encoder output here (checkpointed with the block)
                memory_kv = self.layer[1].EncDecAttention.project_kv(memory)
            h = self.layer[1](h, memory_kv, cross_mask)
        return self.layer[-1](h)


class T5Stack(nn.Module):
    """A stack of blocks with one relative position bias, computed once and shared by all its layers."""

    def __init__(self, config: T5Config, num_layers: int, has_cross_attention: bool, bidirectional: bool):
        super().__init__()
        self.config, self.bidirectional = config, bidirectional
        self.block = nn.ModuleList([T5Block(config, i == 0, has_cross_attention) for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def relative_bias(self, relative: torch.Tensor) -> torch.Tensor:
        """Each head's learned bias for key - query distances `relative` (any shape) -> (*relative.shape, H)."""
        c, table = self.config, self.block[0].layer[0].SelfAttention.relative_attention_bias  # (buckets, H)
        num_buckets, max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        return table(relative_position_bucket(relative, self.bidirectional, num_buckets, max_distance))

    def position_bias(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """(1, H, Lq, Lk) bias for queries at positions offset .. offset + Lq - 1 and keys at 0 .. Lk - 1."""
        device = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight.device
        k_pos, q_pos = torch.arange(k_len, device=device), torch.arange(offset, offset + q_len, device=device)
        bias = self.relative_bias(k_pos[None, :] - q_pos[:, None])  # (Lq, Lk, H)
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # contiguous: read once per layer

    def self_mask(self, q_len, k_len, offset=0, key_mask=None, causal=False, prefix=None, bias=None):
        """(bias, hidden): the position bias (1, H, Lq, Lk), with keys after the query at the dtype's minimum when
        `causal`, and the keys each query may not see, bool (B or 1, 1, Lq or 1, Lk), or None when there are none.

        `key_mask` (B, Lk) marks real keys; `prefix` (B,) lengths of the bidirectional prefix (prefix LM): then the
        causal pattern depends on the row and goes into `hidden`. Batch-free masks stay in the (1, H, Lq, Lk) bias so
        no (B, H, Lq, Lk) tensor is built per stack. `bias`: `position_bias(q_len, k_len, offset)` when at hand.
        """
        bias = self.position_bias(q_len, k_len, offset) if bias is None else bias  # (1, H, Lq, Lk)
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
        if key_mask is not None and not all_true(key_mask):
            padded = ~key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
            hidden = padded if hidden is None else hidden | padded
        return bias, hidden

    def forward(self, h, bias, hidden, memory=None, cross_hidden=None, memory_kvs=None, caches=None):
        """h (B, L, D) embeddings -> (B, L, D) hidden states. `bias`, `hidden`: `self_mask`'s; `memory` (B, S, D) the
        encoder output and `cross_hidden` (B, 1, 1, S) its padding; `memory_kvs` every layer's cross-attention
        keys/values and `caches` one `KVCache` per layer, when decoding."""
        if fast_paths():  # the attention differentiated by hand takes the bias and the hidden keys apart
            mask, cross_mask = fast.masks(self, bias, hidden, cross_hidden, h)
        else:
            mask, cross_mask = additive_mask(bias, hidden, h.dtype), additive_mask(None, cross_hidden, h.dtype)
        h = dropout(h, self.dropout, self.training)
        for i, block in enumerate(self.block):
            args = (h, mask, memory, None if memory_kvs is None else memory_kvs[i], cross_mask)
            cache = None if caches is None else caches[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, *args, cache, use_reentrant=False)  # recomputed in backward
            else:
                h = block(*args, cache)
        return dropout(self.final_layer_norm(h), self.dropout, self.training)


class T5Model(generation.GenerationMixin, nn.Module):
    """T5 encoder-decoder, or decoder-only causal / prefix LM; `forward` returns logits (no loss inside)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)  # tied (v1.0): also the output projection
        if c.layout == "encoder_decoder":
            self.encoder = T5Stack(c, c.num_layers, has_cross_attention=False, bidirectional=True)
            self.decoder = T5Stack(c, c.num_decoder_layers, has_cross_attention=True, bidirectional=False)
        else:  # prefix LM: bidirectional buckets (the prefix sees both ways), causal mask after the prefix
            self.decoder = T5Stack(c, c.num_layers, has_cross_attention=False, bidirectional=c.layout == "prefix_lm")
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection (..., D) -> (..., V); tied embeddings rescale by d_model**-0.5 (Mesh TensorFlow)."""
        if self.config.tie_word_embeddings:
            return linear(h * self.config.d_model**-0.5, self.shared.weight)
        return self.lm_head(h)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) -> encoder output (B, S, D)."""
        if fast_paths():
            return fast.encode(self, input_ids, attention_mask)
        S = input_ids.shape[1]
        return self.encoder(self.shared(input_ids), *self.encoder.self_mask(S, S, key_mask=attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for encoder-decoder, (B, L, V) for decoder-only layouts."""
        layout = self.config.layout
        if layout != "encoder_decoder" and (decoder_input_ids is not None or decoder_attention_mask is not None):
            raise ValueError(f"layout {layout!r} has no decoder inputs; pass the sequence as input_ids")
        if layout == "encoder_decoder" and decoder_input_ids is None:
            raise ValueError("encoder_decoder layout needs decoder_input_ids (targets shifted right)")
        if (prefix_lengths is not None) != (layout == "prefix_lm"):
            raise ValueError("prefix_lengths is required for layout 'prefix_lm' and only allowed there")
        if fast_paths():
            return fast.forward(
                self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, prefix_lengths
            )
        if layout != "encoder_decoder":
            L = input_ids.shape[1]
            bias, hidden = self.decoder.self_mask(L, L, key_mask=attention_mask, causal=True, prefix=prefix_lengths)
            return self.logits(self.decoder(self.shared(input_ids), bias, hidden))
        memory = self.encode(input_ids, attention_mask)
        T = decoder_input_ids.shape[1]
        bias, hidden = self.decoder.self_mask(T, T, key_mask=decoder_attention_mask, causal=True)
        h = self.decoder(self.shared(decoder_input_ids), bias, hidden, memory, padded_keys(attention_mask))
        return self.logits(h)

    # ---- incremental decoding (protocol of models/generation.py), with caches: models/t5_decoding.py ----

    def init_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
        """Run the encoder once and project every layer's cross-attention keys/values; empty caches."""
        return t5_decoding.init_state(self, input_ids, attention_mask, num_beams)

    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """tokens (N, t) new since the last call -> logits of the last position (N, V); the caches grow by t."""
        return t5_decoding.decode_step(self, tokens, state)

    def reorder_state(self, state: dict, beam_idx: torch.Tensor) -> dict:
        """Keep the cache rows of the surviving beams (beam_idx indexes the N rows)."""
        return t5_decoding.reorder_state(state, beam_idx)

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
        """FLOPs of one training step (`models.flops.t5_training_flops` of the config)."""
        return training_flops(self.config, batch_size, input_len, target_len)
