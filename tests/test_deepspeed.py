"""Real 2-process DeepSpeed ZeRO training on CPU (gloo), for both model families.

The first test runs this file as a worker script (`python -m tests.test_deepspeed ...`) under torchrun
(Lightning's own launcher works too: `--launcher local`, `trainer.devices: 2`), the strategy comes from
`pipeline.strategy.trainer_kwargs`, and the model is the real family from `models.build_model` (tiny config, no
dropout, fixed LSH hash seed so runs are comparable). Every rank writes what it holds (per-parameter shard sizes,
its per-step losses) to files the test reads; rank zero also writes the trained model's logits on a fixed batch,
and the DeepSpeed checkpoint.

The test then checks:
- ZeRO-3: each rank holds only a shard of each large parameter (`ds_tensor.numel() < ds_numel`), and the shards
  cover it; ZeRO-2: each rank's fp32 master partition is about half of the parameters;
- the mean of the two ranks' losses matches a single-process run (plain Lightning, one device, same global batch,
  same init) step by step;
- `consolidate_checkpoint` merges the shards into one state dict that loads into a fresh model and reproduces the
  trained model's logits.

The real pretrain stage with two Lightning-started processes under ZeRO-3 (one MLflow run, `final/` equal to the
consolidated shards) is tests/test_train_stages.py::test_two_process_deepspeed_zero3_makes_one_mlflow_run_and_...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
GLOBAL_BATCH = 4  # two ranks x 2
SRC_LEN, TGT_LEN = 32, 16
VOCAB = 512
LR = 3e-3
PERSISTENCE_THRESHOLD = 1000  # parameters smaller than this stay whole under ZeRO-3

MODEL_OVERRIDES = {
    "t5": dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0),
    "reformer": dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        attn_layers=["local", "lsh"],
        axial_pos_shape=[8, 8],
        axial_pos_dims=[32, 32],
        lsh_chunk_length=8,
        local_chunk_length=8,
        hash_seed=7,
        dropout_rate=0.0,
    ),
}


# ------------------------------------------------------------------------------------ shared by both sides


def make_data() -> torch.utils.data.TensorDataset:
    """Fixed synthetic seq2seq batches: enough for STEPS global batches, no padding (equal tokens per rank)."""
    g = torch.Generator().manual_seed(0)
    n = STEPS * GLOBAL_BATCH
    inputs = torch.randint(3, VOCAB, (n, SRC_LEN), generator=g)
    labels = torch.randint(3, VOCAB, (n, TGT_LEN), generator=g)
    return torch.utils.data.TensorDataset(inputs, labels)


def eval_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(3, VOCAB, (2, SRC_LEN), generator=g)
    decoder_inputs = torch.randint(3, VOCAB, (2, TGT_LEN), generator=g)
    return inputs, decoder_inputs


def build(family: str) -> torch.nn.Module:
    from models import build_model, config_class

    torch.manual_seed(1234)
    return build_model(family, config_class(family).from_preset("tiny", **MODEL_OVERRIDES[family]))


def make_module(family: str):
    """A minimal LightningModule around the real model (cross-entropy, AdamW, no schedule)."""
    import lightning

    class Seq2Seq(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(family)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            decoder_inputs = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
            logits = self.model(inputs, decoder_input_ids=decoder_inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.0)

    return Seq2Seq()


class RankSlice(torch.utils.data.Sampler):
    """In order, every world_size-th example from this rank's offset (Lightning's own sampler always shuffles).

    Rank r's step-s batch plus the other ranks' is exactly the single process's step-s batch.
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._rank_world()
        return len(range(rank, self.n, world))


def fit(module, kwargs: dict, per_device_batch: int):
    import lightning

    data = make_data()
    loader = torch.utils.data.DataLoader(data, batch_size=per_device_batch, sampler=RankSlice(len(data)))
    trainer = lightning.Trainer(
        **kwargs,
        max_steps=STEPS,
        gradient_clip_val=1.0,
        accumulate_grad_batches=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return trainer


# ------------------------------------------------------------------------------------------------ worker


def worker(family: str, stage: int, out: Path, launcher: str) -> None:
    """One rank of one distributed run: `launcher` local (Lightning re-runs this command for rank 1) or torchrun."""
    from pipeline.config import config_from_dict
    from pipeline.training.strategy import trainer_kwargs

    params = {
        "models": {"t5": {"preset": "tiny"}, "reformer": {"preset": "tiny"}},
        "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "deepspeed", "gradient_clip_val": 1.0},
        "deepspeed": {"stage": stage, "param_persistence_threshold": PERSISTENCE_THRESHOLD},
        "launcher": {"kind": launcher, "nproc_per_node": 2},
    }
    cfg = config_from_dict(params)
    module = make_module(family)
    trainer = fit(module, trainer_kwargs(cfg), GLOBAL_BATCH // 2)
    rank = trainer.global_rank
    out.mkdir(parents=True, exist_ok=True)

    shards = {}
    for name, p in module.named_parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3 partitioned parameter
            shards[name] = {"full": p.ds_numel, "local": p.ds_tensor.numel()}
        else:
            shards[name] = {"full": p.numel(), "local": p.numel()}
    engine = trainer.strategy.deepspeed_engine
    master = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)  # ZeRO-1/2 fp32 partitions
    if master is None:
        master = getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3
    report = {
        "rank": rank,
        "world_size": trainer.world_size,
        "environment": type(trainer.strategy.cluster_environment).__name__,
        "losses": module.losses,
        "shards": shards,
        "master_numel": sum(t.numel() for t in master),
        "total_numel": sum(s["full"] for s in shards.values()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))

    trainer.save_checkpoint(out / "ckpt")
    inputs, decoder_inputs = eval_batch()
    module.eval()
    with torch.no_grad():  # every rank joins: ZeRO-3 gathers each layer's shards during the forward
        logits = module.model(inputs, decoder_input_ids=decoder_inputs)
    if rank == 0:
        torch.save(logits, out / "logits.pt")


# ------------------------------------------------------------------------------------------------- tests


def run_workers(runs: list[tuple[str, int]], out: Path, launcher: str) -> None:
    """Run `runs` (family, ZeRO stage) one after another in one pair of processes started by `launcher`."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = ["-m", "tests.test_deepspeed", "--out", str(out), "--launcher", launcher]
    args += ["--runs", *(f"{family}:{stage}" for family, stage in runs)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def reference_losses(family: str) -> list[float]:
    """The same training in one process without DeepSpeed: one device, the whole global batch."""
    module = make_module(family)
    fit(module, {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}, GLOBAL_BATCH)
    return module.losses


def check_run(out: Path, family: str, stage: int, environment: str) -> None:
    from pipeline.training.strategy import consolidate_checkpoint

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert {r["environment"] for r in reports} == {environment}

    # sharding
    if stage == 3:
        large = [n for n, s in reports[0]["shards"].items() if s["full"] >= PERSISTENCE_THRESHOLD]
        assert large, "the test model should have parameters above the persistence threshold"
        for name in large:
            full = reports[0]["shards"][name]["full"]
            local = [r["shards"][name]["local"] for r in reports]
            assert all(n < full for n in local), f"{name}: a rank holds the whole parameter ({local} of {full})"
            assert sum(local) >= full, f"{name}: shards {local} do not cover {full} elements"
    for r in reports:  # fp32 master weights (and optimizer states) are partitioned in every ZeRO stage
        assert 0 < r["master_numel"] <= r["total_numel"] // 2 + 1024, (r["master_numel"], r["total_numel"])

    # loss parity with a single process on the same global batches
    distributed = [(a + b) / 2 for a, b in zip(reports[0]["losses"], reports[1]["losses"], strict=True)]
    reference = reference_losses(family)
    assert len(distributed) == len(reference) == STEPS
    torch.testing.assert_close(torch.tensor(distributed), torch.tensor(reference), rtol=2e-3, atol=2e-3)

    # consolidation: one full state dict that reproduces the trained model
    state = consolidate_checkpoint(out / "ckpt")
    assert all(k.startswith("model.") for k in state)
    fresh = build(family)
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert not unexpected
    assert not [k for k in missing if k in dict(fresh.named_parameters())], missing
    fresh.eval()
    inputs, decoder_inputs = eval_batch()
    with torch.no_grad():
        logits = fresh(inputs, decoder_input_ids=decoder_inputs)
    torch.testing.assert_close(logits, torch.load(out / "logits.pt"), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_t5_and_reversible_reformer_under_zero3_and_zero2(tmp_path):
    """torchrun starts both processes (Lightning picks up its environment); three trainings in one process group."""
    runs = [("t5", 3), ("reformer", 3), ("reformer", 2)]
    run_workers(runs, tmp_path, "torchrun")
    for family, stage in runs:
        check_run(tmp_path / f"{family}-zero{stage}", family, stage, "TorchElasticEnvironment")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", required=True, help="family:stage ...")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launcher", choices=["local", "torchrun"], required=True)
    args = parser.parse_args()
    for run in args.runs:
        family, stage = run.split(":")
        worker(family, int(stage), args.out / f"{family}-zero{stage}", args.launcher)
