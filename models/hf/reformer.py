"""Conversion between our decoder-only Reformer and `transformers`' `ReformerModelWithLMHead`.

Our parameter names follow `transformers`, so the conversion is the short renaming table `_RENAMES` plus the
config field table `_CONFIG_FIELDS`. `transformers` is imported lazily.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from models.reformer import ReformerConfig, ReformerModel

# (ours, transformers) regular expressions, applied to parameter names in order
_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.", "reformer.embeddings."),
    (r"^decoder\.layers\.(\d+)\.feed_forward\.dense\.", r"reformer.encoder.layers.\1.feed_forward.dense.dense."),
    (r"^decoder\.layers\.(\d+)\.feed_forward\.output\.", r"reformer.encoder.layers.\1.feed_forward.output.dense."),
    (r"^decoder\.", "reformer.encoder."),
    (r"^lm_head\.", "lm_head.decoder."),
]

# our config field -> transformers' ReformerConfig field
_CONFIG_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "d_kv": "attention_head_size",
    "num_heads": "num_attention_heads",
    "d_ff": "feed_forward_size",
    "attn_layers": "attn_layers",
    "n_hashes": "num_hashes",
    "n_buckets": "num_buckets",
    "lsh_chunk_length": "lsh_attn_chunk_length",
    "lsh_num_chunks_before": "lsh_num_chunks_before",
    "lsh_num_chunks_after": "lsh_num_chunks_after",
    "local_chunk_length": "local_attn_chunk_length",
    "local_num_chunks_before": "local_num_chunks_before",
    "local_num_chunks_after": "local_num_chunks_after",
    "hash_seed": "hash_seed",
    "max_position_embeddings": "max_position_embeddings",
    "ff_chunk_size": "chunk_size_feed_forward",
    "lm_head_chunk_size": "chunk_size_lm_head",
    "hidden_act": "hidden_act",
    "dropout_rate": "hidden_dropout_prob",
    "attention_dropout_rate": "lsh_attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
    "axial_norm_std": "axial_norm_std",
    "pad_token_id": "pad_token_id",
    "eos_token_id": "eos_token_id",
}


def hf_name(name: str) -> str:
    """Our parameter name -> the `ReformerModelWithLMHead` one."""
    for pattern, replacement in _RENAMES:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no transformers name for parameter {name!r}")


def config_from_hf(hf_config: Any, **overrides: Any) -> ReformerConfig:
    """Our decoder-only `ReformerConfig` from a `transformers.ReformerConfig`."""
    if not hf_config.is_decoder:
        raise ValueError("only decoder-only Reformers (is_decoder=True) convert to our causal_lm layout")
    values = {ours: getattr(hf_config, theirs) for ours, theirs in _CONFIG_FIELDS.items()}
    values["attn_layers"] = list(values["attn_layers"])
    if isinstance(values["n_buckets"], (list, tuple)):
        values["n_buckets"] = list(values["n_buckets"])
    if hf_config.local_attention_probs_dropout_prob != hf_config.lsh_attention_probs_dropout_prob:
        # we have one attention dropout; keep the larger so that evaluation (no dropout) is what matters
        values["attention_dropout_rate"] = max(
            hf_config.local_attention_probs_dropout_prob, hf_config.lsh_attention_probs_dropout_prob
        )
    if hf_config.axial_pos_embds:
        values["axial_pos_shape"] = list(hf_config.axial_pos_shape)
        values["axial_pos_dims"] = list(hf_config.axial_pos_embds_dim)
    else:
        values["axial_pos_shape"] = values["axial_pos_dims"] = None
    if values["pad_token_id"] is None:
        values["pad_token_id"] = 0
    if isinstance(values["eos_token_id"], (list, tuple)) or values["eos_token_id"] is None:
        values["eos_token_id"] = (list(values["eos_token_id"] or []) or [1])[0]
    values.update(layout="causal_lm", tie_word_embeddings=False, reversible=True)
    values.update(overrides)
    return ReformerConfig(**values)


def config_to_hf(config: ReformerConfig) -> Any:
    """`transformers.ReformerConfig` (is_decoder=True) of our decoder-only `ReformerConfig`."""
    from transformers import ReformerConfig as HFReformerConfig

    if config.layout != "causal_lm":
        raise ValueError(f"transformers has no encoder-decoder Reformer; only causal_lm converts (got {config.layout})")
    if config.use_full_attention:
        raise ValueError("use_full_attention has no transformers counterpart")
    values = {theirs: getattr(config, ours) for ours, theirs in _CONFIG_FIELDS.items()}
    values["local_attention_probs_dropout_prob"] = config.attention_dropout_rate
    axial = config.axial_pos_shape is not None
    values["axial_pos_embds"] = axial
    if axial:
        values["axial_pos_shape"] = tuple(config.axial_pos_shape)
        values["axial_pos_embds_dim"] = tuple(config.axial_pos_dims)
    return HFReformerConfig(is_decoder=True, tie_word_embeddings=False, use_cache=False, **values)


@torch.no_grad()
def reformer_from_hf(hf_model: Any, **overrides: Any) -> ReformerModel:
    """Our decoder-only `ReformerModel` with the weights of a `transformers.ReformerModelWithLMHead`."""
    model = ReformerModel(config_from_hf(hf_model.config, **overrides))
    theirs = hf_model.state_dict()
    state = {}
    for name in model.state_dict():
        key = hf_name(name)
        if key not in theirs:
            raise KeyError(f"{key} (for our {name}) is missing from the transformers model")
        state[name] = theirs[key]
    model.load_state_dict(state)
    return model.train(hf_model.training)


@torch.no_grad()
def reformer_to_hf(model: ReformerModel, directory: str | Path | None = None) -> Any:
    """A `transformers.ReformerModelWithLMHead` with our decoder-only weights (also saved to `directory` if given)."""
    from transformers import ReformerModelWithLMHead

    hf_model = ReformerModelWithLMHead(config_to_hf(model.config))
    state = {hf_name(name): tensor for name, tensor in model.state_dict().items()}
    state["lm_head.bias"] = state["lm_head.decoder.bias"]  # a second copy in transformers; forward reads decoder's
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("mask_value_float16") and "mask_value" not in k]:
        raise KeyError(f"weights do not match transformers: missing {missing}, unexpected {unexpected}")
    hf_model.train(model.training)
    if directory is not None:
        hf_model.save_pretrained(str(directory))
    return hf_model
