"""Conversion between our T5 (`models.t5.T5Model`) and `transformers`' `T5ForConditionalGeneration`.

Our parameter names are the reference's, so the conversion is a table: the reference additionally holds
`encoder.embed_tokens` / `decoder.embed_tokens` (aliases of `shared`) and, when embeddings are tied,
`lm_head` (another alias). `transformers` is imported lazily: `models` itself needs only torch.

Tied vs untied: the reference's config field `tie_word_embeddings` means "v1.0: tied and output rescaled by
d_model**-0.5"; recent `transformers` versions record the rescale as `scale_decoder_outputs` and keep
`lm_head` as a separate weight when the checkpoint holds a different one. Both spellings are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.t5 import T5Config, T5Model

_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_CONFIG_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "initializer_factor",
    "feed_forward_proj",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


def _is_tied(hf_config) -> bool:
    """v1.0 (tied, rescaled output) or v1.1 (untied, no rescale), from either transformers spelling."""
    scale = getattr(hf_config, "scale_decoder_outputs", None)
    if scale is not None:
        return bool(scale)
    return bool(getattr(hf_config, "tie_word_embeddings", True))


def config_from_hf(hf_config, **overrides) -> T5Config:
    """Our `T5Config` from a `transformers.T5Config` (or a dict of its JSON)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    values = {name: get(name) for name in _CONFIG_FIELDS if get(name) is not None}
    if isinstance(values.get("eos_token_id"), list):
        values["eos_token_id"] = values["eos_token_id"][0]
    values.setdefault("decoder_start_token_id", values.get("pad_token_id", 0))
    if isinstance(hf_config, dict):
        scale = hf_config.get("scale_decoder_outputs")
        tied = bool(scale) if scale is not None else bool(hf_config.get("tie_word_embeddings", True))
    else:
        tied = _is_tied(hf_config)
    if values.get("feed_forward_proj") not in ("relu", "gated-gelu"):
        raise ValueError(f"unsupported feed_forward_proj {values.get('feed_forward_proj')!r} (relu or gated-gelu)")
    return T5Config(**{**values, "tie_word_embeddings": tied, **overrides})


def _from_state_dict(config: T5Config, state: dict[str, torch.Tensor]) -> T5Model:
    model = T5Model(config)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    ignorable = set(_ALIASES) | {
        "lm_head.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
    unexpected = sorted(set(state) - set(ours) - ignorable)
    if unexpected:
        raise ValueError(f"checkpoint has weights our T5 does not: {', '.join(unexpected[:8])}")
    model.load_state_dict({k: state[k] for k in ours}, strict=True)
    return model


def t5_from_hf(hf_model, **overrides) -> T5Model:
    """Our T5Model with the same weights as a `transformers` `T5ForConditionalGeneration` (or `T5Model`).

    `overrides` change config fields that do not affect weights (e.g. `dropout_rate`, `attention_backend`).
    """
    config = config_from_hf(hf_model.config, **overrides)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if not config.tie_word_embeddings and "lm_head.weight" in state:
        state["lm_head.weight"] = hf_model.lm_head.weight.detach().clone()
    model = _from_state_dict(config, state)
    return model.train(hf_model.training)


def hf_config_dict(config: T5Config) -> dict:
    """The `config.json` that `transformers.T5ForConditionalGeneration.from_pretrained` reads."""
    if config.layout != "encoder_decoder":
        raise ValueError(f"transformers has no T5 for layout {config.layout!r}; only encoder_decoder exports")
    d = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    d.update(
        architectures=["T5ForConditionalGeneration"],
        model_type="t5",
        is_encoder_decoder=True,
        tie_word_embeddings=config.tie_word_embeddings,
        scale_decoder_outputs=config.tie_word_embeddings,
        dense_act_fn="gelu_new" if config.is_gated else "relu",
        is_gated_act=config.is_gated,
    )
    return d


def hf_state_dict(model: T5Model) -> dict[str, torch.Tensor]:
    """Our weights under the reference's names, aliases included (contiguous copies, safe to save)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for alias in _ALIASES:
        state[alias] = state["shared.weight"]
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["shared.weight"]
    return state


def t5_to_hf(model: T5Model):
    """A `transformers.T5ForConditionalGeneration` with our weights (needs `transformers`)."""
    import transformers

    hf_config = transformers.T5Config(**{k: v for k, v in hf_config_dict(model.config).items() if k != "architectures"})
    hf_model = transformers.T5ForConditionalGeneration(hf_config)
    state = hf_state_dict(model)
    if not model.config.tie_word_embeddings:  # recent transformers tie lm_head at construction: untie it
        hf_model.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"].clone())
    hf_model.load_state_dict(state, strict=False)
    hf_model.lm_head.weight.data.copy_(state["lm_head.weight"])
    return hf_model.train(model.training)


def save_t5_pretrained(model: T5Model, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` in the layout of `transformers`' `save_pretrained`.

    Needs only torch and safetensors; the directory loads with
    `transformers.T5ForConditionalGeneration.from_pretrained(directory)`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    # safetensors refuses shared storage: store each alias once, transformers re-ties on load
    for alias in _ALIASES:
        state.pop(alias)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2, sort_keys=True) + "\n")
    return directory


def load_t5_checkpoint(directory: str | Path, **overrides) -> T5Model:
    """Our T5Model from a local original-T5 checkpoint directory (as `transformers`' `save_pretrained` writes).

    Reads `config.json` and `model.safetensors` (or `pytorch_model.bin`, loaded with `weights_only=True`);
    needs neither `transformers` nor network access, so fine-tuning can start from e.g. a downloaded t5-small.
    """
    directory = Path(directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()), **overrides)
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
    elif (directory / "pytorch_model.bin").is_file():
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")
    if "shared.weight" not in state:  # some exports keep only the encoder's alias
        for alias in _ALIASES:
            if alias in state:
                state["shared.weight"] = state[alias]
                break
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise ValueError(f"{directory}: untied (v1.1) config but the checkpoint has no lm_head.weight")
    return _from_state_dict(config, state)
