"""Reversible residual layers (RevNet, Gomez et al. 2017), as used by the Reformer (arXiv 2001.04451, section 3).

A block holds two functions f (attention) and g (feed-forward) and maps a pair of streams

    y1 = x1 + f(x2, *context)        x2 = y2 - g(y1)
    y2 = x2 + g(y1)                  x1 = y1 - f(x2, *context)

so the inputs of every block can be recomputed from its outputs. `ReversibleFunction` runs the whole stack
without storing any activation (only the final two streams are saved) and, in the backward pass, walks the
blocks from the top, rebuilding each block's inputs from its outputs and back-propagating through a fresh
recomputation of f and g. Memory therefore does not grow with depth (section 3, "Reversible Transformer").

The recomputation must see the same randomness as the forward pass (dropout masks, and the random rotations
of LSH hashing when they are drawn from the global generator), so the RNG state before each f and g call is
recorded and replayed. `context` are tensors every f reads besides x2 (the encoder output for cross-attention);
their gradients are accumulated over the blocks and returned. Each f also gets a `cache` dict, the same in the
forward pass and in its recomputation, where a block may keep small results that need no gradient (the LSH sort
order) instead of computing them twice; it is None in an ordinary residual stack.

Dimension legend: B batch, L sequence length, D model width (each stream), 2D both streams concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch


class ReversibleBlock(Protocol):
    """What the stack needs from a block: the two residual branches."""

    def f(self, x2: torch.Tensor, *context: torch.Tensor, cache: dict | None = None, **kwargs: Any) -> torch.Tensor: ...

    def g(self, y1: torch.Tensor) -> torch.Tensor: ...


class RandomState:
    """The CPU (and, for CUDA tensors, the device) random state at construction, replayable later."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        """Run the body under the recorded state, then put the current state back."""
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state(self.device) if self.cuda_state is not None else None
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if cuda_now is not None:
                torch.cuda.set_rng_state(cuda_now, self.device)


class ReversibleFunction(torch.autograd.Function):
    """Run `blocks` reversibly on `hidden` (B, L, 2D) = [x1, x2]; returns [y1, y2] of the last block."""

    @staticmethod
    def forward(ctx, hidden, blocks, kwargs, *context):
        # autograd is off inside Function.forward: nothing below is stored for backward
        x1, x2 = torch.chunk(hidden, 2, dim=-1)
        states = []
        for block in blocks:
            f_state, cache = RandomState(hidden.device), {}
            x1 = x1 + block.f(x2, *context, cache=cache, **kwargs)
            g_state = RandomState(hidden.device)
            x2 = x2 + block.g(x1)
            states.append((f_state, g_state, cache))
        ctx.blocks, ctx.kwargs, ctx.states = blocks, kwargs, states
        ctx.save_for_backward(x1, x2, *context)
        return torch.cat([x1, x2], dim=-1)

    @staticmethod
    def backward(ctx, grad_hidden):
        y1, y2, *context = ctx.saved_tensors
        dy1, dy2 = torch.chunk(grad_hidden, 2, dim=-1)
        # context tensors become leaves so that every block's f adds its share into their .grad
        context = [c.detach().requires_grad_(c.requires_grad) for c in context]
        for block, (f_state, g_state, cache) in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            # undo y2 = x2 + g(y1): recompute g(y1) with its dropout masks, push dy2 through it
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_(True)
                with g_state.replay():
                    gy1 = block.g(y1)
                torch.autograd.backward(gy1, dy2)
            with torch.no_grad():
                x2 = y2 - gy1
                dy1 = dy1 + y1.grad
            del gy1
            # undo y1 = x1 + f(x2): recompute f(x2) (same hashing and dropout), push dy1 through it
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_(True)
                with f_state.replay():
                    fx2 = block.f(x2, *context, cache=cache, **ctx.kwargs)
                torch.autograd.backward(fx2, dy1)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + x2.grad
            del fx2
            y1, y2, dy2 = x1.detach(), x2.detach(), dx2  # dx1 = dy1
        grads = [c.grad if c.requires_grad else None for c in context]
        return (torch.cat([dy1, dy2], dim=-1), None, None, *grads)


def reversible_stack(
    hidden: torch.Tensor,
    blocks: Sequence[ReversibleBlock],
    context: Sequence[torch.Tensor] = (),
    reversible: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """Apply the two-stream residual `blocks` to `hidden` (B, L, 2D); returns (B, L, 2D).

    With `reversible=True` and autograd recording, activations are recomputed in the backward pass instead of
    stored; otherwise (or without autograd, e.g. evaluation) the blocks run as an ordinary residual stack, which
    computes the same function.
    """
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad
        or any(c.requires_grad for c in context)
        or any(p.requires_grad for b in blocks for p in b.parameters())
    )
    if reversible and needs_grad:
        if not hidden.requires_grad:  # parameters get gradients only if the Function's output requires grad
            hidden = hidden.detach().requires_grad_(True)
        return ReversibleFunction.apply(hidden, list(blocks), kwargs, *context)
    x1, x2 = torch.chunk(hidden, 2, dim=-1)
    for block in blocks:
        x1 = x1 + block.f(x2, *context, **kwargs)
        x2 = x2 + block.g(x1)
    return torch.cat([x1, x2], dim=-1)
