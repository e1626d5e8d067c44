"""Training-loop overhead: tokens/s of our Lightning module versus a bare PyTorch loop, same model and batches.

Both loops do the same work per step: forward, cross-entropy (padding ignored), backward, gradient clipping,
AdamW step, learning-rate schedule step. The Lightning side is `pipeline.module.Seq2SeqLM` under a
`lightning.Trainer` with the stage's logging (every `--log-every` steps) but no checkpointing, progress bar or
external logger, so the ratio measures the loop's own overhead. Runs alternate (bare, lightning, bare, ...;
`benchmarks/timing.py`) after a 2-step warm-up of each, so both see the same load; each side's median [min-max]
over `--rounds` and the per-round ratio lightning / bare (median [min-max]) are printed, for wall-clock and for
process CPU time (on a shared machine CPU seconds are the steadier measure of the work done), with the load average
at the start and the end.

    python benchmarks/bench_train_loop.py [--family t5|reformer|both] [--steps 10] [--rounds 3]   # under 5 min busy
    python benchmarks/bench_train_loop.py --steps 20       # the earlier default (6.5 minutes at load 4-6)
    python benchmarks/bench_train_loop.py --family t5 --steps 2 --rounds 1     # seconds: a smoke run

Prints one row per family and measure (wall, cpu): seconds of each loop, the time ratio lightning / bare (1.0 = no
overhead, above 1.0 = Lightning's overhead) and tokens per second of each loop at its median.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import (
    add_kernel_options,
    alternate_results,
    apply_kernel_options,
    load_average,
    median,
    ratio_spread,
    spread,
    table,
)  # noqa: E402

from models import build_model, config_class  # noqa: E402
from pipeline.data.datamodule import Collator, PretrainDataset, token_losses  # noqa: E402
from pipeline.training.module import OptimSettings, Seq2SeqLM, build_optimizer, lr_factor  # noqa: E402

VOCAB = 8192


def make_batches(family: str, n: int, batch_size: int, input_length: int) -> list[dict[str, torch.Tensor]]:
    """`n` span-corruption batches of random documents (the objective and collation of the pretrain stage)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, VOCAB - 100, size=int(rng.integers(50, 400))) for _ in range(n * batch_size)]
    ds = PretrainDataset(
        docs,
        "span_corruption",
        input_length,
        seed=0,
        noise_density=0.15,
        mean_noise_span_length=3.0,
        eos_id=1,
        sentinel_ids=[VOCAB - 1 - i for i in range(100)],
    )
    collate = Collator("encoder_decoder")
    return [collate([ds[(0, i * batch_size + j)] for j in range(batch_size)]) for i in range(n)]


def fresh_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(family, config_class(family).from_preset("tiny", vocab_size=VOCAB))


def tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int(b["attention_mask"].sum()) + int((b["labels"] >= 0).sum()) for b in batches)


def bare_loop(family: str, batches: list[dict[str, torch.Tensor]], s: OptimSettings) -> tuple[float, float]:
    model = fresh_model(family).train()
    optimizer = build_optimizer(model, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, s.schedule, s.warmup_steps, s.max_steps, s.min_lr_ratio)
    )
    start = _now()
    for b in batches:
        logits = model(b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["decoder_attention_mask"])
        ce_sum, _, count = token_losses(logits, b["labels"])
        loss = ce_sum / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        float(loss.detach())  # the stage reads the loss every step (NaN guard)
    return _elapsed(start)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elapsed(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


class _Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start = _now()

    def on_train_end(self, trainer, pl_module):
        self.elapsed = _elapsed(self.start)


def lightning_loop(family: str, batches: list[dict[str, torch.Tensor]], s: OptimSettings) -> tuple[float, float]:
    module = Seq2SeqLM(fresh_model(family), s)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="both", choices=["t5", "reformer", "both"])
    parser.add_argument("--steps", type=int, default=10, help="steps per round (20 ran 6.5 minutes at load 4-6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated timed rounds of each loop")
    parser.add_argument("--warmup", type=int, default=0, help="full alternated rounds before the timed ones")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-length", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    add_kernel_options(parser)
    args = parser.parse_args()
    kernels = apply_kernel_options(args)
    families = ["t5", "reformer"] if args.family == "both" else [args.family]
    settings = OptimSettings(lr=1e-3, warmup_steps=2, max_steps=args.steps, log_every_n_steps=args.log_every)
    print(f"start: {load_average()}")
    print(kernels)
    print(f"threads {torch.get_num_threads()}, {args.steps} steps x batch {args.batch_size} x {args.input_length}")
    rows = []
    for family in families:
        batches = make_batches(family, args.steps, args.batch_size, args.input_length)
        n_tokens = tokens(batches)
        bare_loop(family, batches[:2], settings)  # warm up allocator and kernels, and Lightning's first-run costs
        lightning_loop(family, batches[:2], settings)
        runs = alternate_results(
            {
                "bare": lambda family=family, batches=batches: bare_loop(family, batches, settings),
                "lightning": lambda family=family, batches=batches: lightning_loop(family, batches, settings),
            },
            args.rounds,
            warmup=args.warmup,
        )
        for k, measure in enumerate(("wall", "cpu")):
            bare, light = [r[k] for r in runs["bare"]], [r[k] for r in runs["lightning"]]
            rate = f"{n_tokens / median(bare):,.0f} / {n_tokens / median(light):,.0f}"
            rows.append((f"{family} {measure} s", spread(bare), spread(light), ratio_spread(light, bare), rate))
    header = ("family, measure", "bare median [min-max]", "lightning", "lightning/bare per round", "tok/s bare / light")
    print(table(header, rows))
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
