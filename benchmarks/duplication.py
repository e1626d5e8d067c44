"""The Reformer paper's duplication experiment (Kitaev et al. 2020, section 2.1 and Table 2), as a standalone run.

Task: sequences `0 w 0 w` where `w` is a random string of symbols `1..vocab_size-1`; a 1-layer decoder-only
Reformer (causal LSH attention, shared query/key) is trained as a language model and scored only on the second
half, which can be predicted exactly by attending `len(w) + 1` positions back. A model trained with full
attention, or with LSH attention and 1, 2 or 4 hash rounds, is then evaluated with full attention and with 1, 2,
4 and 8 hash rounds (rounds are not parameters: the same weights run with any number of them), giving the
paper's Table 2: training attention in rows, evaluation attention in columns, accuracy on the second half.

    python benchmarks/duplication.py --preset cpu      # scaled down: length 128, a few minutes on 2 CPU cores
    python benchmarks/duplication.py --preset paper    # the paper's setting (length 1024, 150k steps): a GPU job

Presets are the dicts in `PRESETS` below (not a `params.yaml` section: this experiment is not part of the
default `dvc repro`); `--steps`, `--rows` and `--out` override them. Outputs: `<out>/duplication.md` (the table)
and `<out>/duplication.json` (the table plus the preset and the per-row training losses). The training loop is
a plain loop rather than the shared LightningModule: the loss is masked to the second half of each sequence and
the data are generated on the fly, neither of which the pretraining/finetuning module serves.

It lives in `benchmarks/`, not `pipeline/`: it is an experiment on one family (the Reformer's hash rounds), while
nothing in `pipeline/` names a family.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's packages

from models import build_model, config_class  # noqa: E402
from pipeline.common import atomic_output, repo_root, run_stage, stage_parser, write_json  # noqa: E402

log = logging.getLogger("benchmarks.duplication")

# Rows (training attention) and columns (evaluation attention) of Table 2; 0 rounds means full attention.
PAPER_ROWS = [0, 1, 2, 4]
PAPER_COLUMNS = [0, 1, 2, 4, 8]
# The paper's Table 2 (accuracy %, rows: full, LSH-1, LSH-2, LSH-4; columns: full, LSH-8, LSH-4, LSH-2, LSH-1),
# kept here so the report can show our numbers next to the published ones.
PAPER_TABLE = {
    0: {0: 100.0, 8: 94.8, 4: 92.5, 2: 76.9, 1: 52.5},
    1: {0: 0.8, 8: 99.9, 4: 99.6, 2: 94.8, 1: 77.9},
    2: {0: 0.8, 8: 100.0, 4: 99.9, 2: 98.1, 1: 86.8},
    4: {0: 0.8, 8: 100.0, 4: 99.9, 2: 99.4, 1: 91.9},
}


@dataclass
class DuplicationPreset:
    """One scale of the experiment."""

    seq_length: int
    """Tokens per sequence `0 w 0 w` (even); `len(w) = seq_length / 2 - 1`."""
    vocab_size: int
    """Symbols, 0 included (the separator); `w` draws from 1..vocab_size-1."""
    d_model: int
    """Width of each reversible stream."""
    num_heads: int
    """Attention heads."""
    d_kv: int
    """Per-head width."""
    d_ff: int
    """Feed-forward width."""
    chunk_length: int
    """LSH chunk length (buckets are derived from it: about 2 * seq_length / chunk_length)."""
    steps: int
    """Optimizer steps per trained model."""
    batch_size: int
    """Sequences per step."""
    lr: float
    """Adam peak learning rate (linear warmup, then constant)."""
    warmup_steps: int
    """Linear warmup steps."""
    eval_sequences: int
    """Held-out sequences scored per table cell."""
    rows: list[int] = field(default_factory=lambda: list(PAPER_ROWS))
    """Training attention of each row: 0 = full attention, k = LSH with k hash rounds."""
    columns: list[int] = field(default_factory=lambda: list(PAPER_COLUMNS))
    """Evaluation attention of each column, same coding."""
    reversible: bool = True
    """Reversible residual layer (the Reformer's); False trains the same function faster with more memory."""


PRESETS: dict[str, DuplicationPreset] = {
    # Section 2.1: length 1024, 1 layer, d_model 256, 4 heads, 150k steps at batch 64 (the paper trains longer
    # than most GPU sessions; lower --steps for a quicker look).
    "paper": DuplicationPreset(
        seq_length=1024, vocab_size=128, d_model=256, num_heads=4, d_kv=64, d_ff=512, chunk_length=64,
        steps=150_000, batch_size=64, lr=1e-3, warmup_steps=1000, eval_sequences=512,
    ),
    # Scaled for 2 CPU cores: length 128 (8 chunks of 16, 16 buckets), two LSH rows next to full attention.
    "cpu": DuplicationPreset(
        seq_length=128, vocab_size=64, d_model=128, num_heads=4, d_kv=32, d_ff=256, chunk_length=16,
        steps=250, batch_size=32, lr=2e-3, warmup_steps=50, eval_sequences=256, rows=[0, 2, 4], reversible=False,
    ),
    # Mechanics only (tests): a handful of steps.
    "micro": DuplicationPreset(
        seq_length=32, vocab_size=16, d_model=32, num_heads=2, d_kv=16, d_ff=64, chunk_length=4,
        steps=3, batch_size=4, lr=1e-3, warmup_steps=1, eval_sequences=8, rows=[0, 2], columns=[0, 1, 2],
    ),
}  # fmt: skip


def label(rounds: int) -> str:
    """Column/row label of an attention setting: `full` or `LSH-k`."""
    return "full" if rounds == 0 else f"LSH-{rounds}"


def duplication_batch(batch_size: int, seq_length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random `0 w 0 w` sequences, (B, seq_length) int64."""
    if seq_length % 2 or seq_length < 4:
        raise ValueError(f"seq_length must be even and >= 4, got {seq_length}")
    half = seq_length // 2
    w = torch.randint(1, vocab_size, (batch_size, half - 1), generator=generator)
    zero = torch.zeros(batch_size, 1, dtype=torch.long)
    return torch.cat([zero, w, zero, w], dim=1)


def second_half_mask(seq_length: int) -> torch.Tensor:
    """(seq_length - 1,) bool over next-token targets: True where the target is a copy (the second `w`)."""
    targets = torch.arange(1, seq_length)
    return targets > seq_length // 2


def model_config(preset: DuplicationPreset, rounds: int, seed: int) -> Any:
    """1-layer causal LSH Reformer for `rounds` hash rounds (0: the same layer with full attention)."""
    return config_class("reformer")(
        vocab_size=preset.vocab_size,
        d_model=preset.d_model,
        d_kv=preset.d_kv,
        num_heads=preset.num_heads,
        d_ff=preset.d_ff,
        layout="causal_lm",
        attn_layers=["lsh"],
        n_hashes=max(rounds, 1),
        use_full_attention=rounds == 0,
        lsh_chunk_length=preset.chunk_length,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        axial_pos_shape=None,
        axial_pos_dims=None,
        max_position_embeddings=preset.seq_length,
        dropout_rate=0.0,
        reversible=preset.reversible,
        hash_seed=None,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )


def copy_loss_and_accuracy(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy of next-token prediction on the second half; logits (B, L, V), batch (B, L)."""
    mask = second_half_mask(batch.shape[1]).to(batch.device)
    pred = logits[:, :-1][:, mask]  # (B, T, V)
    target = batch[:, 1:][:, mask]  # (B, T)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
    accuracy = (pred.argmax(-1) == target).float().mean()
    return loss, accuracy


def train_one(preset: DuplicationPreset, rounds: int, seed: int, device: torch.device) -> tuple[torch.nn.Module, list]:
    """Train a model with `rounds` hash rounds (0: full attention); returns it and its (step, loss, acc) history."""
    torch.manual_seed(seed)
    model = build_model("reformer", model_config(preset, rounds, seed)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(preset.warmup_steps, 1)))
    data = torch.Generator().manual_seed(seed)
    history, every = [], max(1, preset.steps // 20)
    model.train()
    start = time.perf_counter()
    for step in range(1, preset.steps + 1):
        batch = duplication_batch(preset.batch_size, preset.seq_length, preset.vocab_size, data).to(device)
        loss, accuracy = copy_loss_and_accuracy(model(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == preset.steps:
            history.append({"step": step, "loss": loss.item(), "accuracy": accuracy.item()})
            log.info(
                "train %-6s step %5d/%d loss %.4f acc %.3f (%.0f s)",
                label(rounds), step, preset.steps, loss.item(), accuracy.item(), time.perf_counter() - start,
            )  # fmt: skip
    return model, history


@torch.no_grad()
def evaluate_one(model: torch.nn.Module, preset: DuplicationPreset, rounds: int, seed: int) -> float:
    """Second-half accuracy of `model`'s weights run with `rounds` hash rounds (0: full attention)."""
    device = next(model.parameters()).device
    evaluated = build_model("reformer", replace(model.config, n_hashes=max(rounds, 1), use_full_attention=rounds == 0))
    evaluated.load_state_dict(model.state_dict())
    evaluated.to(device).eval()
    data = torch.Generator().manual_seed(seed + 1_000_003)  # held-out sequences, the same for every cell
    torch.manual_seed(seed + 7)  # the random rotations of evaluation
    correct, total = 0.0, 0
    for start in range(0, preset.eval_sequences, preset.batch_size):
        n = min(preset.batch_size, preset.eval_sequences - start)
        batch = duplication_batch(n, preset.seq_length, preset.vocab_size, data).to(device)
        _, accuracy = copy_loss_and_accuracy(evaluated(batch), batch)
        correct, total = correct + float(accuracy) * n, total + n
    return correct / total


def run_experiment(preset: DuplicationPreset, seed: int, device: torch.device | None = None) -> dict[str, Any]:
    """Train every row, evaluate it under every column; returns the JSON-ready result."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table: dict[str, dict[str, float]] = {}
    histories: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for rounds in preset.rows:
        start = time.perf_counter()
        model, history = train_one(preset, rounds, seed, device)
        table[label(rounds)] = {label(c): evaluate_one(model, preset, c, seed) for c in preset.columns}
        histories[label(rounds)] = history
        seconds[label(rounds)] = round(time.perf_counter() - start, 1)
        log.info("%s: %s", label(rounds), {k: f"{v:.3f}" for k, v in table[label(rounds)].items()})
    return {
        "preset": preset.__dict__,
        "seed": seed,
        "device": str(device),
        "rows": [label(r) for r in preset.rows],
        "columns": [label(c) for c in preset.columns],
        "accuracy": table,
        "train_history": histories,
        "train_seconds": seconds,
        "chance_accuracy": 1.0 / (preset.vocab_size - 1),
    }


def render_markdown(result: dict[str, Any], preset_name: str) -> str:
    """The table as Markdown, with the paper's numbers for the same cells and the setting it was measured in."""
    p = result["preset"]
    columns = result["columns"]
    lines = [
        f"# Duplication task (Reformer paper, section 2.1, Table 2): preset `{preset_name}`",
        "",
        f"A 1-layer decoder-only Reformer (d_model {p['d_model']}, {p['num_heads']} heads, shared-QK causal "
        f"attention) trained for {p['steps']} steps (batch {p['batch_size']}) on sequences `0 w 0 w` of length "
        f"{p['seq_length']} over {p['vocab_size'] - 1} symbols; LSH chunks of {p['chunk_length']}. Accuracy of "
        f"next-token prediction on the second half, {p['eval_sequences']} held-out sequences per cell (chance: "
        f"{100 * result['chance_accuracy']:.1f}%). Rows: attention used in training; columns: attention used in "
        "evaluation (same weights).",
        "",
        "| trained with \\ evaluated with | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in result["rows"]:
        cells = [f"{100 * result['accuracy'][row][c]:.1f}%" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The paper's Table 2 (length 1024, 150k steps) for the same cells:",
        "",
        "| trained with \\ evaluated with | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for row in result["rows"]:
        r = 0 if row == "full" else int(row.split("-")[1])
        cells = []
        for c in columns:
            k = 0 if c == "full" else int(c.split("-")[1])
            value = PAPER_TABLE.get(r, {}).get(k)
            cells.append("—" if value is None else f"{value:.1f}%")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    times = ", ".join(f"{row} {result['train_seconds'][row]:.0f} s" for row in result["rows"])
    lines += ["", f"Training and evaluation time per row on `{result['device']}`: {times}.", ""]
    return "\n".join(lines)


def parse_rows(text: str) -> list[int]:
    """`full,1,2,4` -> [0, 1, 2, 4]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(0 if item in ("full", "0") else int(item.removeprefix("lsh-")))
    if any(r < 0 for r in out):
        raise argparse.ArgumentTypeError(f"hash rounds must be >= 0, got {text!r}")
    return out


def body(cfg, args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("steps", args.steps), ("rows", args.rows), ("columns", args.columns)) if v}
    preset = replace(preset, **overrides)
    if preset.seq_length % (2 * preset.chunk_length):
        log.warning("seq_length %d is not a multiple of 2 chunks; padding is added", preset.seq_length)
    out = Path(args.out) if args.out else repo_root() / "reports"
    seed = cfg.seed if args.seed is None else args.seed
    log.info("duplication preset %s: %s", args.preset, preset)
    result = run_experiment(preset, seed)
    result["preset_name"] = args.preset
    write_json(out / "duplication.json", result)
    with atomic_output(out / "duplication.md") as tmp:
        tmp.write_text(render_markdown(result, args.preset), encoding="utf-8")
    print(render_markdown(result, args.preset))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("Reproduce the Reformer paper's duplication table (not a DVC stage).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="scale (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    parser.add_argument("--rows", type=parse_rows, default=None, help="training attention, e.g. full,1,2,4")
    parser.add_argument("--columns", type=parse_rows, default=None, help="evaluation attention, e.g. full,1,2,4,8")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: params.yaml seed)")
    parser.add_argument("--out", default=None, help="output directory (default: <repo>/reports)")
    return run_stage(body, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
