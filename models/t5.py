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


def _neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _all_true(mask: torch.Tensor) -> bool:
    """Whether a padding mask masks nothing (skips the mask); under torch.compile always False (no graph break)."""
    return not torch.compiler.is_compiling() and bool(mask.all())


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

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        # (B, L, n * I) -> n tensors (B, H, L, Dk)
        B, L, _ = x.shape
        return x.view(B, L, n, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4).unbind(0)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections (B, L, D) -> 3 x (B, H, L, Dk)."""
        if self.training:  # training: one fused matmul beats three on the big activation
            return self._heads(F.linear(x, torch.cat([self.q.weight, self.k.weight, self.v.weight])), 3)
        # decoding: few tokens, the matmuls are bound by reading the weights; concatenating them would copy
        return self._heads(self.q(x), 1)[0], self._heads(self.k(x), 1)[0], self._heads(self.v(x), 1)[0]

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the encoder output (B, S, D) -> 2 x (B, H, S, Dk)."""
        if self.training:
            return self._heads(F.linear(memory, torch.cat([self.k.weight, self.v.weight])), 2)
        return self._heads(self.k(memory), 1)[0], self._heads(self.v(memory), 1)[0]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, Lq, Dk), k/v (B, H, Lk, Dk), mask additive (B or 1, H or 1, Lq, Lk) -> (B, Lq, D)."""
        p = self.dropout if self.training else 0.0
        if self.backend == "flex" and q.is_cuda:
            out = _flex_attention(q, k, v, mask)
        elif self.backend == "eager":
            scores = q @ k.transpose(-1, -2)  # (B, H, Lq, Lk), no 1/sqrt(Dk)
            if mask is not None:
                scores = scores + mask
            out = F.dropout(scores.float().softmax(-1).type_as(q), p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        B, H, Lq, Dk = out.shape
        return self.o(out.transpose(1, 2).reshape(B, Lq, H * Dk))


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
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


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
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # one matmul for both input projections
            gate, linear = F.linear(x, torch.cat([self.wi_0.weight, self.wi_1.weight])).chunk(2, dim=-1)
        else:
            gate, linear = self.wi_0(x), self.wi_1(x)
        return self.wo(self.dropout(_gelu_new(gate, self.training) * linear))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h, mask, past_kv=None):
        attn = self.SelfAttention
        q, k, v = attn.project_qkv(self.layer_norm(h))  # pre-norm residual block
        if past_kv is not None:  # incremental decoding: append this step's keys/values to the cache
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        return h + self.dropout(attn.attend(q, k, v, mask)), (k, v)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h, memory_kv, mask):
        q = self.EncDecAttention._heads(self.EncDecAttention.q(self.layer_norm(h)), 1)[0]
        return h + self.dropout(self.EncDecAttention.attend(q, *memory_kv, mask))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h):
        return h + self.dropout(self.DenseReluDense(self.layer_norm(h)))


class T5Block(nn.Module):
    """Self-attention, [cross-attention,] feed-forward; `layer` indices as in the reference."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, has_cross_attention: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if has_cross_attention:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(self, h, self_mask, memory=None, memory_kv=None, cross_mask=None, past_kv=None):
        h, kv = self.layer[0](h, self_mask, past_kv)
        if len(self.layer) == 3:
            if memory_kv is None:  # training: project the encoder output here (checkpointed with the block)
                memory_kv = self.layer[1].EncDecAttention.project_kv(memory)
            h = self.layer[1](h, memory_kv, cross_mask)
        return self.layer[-1](h), kv


class T5Stack(nn.Module):
    """A stack of blocks with one relative position bias, computed once and shared by all its layers."""

    def __init__(self, config: T5Config, num_layers: int, has_cross_attention: bool, bidirectional: bool):
        super().__init__()
        self.config, self.bidirectional = config, bidirectional
        self.block = nn.ModuleList([T5Block(config, i == 0, has_cross_attention) for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

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
        return table(buckets).permute(2, 0, 1).unsqueeze(0)

    def self_mask(self, q_len, k_len, offset=0, key_mask=None, causal=False, prefix=None) -> torch.Tensor:
        """Position bias with disallowed keys set to -inf (dtype min): one (B or 1, H, Lq, Lk) tensor per stack.

        `key_mask` (B, Lk) bool marks real keys; `causal` hides keys after the query unless they lie in the
        prefix: `prefix` (B,) lengths of the bidirectional prefix (prefix LM).
        """
        bias = self.position_bias(q_len, k_len, offset)  # (1, H, Lq, Lk)
        allowed = None
        if causal and (q_len > 1 or prefix is not None):
            device = bias.device
            q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
            k_pos = torch.arange(k_len, device=device)[None, :]
            allowed = (k_pos <= q_pos)[None]  # (1, Lq, Lk)
            if prefix is not None:
                allowed = allowed | (k_pos[None] < prefix.to(device)[:, None, None])  # (B, Lq, Lk)
        if key_mask is not None and not _all_true(key_mask):
            keys = key_mask.bool()[:, None, :]  # (B, 1, Lk)
            allowed = keys if allowed is None else allowed & keys
        if allowed is None:
            return bias
        return bias.masked_fill(~allowed[:, None], _neg_inf(bias.dtype)).contiguous()

    def forward(self, h, self_mask, memory=None, cross_mask=None, memory_kvs=None, past_kvs=None):
        """h (B, L, D) embeddings -> (B, L, D) hidden states, and each layer's self-attention (k, v)."""
        h = self.dropout(h)
        kvs = []
        for i, block in enumerate(self.block):
            memory_kv = None if memory_kvs is None else memory_kvs[i]
            past_kv = None if past_kvs is None else past_kvs[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, kv = checkpoint(block, h, self_mask, memory, memory_kv, cross_mask, past_kv, use_reentrant=False)
            else:
                h, kv = block(h, self_mask, memory, memory_kv, cross_mask, past_kv)
            kvs.append(kv)
        return self.dropout(self.final_layer_norm(h)), kvs


class T5Model(nn.Module):
    """T5 encoder-decoder, or decoder-only causal / prefix LM; `forward` returns logits (no loss inside)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection (…, D) -> (…, V); tied embeddings rescale by d_model**-0.5 (Mesh TensorFlow)."""
        if self.config.tie_word_embeddings:
            return F.linear(h * self.config.d_model**-0.5, self.shared.weight)
        return self.lm_head(h)

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, S) 1 = real -> additive (B, 1, 1, S), or None when nothing is padded (lets SDPA take fast paths)."""
        if attention_mask is None or _all_true(attention_mask):
            return None
        return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            ~attention_mask.bool(), _neg_inf(dtype)
        )[:, None, None, :]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) -> encoder output (B, S, D)."""
        S = input_ids.shape[1]
        mask = self.encoder.self_mask(S, S, key_mask=attention_mask)
        return self.encoder(self.shared(input_ids), mask)[0]

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
        if c.layout != "encoder_decoder":
            if decoder_input_ids is not None or decoder_attention_mask is not None:
                raise ValueError(f"layout {c.layout!r} has no decoder inputs; pass the sequence as input_ids")
            if (prefix_lengths is not None) != (c.layout == "prefix_lm"):
                raise ValueError("prefix_lengths is required for layout 'prefix_lm' and only allowed there")
            L = input_ids.shape[1]
            mask = self.decoder.self_mask(L, L, key_mask=attention_mask, causal=True, prefix=prefix_lengths)
            return self.logits(self.decoder(self.shared(input_ids), mask)[0])
        if decoder_input_ids is None:
            raise ValueError("encoder_decoder layout needs decoder_input_ids (targets shifted right)")
        if prefix_lengths is not None:
            raise ValueError("prefix_lengths is only for layout 'prefix_lm'")
        memory = self.encode(input_ids, attention_mask)
        T = decoder_input_ids.shape[1]
        self_mask = self.decoder.self_mask(T, T, key_mask=decoder_attention_mask, causal=True)
        cross_mask = self._padding_mask(attention_mask, memory.dtype)
        h, _ = self.decoder(self.shared(decoder_input_ids), self_mask, memory=memory, cross_mask=cross_mask)
        return self.logits(h)

    # ---- incremental decoding (protocol of models/generation.py) ----

    def init_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
        """Run the encoder once and precompute every layer's cross-attention keys/values, expanded per beam."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)  # (N, S)
        state = {"self_kv": None, "length": 0}
        if self.config.layout != "encoder_decoder":
            state["key_mask"] = attention_mask  # grows by one column per decoded token
            state["prefix"] = input_ids.shape[1] if self.config.layout == "prefix_lm" else None
            return state
        memory = self.encode(input_ids, attention_mask[::num_beams]).repeat_interleave(num_beams, dim=0)
        state["memory_kv"] = [b.layer[1].EncDecAttention.project_kv(memory) for b in self.decoder.block]
        state["cross_mask"] = self._padding_mask(attention_mask, memory.dtype)
        return state

    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """tokens (N, t) new since the last call -> logits of the last position (N, V), updated state."""
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
        mask = self.decoder.self_mask(t, offset + t, offset, key_mask=key_mask, causal=True, prefix=prefix)
        h, kvs = self.decoder(
            self.shared(tokens),
            mask,
            cross_mask=state.get("cross_mask"),
            memory_kvs=state.get("memory_kv"),
            past_kvs=state["self_kv"],
        )
        state.update(self_kv=kvs, length=offset + t)
        return self.logits(h[:, -1]), state

    def reorder_state(self, state: dict, beam_idx: torch.Tensor) -> dict:
        """Keep the cache rows of the surviving beams (beam_idx indexes the N rows)."""

        # Only the self-attention caches differ between beams; the rest is identical within a batch item.
        state["self_kv"] = [(k.index_select(0, beam_idx), v.index_select(0, beam_idx)) for k, v in state["self_kv"]]
        return state

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        length_penalty: float = 1.0,
    ) -> torch.LongTensor:
        """Greedy (num_beams=1) or beam search with cached decoding; see `models.generation.generate`."""
        return generation.generate(
            self, input_ids, attention_mask, max_new_tokens, num_beams, eos_token_id, pad_token_id, length_penalty
        )

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
        """FLOPs of one training step: 6 per weight per token it is applied to, plus the attention matmuls.

        Attention scores and the weighted sum cost 2 * Lq * Lk * I multiply-adds per layer forward, so
        4 * Lq * Lk * I FLOPs, tripled for forward + backward (SDPA computes the full causal square).
        """
        c = self.config
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
