"""Strategy and precision from params: the DeepSpeed config, the Trainer arguments, impossible combinations."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, config_from_dict
from pipeline.training.strategy import (
    CPUDeepSpeedStrategy,
    StrategyError,
    consolidate_checkpoint,
    deepspeed_config,
    is_global_zero,
    trainer_kwargs,
)

MODELS = {"t5": {"preset": "tiny"}, "reformer": {"preset": "tiny"}}


def config(trainer=None, deepspeed=None, **sections):
    return config_from_dict({"models": MODELS, "trainer": trainer or {}, "deepspeed": deepspeed or {}, **sections})


def cpu_deepspeed(**ds):
    return config({"accelerator": "cpu", "strategy": "deepspeed"}, ds)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_buckets_and_overlap_come_from_params(stage):
    ds = deepspeed_config(
        cpu_deepspeed(stage=stage, allgather_bucket_size=123, reduce_bucket_size=456, overlap_comm=False)
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert (zero["allgather_bucket_size"], zero["reduce_bucket_size"], zero["overlap_comm"]) == (123, 456, False)
    assert ("stage3_param_persistence_threshold" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert "fp16" not in ds and "bf16" not in ds  # 32-true
    # Lightning sets accumulation from the Trainer and refuses a config that sets it
    assert "gradient_accumulation_steps" not in ds


def test_offload_sections_and_clipping():
    cfg = cpu_deepspeed(stage=3, offload_optimizer=True, offload_parameters=True, param_persistence_threshold=7)
    cfg.trainer.gradient_clip_val = 0.5
    ds = deepspeed_config(cfg, "cpu")
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_param"]["pin_memory"] is False  # pinned memory only helps GPU transfers
    assert deepspeed_config(cfg, "gpu")["zero_optimization"]["offload_param"]["pin_memory"] is True
    assert zero["stage3_param_persistence_threshold"] == 7
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch's optimizers work with offloaded states


@pytest.mark.parametrize(
    ("precision", "section"),
    [("bf16-mixed", {"bf16": {"enabled": True}}), ("16-mixed", {"fp16": {"enabled": True, "loss_scale": 0}})],
)
def test_precision_sections(precision, section):
    cfg = config({"accelerator": "auto", "strategy": "deepspeed", "precision": precision})
    ds = deepspeed_config(cfg, "gpu")
    (key,) = section
    assert {k: ds[key][k] for k in section[key]} == section[key]  # loss_scale 0 = dynamic loss scaling
    assert ({"bf16", "fp16"} - {key}).isdisjoint(ds)


def test_cpu_deepspeed_uses_the_subclass_with_gloo():
    kwargs = trainer_kwargs(config({"accelerator": "cpu", "strategy": "deepspeed", "devices": 2}, {"stage": 3}))
    assert (kwargs["accelerator"], kwargs["devices"], kwargs["num_nodes"], kwargs["precision"]) == (
        "cpu",
        2,
        1,
        "32-true",
    )
    strategy = kwargs["strategy"]
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    assert strategy._process_group_backend == "gloo"
    assert strategy.config["zero_optimization"]["stage"] == 3


def test_lightning_accepts_the_kwargs():
    import lightning

    trainer = lightning.Trainer(
        **trainer_kwargs(cpu_deepspeed(stage=2)), logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    assert isinstance(trainer.strategy, CPUDeepSpeedStrategy)
    assert type(trainer.strategy.precision_plugin).__name__ == "DeepSpeedPrecision"


def test_single_device_and_ddp():
    from lightning.pytorch.strategies import DDPStrategy

    assert trainer_kwargs(config({"accelerator": "cpu"}))["strategy"] == "auto"
    ddp = trainer_kwargs(config({"accelerator": "cpu", "strategy": "ddp", "devices": 2}))["strategy"]
    assert isinstance(ddp, DDPStrategy) and not isinstance(ddp, CPUDeepSpeedStrategy)
    assert ddp._process_group_backend == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a CPU-only machine")
def test_impossible_combinations_on_cpu():
    with pytest.raises(StrategyError, match="16-mixed"):
        trainer_kwargs(config({"accelerator": "auto", "precision": "16-mixed"}))
    with pytest.raises(StrategyError, match="no CUDA device"):
        trainer_kwargs(config({"accelerator": "gpu"}))


def test_impossible_combinations_in_params():
    with pytest.raises(ConfigError, match="'bf16-true' with DeepSpeed: use 'bf16-mixed'"):
        config({"strategy": "deepspeed", "precision": "bf16-true"})
    with pytest.raises(ConfigError, match="offload_parameters"):
        cpu_deepspeed(stage=2, offload_parameters=True)
    with pytest.raises(ConfigError, match="only used with trainer.strategy: deepspeed"):
        config({"strategy": "ddp"}, {"offload_optimizer": True})
    with pytest.raises(ConfigError, match="param_persistence_threshold"):
        cpu_deepspeed(param_persistence_threshold=-1)


@pytest.mark.gpu
def test_gpu_deepspeed_uses_the_stock_strategy():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from pipeline.training.strategy import LoopbackDeepSpeedStrategy

    strategy = trainer_kwargs(config({"accelerator": "gpu", "strategy": "deepspeed"}))["strategy"]
    assert type(strategy) is LoopbackDeepSpeedStrategy and isinstance(strategy, DeepSpeedStrategy)


def test_rank_zero_from_launcher_variables(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started
    assert not is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert not is_global_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank wins
    assert is_global_zero()


def test_consolidate_a_plain_lightning_checkpoint(tmp_path):
    import lightning

    class Tiny(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tiny()
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = consolidate_checkpoint(tmp_path / "last.ckpt")
    expected = module.state_dict()
    assert state.keys() == expected.keys() and all(k.startswith("model.") for k in state)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        consolidate_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed checkpoint"):
        consolidate_checkpoint(tmp_path)


def test_a_dead_builds_lock_is_removed_and_named_a_live_one_kept(tmp_path, monkeypatch, caplog):
    """A DeepSpeed op compile killed mid-way leaves torch's build `lock`; later starts would wait on it forever."""
    import logging
    import os
    import time

    from pipeline.training.strategy import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dead, live, other = (tmp_path / n / "lock" for n in ("deepspeed_shm_comm", "deepspeed_cpu_adam", "my_op"))
    for lock in (dead, live, other):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(dead, (old, old))
    os.utime(other, (old, old))  # not DeepSpeed's: left alone
    with caplog.at_level(logging.WARNING, logger="pipeline.training.strategy"):
        assert clear_stale_build_locks() == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    assert str(dead) in caplog.text and "killed" in caplog.text


def _listening(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress
    from pathlib import Path

    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.append(str(ipaddress.ip_address(raw)))
    return found


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_a_single_node_store_listens_on_loopback_only(monkeypatch):
    """A real process group (gloo, world size 1) set up by the DDP strategy: its rendezvous store's socket is bound
    to 127.0.0.1, not to every interface as torch's env:// rendezvous does."""
    import socket

    import lightning
    import torch.distributed as dist

    from pipeline.training.strategy import LoopbackDDPStrategy, LoopbackStoreMixin

    for name in ("TORCHELASTIC_RUN_ID", "PIPELINE_LAUNCHER", "SLURM_PROCID", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert not dist.is_initialized()
    strategy = LoopbackDDPStrategy(process_group_backend="gloo")
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
        enable_progress_bar=False,
    )  # fmt: skip
    assert trainer.strategy is strategy and strategy.cluster_environment.main_port == port
    try:
        strategy.setup_environment()  # -> setup_distributed: the store, then the process group
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert _listening(port) == ["127.0.0.1"], _listening(port)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if LoopbackStoreMixin._loopback_socket is not None:
            LoopbackStoreMixin._loopback_socket.close()
            LoopbackStoreMixin._loopback_socket = None
