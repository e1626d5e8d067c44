"""The evaluation path of decoder-only models (`pipeline.evaluate.generate_texts`): prompts of different lengths
are left-padded so the continuations line up, and only the continuation is decoded, for both families."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from pipeline.config import load_config
from pipeline.evaluate import generate_texts
from tests.train_project import ROOT


class _ByteTokenizer:
    """Characters as ids 3..52 (pad 0, eos 1); decode writes the ids, so the test sees exactly what was decoded."""

    def encode(self, texts, add_eos=True):
        return [[3 + (ord(c) % 50) for c in t] + ([1] if add_eos else []) for t in texts]

    def decode(self, ids, skip_special=True):
        return " ".join(str(i) for i in ids if not (skip_special and i in (0, 1)))


CASES = [("t5", "causal_lm"), ("t5", "prefix_lm"), ("reformer", "causal_lm")]
INPUTS = ["abc", "hello world", "x", "a longer prompt than the others"]


def _model(family: str, layout: str) -> torch.nn.Module:
    cfg = load_config(ROOT / "params.yaml")
    base = cfg.model_config("t5" if family == "t5" else "reformer")
    overrides = dict(vocab_size=64, dropout_rate=0.0, layout=layout)
    if family == "t5":
        overrides.update(d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=2)
    else:  # one chunk holds the whole sequence, fixed hash rotations: the padding is the only thing that moves
        overrides.update(d_model=32, d_kv=8, d_ff=64, num_heads=2, hash_seed=1, lsh_chunk_length=64,
                         local_chunk_length=64, axial_pos_shape=[8, 16], axial_pos_dims=[16, 16])  # fmt: skip
    torch.manual_seed(0)
    config = type(base).from_preset("tiny", **overrides)
    return build_model(family, config).eval()


def _cfg(batch_size: int):
    cfg = load_config(ROOT / "params.yaml")
    cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens = batch_size, 6
    return cfg


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_left_padded_batch_decodes_only_the_continuation(family, layout):
    model = _model(family, layout)
    tok = _ByteTokenizer()
    got = generate_texts(model, tok, INPUTS, 1, _cfg(len(INPUTS)))
    # the same batch built by hand: left padding, then the generated tokens after the prompt width
    ids = tok.encode(INPUTS)
    width = max(len(r) for r in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, row in enumerate(ids):
        batch[i, width - len(row) :], mask[i, width - len(row) :] = torch.tensor(row), True
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out[:, :width], batch)  # decoder-only: prompt + continuation
    assert got == [tok.decode(r.tolist()) for r in out[:, width:]]
    assert len(got) == len(INPUTS) and all(len(g.split()) <= 6 for g in got)
    assert got != [" ".join(str(i) for i in row[:-1]) for row in ids]  # not the prompts echoed


@pytest.mark.parametrize(("family", "layout"), [c for c in CASES if c[0] == "t5"])
def test_left_padding_does_not_change_a_relative_position_model(family, layout):
    # T5's relative position bias is shift-invariant: a prompt decodes the same alone or left-padded in a batch
    model = _model(family, layout)
    tok = _ByteTokenizer()
    batched = generate_texts(model, tok, INPUTS, 1, _cfg(len(INPUTS)))
    alone = [generate_texts(model, tok, [text], 1, _cfg(1))[0] for text in INPUTS]
    assert batched == alone
