"""Parity of our decoder-only Reformer with `transformers.ReformerModelWithLMHead` (random weights, no hub), logits and
training gradients on both paths (the reference model file and the speed paths)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ReformerModelWithLMHead  # noqa: E402
from transformers.utils import logging  # noqa: E402

from models.hf.reformer import config_to_hf, reformer_from_hf, reformer_to_hf  # noqa: E402
from models.reformer import ReformerConfig, ReformerModel  # noqa: E402
from tests.kernel_setting import computing  # noqa: E402

logging.set_verbosity_error()


@pytest.fixture(params=["reference", "fast"])
def paths(request):
    with computing(paths=request.param):
        yield request.param


BASE = dict(
    vocab_size=61,
    layout="causal_lm",
    d_model=32,
    d_kv=8,
    num_heads=3,
    d_ff=40,
    hash_seed=7,
    dropout_rate=0.0,
    axial_pos_shape=[8, 16],
    axial_pos_dims=[12, 20],
)

CASES = {
    "local_only": dict(attn_layers=["local", "local"], local_chunk_length=8),
    "lsh_only": dict(attn_layers=["lsh", "lsh"], lsh_chunk_length=8, n_hashes=2, n_buckets=8),
    "mixed": dict(attn_layers=["local", "lsh", "local", "lsh"], lsh_chunk_length=4, local_chunk_length=16, n_hashes=4),
    "mixed_plain_positions": dict(
        attn_layers=["lsh", "local"],
        axial_pos_shape=None,
        axial_pos_dims=None,
        max_position_embeddings=128,
        n_hashes=3,
        lsh_chunk_length=16,
        local_chunk_length=8,
        hidden_act="gelu",
    ),
    "factorised_buckets": dict(attn_layers=["lsh"], lsh_chunk_length=4, n_buckets=[4, 6], local_num_chunks_before=2),
    "more_lookback": dict(
        attn_layers=["local", "lsh"], lsh_num_chunks_before=2, local_num_chunks_before=2, lsh_chunk_length=8
    ),
}


def _pair(case: str) -> tuple[ReformerModelWithLMHead, ReformerModel]:
    config = ReformerConfig(**{**BASE, **CASES[case]})
    torch.manual_seed(0)
    hf_model = ReformerModelWithLMHead(config_to_hf(config))
    with torch.no_grad():  # transformers initialises LayerNorms to (1, 0): randomise them so the mapping is tested
        for name, p in hf_model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    return hf_model, reformer_from_hf(hf_model)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [64, 37])  # 37: both pad to a multiple of the chunk lengths
def test_logits_match_transformers(case, length, paths):
    hf_model, ours = _pair(case)
    hf_model.eval(), ours.eval()
    ids = torch.randint(0, 61, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 9 :] = 0
    for attention_mask in (None, mask):
        with torch.no_grad():
            expected = hf_model(ids, attention_mask=attention_mask).logits
            got = ours(ids, attention_mask)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["lsh_only", "mixed"])
def test_training_gradients_match_transformers(case, paths):
    """Both run their reversible backward; dropout off, fixed hash seed."""
    hf_model, ours = _pair(case)
    hf_model.train(), ours.train()
    ids = torch.randint(0, 61, (2, 128))  # transformers trains only on exactly prod(axial_pos_shape) tokens
    hf_model(ids, labels=ids).loss.backward()
    logits = ours(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    theirs = dict(hf_model.named_parameters())
    from models.hf.reformer import hf_name

    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[hf_name(name)].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_export_to_transformers_roundtrip(tmp_path):
    config = ReformerConfig(**{**BASE, **CASES["mixed"]})
    torch.manual_seed(1)
    ours = ReformerModel(config).eval()
    ids = torch.randint(0, 61, (1, 48))
    hf_model = reformer_to_hf(ours, tmp_path / "hf")
    reloaded = ReformerModelWithLMHead.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(hf_model(ids).logits, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-4)
    back = reformer_from_hf(reloaded)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_encoder_decoder_does_not_export():
    with pytest.raises(ValueError, match="encoder-decoder"):
        reformer_to_hf(ReformerModel(ReformerConfig(**{**BASE, "layout": "encoder_decoder"})))
