"""The speed paths of our T5 (models/fast/t5.py) against the reference (models/t5.py, models/t5_decoding.py): the
same model and inputs computed both ways give the same logits, training gradients and generated tokens, within
rounding. With dropout on, the `eager` backend draws its dropout masks in the same order as the fast path (the one
`drop_mask` of both), so even a training step with dropout compares; SDPA's own dropout draws differently, so the
`sdpa` rows run without dropout. Each test also checks that the fast forms really ran (a comparison of the reference
with itself would pass trivially)."""

from __future__ import annotations

import pytest
import torch

import models
import models.fast.t5 as fast_t5
from models.t5 import T5Config, T5Model
from tests.kernel_setting import Spy, both, computing

CONFIGS = {
    "v1.0-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "causal_lm": dict(layout="causal_lm"),
    "prefix_lm": dict(layout="prefix_lm", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "checkpointed": dict(gradient_checkpointing=True, num_decoder_layers=3),
}
FAST = ["forward", "project_qkv", "attend", "masks"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(name: str, **kw) -> T5Model:
    torch.manual_seed(0)
    base = dict(vocab_size=80, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5Model(T5Config(**{**base, **CONFIGS[name], **kw}))


def inputs(model: T5Model, seed: int = 1):
    """(args, kwargs, targets) of one padded batch for the model's layout; padded targets are -100 (no loss), as the
    pipeline's labels: a query row whose every key is padding or in its future (causal LM, left padding) then gets
    no gradient either way (with one, the reference's masked-fill and the fast path's summed bias gradient would
    differ in those rows' position-bias gradient)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(2, 80, (3, 11), generator=g), torch.randint(2, 80, (3, 6), generator=g)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    layout = model.config.layout
    if layout == "encoder_decoder":
        y_mask = torch.ones_like(y)
        y_mask[0, 4:] = 0
        return (x, mask, y, y_mask), {}, y.masked_fill(y_mask == 0, -100)
    kwargs = {"prefix_lengths": torch.tensor([4, 2, 7])} if layout == "prefix_lm" else {}
    return (x, mask), kwargs, x.masked_fill(mask == 0, -100)


def close(a, b, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dropout", [("sdpa", 0.0), ("eager", 0.1)], ids=["sdpa", "eager-dropout"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_logits_and_gradients_equal_the_reference(name, backend, dropout, monkeypatch):
    model = model_for(name, attention_backend=backend, dropout_rate=dropout).train()
    args, kwargs, targets = inputs(model)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(*args, **kwargs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    spy = Spy(monkeypatch, fast_t5, [*FAST, "relu_feed_forward", "gated_feed_forward"])
    (ref_logits, ref_grads), (logits, grads) = both(step)
    assert spy.calls["forward"] == 1 and spy.calls["attend"] > 0 and spy.calls["project_qkv"] > 0
    close(logits, ref_logits)
    assert ref_grads.keys() == grads.keys()
    for n, g in ref_grads.items():
        close(grads[n], g, 2e-5)
    if dropout:  # dropout is live (another draw gives other logits): equal above means the same draws
        with computing(paths="reference"):
            torch.manual_seed(6)
            assert not torch.allclose(step()[0], ref_logits, atol=1e-3)


@pytest.mark.parametrize("onednn", [False, True], ids=["blas", "onednn"])
def test_training_step_with_the_onednn_kernel_equals_the_reference(onednn):
    if onednn and not models.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    model = model_for("v1.0-relu-tied").train()
    args, _, targets = inputs(model)

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(*args).flatten(0, 1), targets.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, fast = both(step, matmul="onednn" if onednn else "blas")
    for n, g in ref.items():
        close(fast[n], g, 2e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_logits_equal_the_reference(name, monkeypatch):
    """Inference: stacked q/k/v weights, and for encoder-decoder with padding the encoder over the real tokens only."""
    model = model_for(name).eval()
    args, kwargs, _ = inputs(model)
    spy = Spy(monkeypatch, fast_t5, [*FAST, "forward_unpadded"])
    with torch.no_grad():
        ref, fast = both(lambda: model(*args, **kwargs))
    close(fast, ref)
    assert spy.calls["forward"] == 1 and spy.calls["project_qkv"] > 0
    assert spy.calls["forward_unpadded"] == (model.config.layout == "encoder_decoder")


@pytest.mark.parametrize("name", ["v1.0-relu-tied", "prefix_lm"])
def test_eval_with_autograd_equals_the_reference(name):
    """Eval mode with autograd on (gradients wrt the weights, e.g. saliency): three products and the hand-written
    attention backward on the fast path."""
    model = model_for(name).eval()
    args, kwargs, targets = inputs(model)

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(*args, **kwargs)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (ref_logits, ref), (logits, fast) = both(grads)
    close(logits, ref_logits)
    for n, g in ref.items():
        close(fast[n], g, 2e-5)


@pytest.mark.parametrize("decoding", ["plain", "shaped"])
@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("name", ["v1.0-relu-tied", "v1.1-gated-untied", "causal_lm", "prefix_lm"])
def test_generation_equals_the_reference(name, beams, decoding, monkeypatch):
    """Greedy and beam search give the same tokens; each decoding step's logits agree within rounding."""
    model = model_for(name, vocab_size=80).eval()
    args, _, _ = inputs(model)
    x, mask = args[0], args[1]
    spy = Spy(monkeypatch, fast_t5, ["init_decoding", "decode_step"])
    with torch.no_grad():
        ref, fast = both(
            lambda: model.generate(x, mask, max_new_tokens=9, num_beams=beams, eos_token_id=-1), decoding=decoding
        )
    assert torch.equal(fast, ref)
    assert spy.calls["init_decoding"] == 1 and spy.calls["decode_step"] == 9

    P = 1 if model.config.layout == "encoder_decoder" else x.shape[1]  # the decoder's first input: start or prompt

    def steps():  # teacher-forced on the generated tokens: every step's logits, both paths
        state, logits = model.init_decoding(x, mask, 1), []
        tokens = ref[:, :P]
        for i in range(6):
            out, state = model.decode_step(tokens, state)
            logits.append(out)
            tokens = ref[:, P + i : P + i + 1]
        return torch.stack(logits)

    with torch.no_grad():
        ref_steps, fast_steps = both(steps, decoding=decoding)
    close(fast_steps, ref_steps)
