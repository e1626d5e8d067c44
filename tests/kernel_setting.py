"""Test code under a given `models.set_cpu_kernels` setting, the process's own setting restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import models


@contextlib.contextmanager
def computing(paths: str = "reference", matmul: str = "blas", decoding: str = "plain") -> Iterator[models.CpuKernels]:
    """`with computing(paths="fast"):` runs its body on the speed paths (`reference`, the default, on the model files
    as written)."""
    before = models.cpu_kernels()
    try:
        yield models.set_cpu_kernels(matmul, decoding, paths)
    finally:
        models.set_cpu_kernels(before.matmul, before.decoding, before.paths)


class Spy:
    """Counts the calls of some functions of a module (replaced on it for the spy's lifetime, via monkeypatch)."""

    def __init__(self, monkeypatch, module, names: list[str]):
        self.calls = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(module, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)

    def reset(self) -> None:
        self.calls = dict.fromkeys(self.calls, 0)


def both(fn, seed: int = 5, **fast_setting):
    """fn() under the reference path and under the fast paths (with `fast_setting`'s kernels), from the same random
    state."""
    out = []
    for setting in ({"paths": "reference"}, {"paths": "fast", **fast_setting}):
        with computing(**setting):
            torch.manual_seed(seed)
            out.append(fn())
    return out
