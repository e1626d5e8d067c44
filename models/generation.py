"""Greedy and beam-search decoding, written once for every model family.

A family takes part by implementing three methods (see `docs/interfaces.md`):

- `init_decoding(input_ids, attention_mask, num_beams) -> state`: runs what is computed once per
  input (the encoder, cross-attention keys/values) and expands it per beam;
- `decode_step(tokens, state) -> (logits (N, V), state)`: feeds the new token(s) `(N, t)` since the
  last call (the whole prompt on the first call of a decoder-only model) and returns the logits of
  the last position;
- `reorder_state(state, beam_idx) -> state`: keeps the caches of the beams that survive a step.

Dimension legend: B batch, K beams, N = B * K rows fed to the model, V vocabulary, P prompt length
(1, the start token, for encoder-decoder models), L = P + max_new_tokens.

Beam search follows `transformers`' vectorised beam search with its defaults (`early_stopping=False`,
length penalty `score / generated_len ** length_penalty`), so the two return the same beams for the
same weights. Sequences that finish early are padded with `pad_token_id`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = -1.0e9  # "impossible" score, the same constant transformers uses, so ties break identically


def _first_tokens(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """What the decoder sees first: the start token (encoder-decoder) or the prompt (decoder-only)."""
    config = model.config
    if config.layout == "encoder_decoder":
        start = config.decoder_start_token_id
        return torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
    return input_ids


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    length_penalty: float = 1.0,
) -> torch.LongTensor:
    """Decode up to `max_new_tokens` tokens with cached incremental decoding.

    Returns `(B, P + n)` token ids: for encoder-decoder models the decoder start token followed by the
    generated tokens, for decoder-only models the prompt followed by the continuation. `eos_token_id`
    and `pad_token_id` default to the model config's; `eos_token_id=-1` disables stopping at EOS.
    """
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if num_beams == 1:
        return _greedy(model, input_ids, attention_mask, max_new_tokens, eos, pad)
    return _beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, eos, pad, length_penalty)


def _greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos: int,
    pad: int,
) -> torch.Tensor:
    state = model.init_decoding(input_ids, attention_mask, 1)
    tokens = _first_tokens(model, input_ids)  # (B, P)
    pieces = [tokens]
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits, state = model.decode_step(tokens, state)  # (B, V)
        next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        pieces.append(next_tokens[:, None])
        finished = finished | (next_tokens == eos)
        if bool(finished.all()):
            break
        tokens = next_tokens[:, None]
    return torch.cat(pieces, dim=1)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick rows along dim 1: tensor (B, M, ...), index (B, K) -> (B, K, ...)."""
    index = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)


def _beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    eos: int,
    pad: int,
    length_penalty: float,
) -> torch.Tensor:
    B, K, device = input_ids.shape[0], num_beams, input_ids.device
    state = model.init_decoding(input_ids, attention_mask, K)
    prompt = _first_tokens(model, input_ids).repeat_interleave(K, dim=0)  # (N, P)
    P = prompt.shape[1]
    L = P + max_new_tokens
    C = 2 * K  # candidates kept per step: enough that K of them can still be running after EOS hits

    running = torch.full((B, K, L), pad, dtype=torch.long, device=device)
    running[:, :, :P] = prompt.view(B, K, P)
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand at step 0
    done_seqs = running.clone()
    done_scores = torch.full((B, K), _NEG, device=device)
    done_flags = torch.zeros(B, K, dtype=torch.bool, device=device)
    done_lens = torch.zeros(B, K, dtype=torch.long, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(C, device=device) < K
    batch_offset = torch.arange(B, device=device)[:, None] * K

    tokens = prompt
    for step in range(max_new_tokens):
        cur_len = P + step
        logits, state = model.decode_step(tokens, state)  # (N, V)
        V = logits.shape[-1]
        scores = F.log_softmax(logits.float(), dim=-1).view(B, K, V) + running_scores[:, :, None]
        cand_scores, cand_idx = scores.view(B, K * V).topk(C, dim=1)  # (B, C)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        cand_seqs = _gather(running, cand_beam)  # (B, C, L)
        cand_seqs[:, :, cur_len] = cand_tok
        hits = (cand_tok == eos) | (cur_len + 1 >= L)  # (B, C): the candidate stops here

        # Beams that go on: the best K candidates that did not stop.
        alive_scores = cand_scores + hits.float() * _NEG
        keep = alive_scores.topk(K, dim=1).indices  # (B, K)
        running = _gather(cand_seqs, keep)
        running_scores = _gather(alive_scores, keep)
        source_beam = _gather(cand_beam, keep)

        # Finished hypotheses: stopped candidates among the top K, length-normalised, merged with the old.
        gen_len = cur_len + 1 - P
        new_scores = cand_scores / (gen_len**length_penalty)
        new_scores = new_scores + (~improvable).float() * _NEG + (~(hits & top_k_mask)).float() * _NEG
        merged_scores = torch.cat([done_scores, new_scores], dim=1)
        best = merged_scores.topk(K, dim=1).indices
        done_seqs = _gather(torch.cat([done_seqs, cand_seqs], dim=1), best)
        done_scores = _gather(merged_scores, best)
        done_flags = _gather(torch.cat([done_flags, hits & top_k_mask], dim=1), best)
        done_lens = _gather(torch.cat([done_lens, torch.full_like(cand_tok, gen_len)], dim=1), best)

        # Can a running beam still beat the worst finished one? (transformers' heuristic for early_stopping=False)
        best_running = running_scores[:, :1] / (gen_len**length_penalty)
        worst_done = torch.where(done_flags, done_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_done).any(dim=1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        state = model.reorder_state(state, (source_beam + batch_offset).view(-1))
        tokens = running[:, :, cur_len].reshape(B * K, 1)

    out_len = P + int(done_lens[:, 0].max())
    return done_seqs[:, 0, :out_len]


class Uncached:
    """Decoding without caches, for any model of the interface: every step re-runs `model.forward` over the whole
    prefix (encoder included) and keeps the last position's logits. The reference the cached decoding of each
    family is tested and benchmarked against: `generate(Uncached(model), ...)`."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.config = model, model.config

    def init_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_beams: int) -> dict:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask.bool().repeat_interleave(num_beams, dim=0)
        ids = input_ids.repeat_interleave(num_beams, dim=0)
        return {"input_ids": ids, "mask": mask, "prompt": ids.shape[1], "tokens": ids[:, :0]}

    def decode_step(self, tokens: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        seq = torch.cat([state["tokens"], tokens], dim=1)
        state = {**state, "tokens": seq}
        if self.config.layout == "encoder_decoder":
            return self.model(state["input_ids"], state["mask"], decoder_input_ids=seq)[:, -1], state
        grown = seq.shape[1] - state["mask"].shape[1]  # decoder-only: `seq` starts with the prompt
        mask = torch.cat([state["mask"], state["mask"].new_ones(seq.shape[0], grown)], dim=1)
        extra = {}
        if self.config.layout == "prefix_lm":
            extra["prefix_lengths"] = torch.full((seq.shape[0],), state["prompt"], device=seq.device)
        return self.model(seq, mask, **extra)[:, -1], state

    def reorder_state(self, state: dict, beam_idx: torch.Tensor) -> dict:
        return {k: v.index_select(0, beam_idx) if torch.is_tensor(v) else v for k, v in state.items()}


class GenerationMixin:
    """Gives a model family the interface's `generate` method on top of its three decoding methods."""

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
        """Greedy (`num_beams=1`) or beam search; see `models.generation.generate`."""
        return generate(
            self, input_ids, attention_mask, max_new_tokens, num_beams, eos_token_id, pad_token_id, length_penalty
        )
