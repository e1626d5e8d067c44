"""The Reformer (Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", arXiv 2001.04451) in plain PyTorch.

Decoder-only (`causal_lm`, as in the paper's enwik8/imagenet64 runs and `transformers`' ReformerModelWithLMHead)
and encoder-decoder (`encoder_decoder`: LSH/local self-attention in both stacks, full cross-attention from the
decoder to the encoder). Parameter names follow `transformers`' Reformer so that `models/hf/reformer.py` is a table.

Dimension legend:
    B batch, L sequence length (padded to a multiple of the chunk lengths), D d_model, H num_heads, K d_kv,
    R n_hashes, N R*L (all hash rounds side by side), C number of chunks, S chunk length,
    W attended keys per chunk ((1 + before + after) * S), V vocab_size, E encoder length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import reformer_decoding
from models.chunked_attention import chunked_attention, full_attention, merge_heads, normalise_keys, split_heads
from models.fast import reformer as fast
from models.flops import reformer_training_flops as training_flops
from models.generation import GenerationMixin
from models.layers import Dropout, Linear
from models.positions import AxialPositionEmbeddings, PositionEmbeddings
from models.reversible import reversible_stack
from models.settings import fast_paths

LAYOUTS = ("encoder_decoder", "causal_lm")
ATTN_TYPES = ("lsh", "local")
_GELU_TANH = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": _GELU_TANH, "gelu_fast": _GELU_TANH, "silu": F.silu}

# Axial position embeddings start at the word embeddings' scale (`axial_norm_std` = `initializer_range`), not at
# the class default 1.0 (transformers' default, kept so imported configs mean what they say): with std 1.0 against
# token embeddings of std 0.02 the positions drown the tokens, and a tiny model fine-tuned for a few hundred steps
# never learns which digits its input holds (measured: `sort` exact match 0.005 with 1.0, 0.83 with 0.02).
_POSITIONS = dict(axial_norm_std=0.02)
_LAYERS = ("local", "lsh")  # the presets' pattern of layers, repeated in the deeper ones
PRESETS: dict[str, dict[str, Any]] = {
    # matched to the T5 presets of the same name by non-embedding parameter count (tests/test_reformer.py)
    "tiny": dict(_POSITIONS, vocab_size=8192, d_model=128, d_kv=32, num_heads=4, d_ff=512, attn_layers=list(_LAYERS)),
    "small": dict(_POSITIONS, d_model=512, d_kv=64, num_heads=8, d_ff=2048, attn_layers=list(_LAYERS * 3)),
    "base": dict(_POSITIONS, d_model=768, d_kv=64, num_heads=12, d_ff=3072, attn_layers=list(_LAYERS * 6)),
}
PRESETS["small"]["axial_pos_dims"], PRESETS["base"]["axial_pos_dims"] = [256, 256], [384, 384]  # sum to d_model


@dataclass
class ReformerConfig:
    """Hyper-parameters of our Reformer; the defaults are the `tiny` preset."""

    vocab_size: int = 32128
    d_model: int = 128  # width of each of the two reversible streams (transformers: hidden_size)
    d_kv: int = 32  # per-head width (transformers: attention_head_size)
    num_heads: int = 4
    d_ff: int = 512  # feed-forward width (transformers: feed_forward_size)
    layout: str = "encoder_decoder"
    attn_layers: list[str] = field(default_factory=lambda: ["local", "lsh"])  # decoder (or only) stack, per layer
    encoder_attn_layers: list[str] | None = None  # encoder stack; None = same as attn_layers
    n_hashes: int = 2  # rounds of hashing (transformers: num_hashes)
    n_buckets: int | list[int] | None = None  # even; a list factorises the buckets; None = derived from length
    lsh_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    local_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    encoder_num_chunks_after: int = 1  # chunks after, for the (bidirectional) encoder's local and LSH layers
    hash_seed: int | None = None  # None = fresh random rotations every forward
    use_full_attention: bool = False  # LSH layers attend to the whole sequence (same shared-QK attention)
    axial_pos_shape: list[int] | None = field(default_factory=lambda: [256, 256])  # None, []: plain learned positions
    axial_pos_dims: list[int] | None = field(default_factory=lambda: [64, 64])  # must sum to d_model
    max_position_embeddings: int = 65536  # plain positions only; axial: prod(axial_pos_shape)
    ff_chunk_size: int = 0  # feed-forward over sequence chunks of this size (0 = all at once)
    lm_head_chunk_size: int = 0  # output projection over sequence chunks of this size (0 = all at once)
    reversible: bool = True  # False = ordinary residual stack (same function, stores activations)
    hidden_act: str = "relu"
    dropout_rate: float = 0.1  # transformers: hidden_dropout_prob
    attention_dropout_rate: float = 0.0  # on the attention probabilities (lsh and local)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    axial_norm_std: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    tie_word_embeddings: bool = False  # must stay False: the head reads both streams (2D), the embedding is D

    def __post_init__(self):
        if self.axial_pos_shape == [] and self.axial_pos_dims == []:  # [] says "none" where null means "the preset's"
            self.axial_pos_shape = self.axial_pos_dims = None
        errors = []
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "n_hashes", "lsh_chunk_length"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_chunk_length < 1:
            errors.append(f"local_chunk_length must be >= 1, got {self.local_chunk_length}")
        if self.layout not in LAYOUTS:
            errors.append(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("attn_layers", "encoder_attn_layers"):  # encoder_attn_layers None: as attn_layers
            value = getattr(self, name)
            if (value is not None or name == "attn_layers") and (not value or any(t not in ATTN_TYPES for t in value)):
                errors.append(f"{name} must be a non-empty list of {ATTN_TYPES}, got {value!r}")
        if self.n_buckets is not None:
            factors = [self.n_buckets] if isinstance(self.n_buckets, int) else list(self.n_buckets)
            if not factors or any(b < 2 or b % 2 for b in factors):
                errors.append(f"n_buckets must be None, an even int >= 2 or a list of them, got {self.n_buckets!r}")
        chunks = [f"{kind}_num_chunks_{side}" for kind in ("lsh", "local") for side in ("before", "after")]
        for name in (*chunks, "encoder_num_chunks_after", "ff_chunk_size", "lm_head_chunk_size"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.axial_pos_shape is None) != (self.axial_pos_dims is None):
            errors.append("axial_pos_shape and axial_pos_dims must both be set (axial positions) or both be None")
        elif self.axial_pos_shape is not None:
            if len(self.axial_pos_shape) != 2 or len(self.axial_pos_dims) != 2:
                errors.append(f"axial_pos_shape/axial_pos_dims need 2 entries, got {self.axial_pos_shape}")
            elif sum(self.axial_pos_dims) != self.d_model:
                errors.append(f"axial_pos_dims {self.axial_pos_dims} must sum to d_model {self.d_model}")
        if self.hidden_act not in ACTIVATIONS:
            errors.append(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.tie_word_embeddings:
            errors.append("tie_word_embeddings must be False: the Reformer head reads 2*d_model, the embedding d_model")
        if errors:
            raise ValueError("invalid ReformerConfig: " + "; ".join(errors))

    @property
    def max_positions(self) -> int:
        return math.prod(self.axial_pos_shape) if self.axial_pos_shape else self.max_position_embeddings

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ReformerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Reformer preset {name!r}; known: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ReformerConfig keys: {', '.join(unknown)}")
        return cls(**d)


class LSHSelfAttention(nn.Module):
    """LSH attention (section 2): shared query/key, angular hashing, sorting by bucket, chunked attention."""

    def __init__(self, config: ReformerConfig, causal: bool, num_chunks_after: int):
        super().__init__()
        self.config, self.causal = config, causal
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.chunk_length, self.num_chunks_after = config.lsh_chunk_length, num_chunks_after
        self.query_key = Linear(config.d_model, config.num_heads * config.d_kv, bias=False)
        self.value = Linear(config.d_model, config.num_heads * config.d_kv, bias=False)

    def n_buckets(self, length: int) -> int | list[int]:
        """The configured buckets, or about 2 * L / chunk_length rounded down to a power of two (section 2.4)."""
        if self.config.n_buckets is not None:
            return self.config.n_buckets
        power = (2 * (length // self.chunk_length)).bit_length() - 1
        limit = 2 * max(int((self.config.max_position_embeddings // self.chunk_length) ** 0.5), self.chunk_length)
        if 2**power <= limit:
            return 2**power
        return [2 ** (power // 2), 2 ** (power - power // 2)]  # factorised to keep the rotations small

    def rotations(self, n_buckets: int | list[int], like: torch.Tensor) -> torch.Tensor:
        """Random rotations (H, K, R, sum(factors) / 2) for `hash`."""
        factors = [n_buckets] if isinstance(n_buckets, int) else list(n_buckets)
        shape = (self.num_heads, self.d_kv, self.config.n_hashes, sum(factors) // 2)
        if self.config.hash_seed is not None:  # a private generator: same seed, same rotations, global RNG untouched
            generator = torch.Generator(device=like.device).manual_seed(self.config.hash_seed)
            return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        return torch.randn(shape, device=like.device, dtype=like.dtype)  # global RNG: fresh every forward

    def hash(self, vectors: torch.Tensor, n_buckets, key_mask: torch.Tensor | None, rotations=None) -> torch.Tensor:
        """Angular LSH: argmax over [xR, -xR] of a random rotation R, per round; (B, H, L, K) -> (B, H, R*L).

        Bucket ids are offset by round so that sorting groups round by round; padding gets a bucket of its own.
        """
        factors = [n_buckets] if isinstance(n_buckets, int) else list(n_buckets)
        rotations = self.rotations(n_buckets, vectors) if rotations is None else rotations
        rotated = torch.einsum("bhlk,hkrn->bhrln", vectors.detach(), rotations)  # (B, H, R, L, sum(factors)/2)
        buckets, offset, scale = 0, 0, 1
        for factor in factors:
            part = rotated[..., offset : offset + factor // 2]
            buckets = buckets + scale * torch.cat([part, -part], dim=-1).argmax(dim=-1)
            offset, scale = offset + factor // 2, scale * factor
        total = scale
        if key_mask is not None and not bool(key_mask.all()):
            buckets = torch.where(key_mask[:, None, None, :], buckets, total)
            total += 1
        rounds = torch.arange(self.config.n_hashes, device=vectors.device).view(1, 1, -1, 1)
        return (buckets + rounds * total).flatten(2)  # (B, H, N)

    def sort_order(self, qk: torch.Tensor, key_mask: torch.Tensor | None, cache: dict | None) -> torch.Tensor:
        """(B, H, N) indices sorting (round, bucket, position). A reversible recomputation finds them in `cache`
        (kept from its forward: 4 bytes per index) instead of hashing and sorting again; it still draws the
        rotations so that the dropout masks drawn after them replay unchanged."""
        rotations = self.rotations(self.n_buckets(qk.shape[2]), qk)
        if cache is not None and "order" in cache:
            return cache["order"].long()
        with torch.no_grad():  # argsort is stable and bucket ids are round-major
            order = torch.argsort(self.hash(qk, self.n_buckets(qk.shape[2]), key_mask, rotations), dim=-1, stable=True)
        if cache is not None:
            cache["order"] = order.int()
        return order

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, cache: dict | None = None):
        """(B, L, D) -> (B, L, H*K): hash, sort by bucket, attend within chunks, unsort, combine the rounds."""
        if fast_paths():
            return fast.lsh_attention(self, hidden, key_mask, cache)
        B, L, _ = hidden.shape
        H, R, K = self.num_heads, self.config.n_hashes, self.d_kv
        qk, v = split_heads(self.query_key(hidden), H), split_heads(self.value(hidden), H)  # shared QK: (B, H, L, K)
        drop, training = self.config.attention_dropout_rate, self.training
        if self.config.use_full_attention or L <= self.chunk_length:
            return merge_heads(full_attention(qk, normalise_keys(qk), v, key_mask, self.causal, True, drop, training))
        order = self.sort_order(qk, key_mask, cache)  # (B, H, N): round by round, by bucket, by position
        pos = order % L  # the position of each sorted vector
        qk, v = (x.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, K)) for x in (qk, v))  # sorted (B, H, N, K)
        keys = normalise_keys(qk)  # shared QK: the keys are the queries, normalised (section 2.2)
        chunks = (self.chunk_length, self.config.lsh_num_chunks_before, self.num_chunks_after)  # length, neighbours
        out, lse = chunked_attention(qk, keys, v, pos, key_mask, *chunks, self.causal, True, drop, training)
        undo = order.argsort(-1)  # the inverse permutation: back to (round, position) order
        out = out.view(B, H, R * L, K).gather(2, undo.unsqueeze(-1).expand(-1, -1, -1, K)).view(B, H, R, L, K)
        lse = lse.view(B, H, R * L).gather(2, undo).view(B, H, R, L, 1)
        # rounds combined through their normalisers (section 2.3); exp(lse - logsumexp) rather than softmax: a query
        # that only sees itself has lse near the self-mask value, where the two round differently in fp32
        weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))
        return merge_heads((out * weights).sum(dim=2))


class LocalSelfAttention(nn.Module):
    """Attention within fixed chunks of the sequence and `before`/`after` neighbouring chunks."""

    def __init__(self, config: ReformerConfig, causal: bool, num_chunks_after: int):
        super().__init__()
        self.config, self.causal = config, causal
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.chunk_length, self.num_chunks_after = config.local_chunk_length, num_chunks_after
        inner = config.num_heads * config.d_kv
        self.query = Linear(config.d_model, inner, bias=False)
        self.key = Linear(config.d_model, inner, bias=False)
        self.value = Linear(config.d_model, inner, bias=False)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, cache: dict | None = None):
        """(B, L, D) -> (B, L, H*K)."""
        if fast_paths():
            return fast.local_attention(self, hidden, key_mask)
        B, L, _ = hidden.shape
        q, k, v = (split_heads(proj(hidden), self.num_heads) for proj in (self.query, self.key, self.value))
        k = k / math.sqrt(self.d_kv)  # (B, H, L, K) each
        drop, training = self.config.attention_dropout_rate, self.training
        if L <= self.chunk_length:
            return merge_heads(full_attention(q, k, v, key_mask, self.causal, False, drop, training))
        pos = torch.arange(L, device=hidden.device).view(1, 1, L)  # the same for every row and head
        chunks = (self.chunk_length, self.config.local_num_chunks_before, self.num_chunks_after)  # length, neighbours
        out, _ = chunked_attention(q, k, v, pos, key_mask, *chunks, self.causal, False, drop, training)
        return merge_heads(out.view(B, self.num_heads, L, self.d_kv))


class ReformerSelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dense = Linear(config.num_heads * config.d_kv, config.d_model, bias=False)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden))


class ReformerAttention(nn.Module):
    """Pre-norm self-attention of one layer: LayerNorm -> LSH or local attention -> output projection."""

    def __init__(self, config: ReformerConfig, attn_type: str, causal: bool, num_chunks_after: int | None = None):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        if attn_type == "lsh":
            after = config.lsh_num_chunks_after if num_chunks_after is None else num_chunks_after
            self.self_attention = LSHSelfAttention(config, causal, after)
        else:
            after = config.local_num_chunks_after if num_chunks_after is None else num_chunks_after
            self.self_attention = LocalSelfAttention(config, causal, after)
        self.output = ReformerSelfOutput(config)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, cache: dict | None = None):
        return self.output(self.self_attention(self.layer_norm(hidden), key_mask, cache))


class ReformerCrossAttention(nn.Module):
    """Full attention from the decoder stream (D) to the encoder output (both streams, 2D)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads, self.d_kv, self.drop = config.num_heads, config.d_kv, config.attention_dropout_rate
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.query = Linear(config.d_model, inner, bias=False)
        self.key = Linear(2 * config.d_model, inner, bias=False)
        self.value = Linear(2 * config.d_model, inner, bias=False)
        self.output = ReformerSelfOutput(config)

    def project_kv(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (pre-scaled by 1/sqrt(d_kv)) and values of the encoder output (B, E, 2D) -> 2 x (B, H, E, K)."""
        k = split_heads(self.key(encoder_out), self.num_heads) / math.sqrt(self.d_kv)
        return k, split_heads(self.value(encoder_out), self.num_heads)

    def forward(self, hidden, encoder_out, encoder_mask, kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """hidden (B, L, D) -> (B, L, D); `kv`: `project_kv(encoder_out)` kept from earlier (decoding)."""
        q = split_heads(self.query(self.layer_norm(hidden)), self.num_heads)  # (B, H, L, K)
        k, v = self.project_kv(encoder_out) if kv is None else kv  # (B, H, E, K)
        out = full_attention(q, k, v, encoder_mask, False, False, self.drop, self.training)
        return self.output(merge_heads(out))


class ChunkReformerFeedForward(nn.Module):
    """Pre-norm position-wise feed-forward, applied to `ff_chunk_size` positions at a time (section 3)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size, self.act = config.ff_chunk_size, ACTIVATIONS[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dense = Linear(config.d_model, config.d_ff)
        self.output = Linear(config.d_ff, config.d_model)
        self.dropout = Dropout(config.dropout_rate)

    def forward_chunk(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.dropout(self.dense(self.layer_norm(hidden))))  # (B, S, d_ff)
        return self.dropout(self.output(hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.chunk_size == 0 or hidden.shape[1] <= self.chunk_size:
            return self.forward_chunk(hidden)
        return torch.cat([self.forward_chunk(c) for c in hidden.split(self.chunk_size, dim=1)], dim=1)


class ReformerLayer(nn.Module):
    """One reversible block: f = (self-attention [+ cross-attention]) reads x2, g = feed-forward reads y1."""

    def __init__(self, config: ReformerConfig, attn_type: str, causal: bool, cross: bool, after: int | None = None):
        super().__init__()
        self.attention = ReformerAttention(config, attn_type, causal, after)
        self.crossattention = ReformerCrossAttention(config) if cross else None
        self.feed_forward = ChunkReformerFeedForward(config)

    def f(self, x2, *context, key_mask=None, encoder_mask=None, cache=None):
        out = self.attention(x2, key_mask, cache)
        if self.crossattention is not None:  # still a function of x2 and the encoder only: the block stays invertible
            out = out + self.crossattention(x2 + out, context[0], encoder_mask)
        return out

    def g(self, y1):
        return self.feed_forward(y1)


class ReformerStack(nn.Module):
    """Reversible layers over two copies of the embeddings; LayerNorm over both streams (2D) at the end."""

    def __init__(self, config: ReformerConfig, attn_layers: list[str], causal: bool, cross: bool, after=None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(ReformerLayer(config, t, causal, cross, after) for t in attn_layers)
        self.layer_norm = nn.LayerNorm(2 * config.d_model, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout_rate)
        lengths = {"lsh": config.lsh_chunk_length, "local": config.local_chunk_length}
        used = [lengths[t] for t in set(attn_layers)]
        self.pad_multiple, self.min_chunk = math.lcm(*used), min(used)

    def forward(self, hidden, key_mask=None, encoder_out=None, encoder_mask=None):
        """hidden (B, L, D) -> (B, L, 2D); key_mask (B, L) bool."""
        hidden = torch.cat([hidden, hidden], dim=-1)  # x1 = x2 = embeddings
        context = () if encoder_out is None else (encoder_out,)
        masks = dict(key_mask=key_mask, encoder_mask=encoder_mask)
        hidden = reversible_stack(hidden, self.layers, context, self.config.reversible, **masks)
        return self.dropout(self.layer_norm(hidden))


class ReformerEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        axial = config.axial_pos_shape is not None
        self.position_embeddings = AxialPositionEmbeddings(config) if axial else PositionEmbeddings(config)
        self.dropout = Dropout(config.dropout_rate)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D)"""
        positions = self.position_embeddings(input_ids.shape[1])
        return self.dropout(self.word_embeddings(input_ids)) + self.dropout(positions)


class ReformerModel(GenerationMixin, nn.Module):
    """Reformer with an LM head over both streams; `causal_lm` has one stack (`decoder`), `encoder_decoder` two.
    `generate` decodes with cached keys, values and LSH buckets (`models/reformer_decoding.py`); with `hash_seed=None`
    the rotations are drawn afresh, so set a seed for reproducible decoding."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = ReformerEmbeddings(config)
        if config.layout == "encoder_decoder":
            enc_layers = config.encoder_attn_layers or config.attn_layers
            self.encoder = ReformerStack(config, enc_layers, False, False, config.encoder_num_chunks_after)
        self.decoder = ReformerStack(config, config.attn_layers, True, config.layout == "encoder_decoder")
        self.lm_head = Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, AxialPositionEmbeddings):
            for weight in module.weights:
                nn.init.normal_(weight, std=self.config.axial_norm_std)

    def _run_stack(self, stack, input_ids, mask, encoder_out=None, encoder_mask=None):
        """Embed, pad to a multiple of the chunk lengths (padding masked out), run `stack`; (B, L) -> (B, L, 2D)."""
        B, L = input_ids.shape
        pad = (-L) % stack.pad_multiple if L > stack.min_chunk else 0
        if pad:
            fill = input_ids.new_full((B, pad), self.config.pad_token_id)
            input_ids = torch.cat([input_ids, fill], dim=1)
            mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device) if mask is None else mask
            mask = torch.cat([mask, mask.new_zeros(B, pad)], dim=1)
        hidden = stack(self.embeddings(input_ids), mask, encoder_out, encoder_mask)
        return hidden[:, :L]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, E, 2D)."""
        mask = None if attention_mask is None else attention_mask.bool()
        return self._run_stack(self.encoder, input_ids, mask)

    def decode(self, decoder_input_ids, decoder_attention_mask=None, encoder_out=None, encoder_mask=None):
        """Decoder (or only) stack then LM head: (B, T) -> logits (B, T, V)."""
        mask = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        enc_mask = None if encoder_mask is None else encoder_mask.bool()
        hidden = self._run_stack(self.decoder, decoder_input_ids, mask, encoder_out, enc_mask)
        chunk = self.config.lm_head_chunk_size
        if chunk == 0 or hidden.shape[1] <= chunk:
            return self.lm_head(hidden)
        return torch.cat([self.lm_head(h) for h in hidden.split(chunk, dim=1)], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T_dec, V) for encoder-decoder, (B, L, V) for causal_lm."""
        if prefix_lengths is not None:
            raise ValueError("prefix_lengths is only for the prefix_lm layout, which the Reformer does not have")
        if self.config.layout == "causal_lm":
            if decoder_input_ids is not None or decoder_attention_mask is not None:
                raise ValueError("causal_lm takes input_ids/attention_mask only; decoder_* must be None")
            return self.decode(input_ids, attention_mask)
        if decoder_input_ids is None:
            raise ValueError("encoder_decoder needs decoder_input_ids")
        encoder_out = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, decoder_attention_mask, encoder_out, attention_mask)

    # decoding protocol of models/generation.py, with caches: models/reformer_decoding.py
    def init_decoding(self, input_ids, attention_mask=None, num_beams: int = 1) -> dict[str, Any]:
        """Run the encoder once (its keys/values per decoder layer kept) and prepare empty per-layer caches."""
        return reformer_decoding.init_state(self, input_ids, attention_mask, num_beams)

    def decode_step(self, tokens: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """tokens (N, t) new since the last call -> logits of the last position (N, V); caches grow by t."""
        return reformer_decoding.decode_step(self, tokens, state)

    def reorder_state(self, state: dict[str, Any], beam_idx: torch.Tensor) -> dict[str, Any]:
        return reformer_decoding.reorder_state(state, beam_idx)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; non-embedding excludes token and position embeddings and the output projection."""
        excluded = ("embeddings.", "lm_head.")
        return sum(p.numel() for n, p in self.named_parameters() if not (non_embedding and n.startswith(excluded)))

    def training_flops(self, batch_size: int, input_len: int, target_len: int = 0) -> float:
        """Estimated FLOPs of one training step (`training_flops` of the config)."""
        return training_flops(self.config, batch_size, input_len, target_len)
