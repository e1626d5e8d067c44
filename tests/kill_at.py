"""Run a stage and SIGKILL it at an exact point of its work, for the exact-resume tests.

    python -m tests.kill_at <point> -m pipeline.pretrain --model t5 --seed 0

A kill -9 from outside lands wherever the process happens to be; these points are the ones where a resume has
something to get right, reached exactly (the process kills itself with SIGKILL: no handler, no cleanup runs):

- `step:N`        right after optimizer step N and its logging, before any checkpoint of that step;
- `checkpoint:N`  right after the checkpoint of step N is saved (at a step that also validates, after that
                  validation: the stage saves such checkpoints after it);
- `validation:N`  in the middle of the validation at step N (after its first batch);
- `publish:K`     while the trained outputs are being published, after K of them were swapped into place.

The wrapper only adds the kill; the stage's code runs unchanged.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, number = point.partition(":")
    n = int(number)
    if kind == "step":
        from pipeline.training.module import Seq2SeqLM

        original = Seq2SeqLM.optimizer_step

        def optimizer_step(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if self.global_step + 1 == n:  # Lightning advances global_step after this hook
                _die()

        Seq2SeqLM.optimizer_step = optimizer_step
    elif kind == "checkpoint":
        from pipeline.training.callbacks import StepCheckpoint

        original_save = StepCheckpoint._save_checkpoint

        def save(self, trainer, filepath):
            original_save(self, trainer, filepath)
            if trainer.global_step == n and trainer.state.fn == "fit":
                _die()

        StepCheckpoint._save_checkpoint = save
    elif kind == "validation":
        from pipeline.training.module import Seq2SeqLM

        original_val = Seq2SeqLM.validation_step

        def validation_step(self, batch, batch_idx):
            original_val(self, batch, batch_idx)
            if self.global_step == n and batch_idx == 0 and self.trainer.state.fn == "fit":
                _die()

        Seq2SeqLM.validation_step = validation_step
    elif kind == "publish":
        from pipeline import common

        original_commit = common.Publication.commit
        replace = os.replace

        def commit(self):
            if not any(target.name == "final" for target, _ in self._staged):
                return original_commit(self)
            swaps = [0]

            def counted(src, dst):
                replace(src, dst)
                swaps[0] += 1
                if swaps[0] == n:
                    _die()

            os.replace = counted
            try:
                return original_commit(self)
            finally:
                os.replace = replace

        common.Publication.commit = commit
    else:
        raise SystemExit(f"unknown kill point {point!r}: step:N, checkpoint:N, validation:N or publish:K")


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    point, module, args = sys.argv[1], sys.argv[3], sys.argv[4:]
    install(point)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
