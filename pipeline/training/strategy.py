"""Distribution and precision from params: the `lightning.Trainer` arguments every training stage uses.

`trainer_kwargs(cfg)` turns the `trainer`, `deepspeed` and `launcher` sections into `accelerator`, `devices`,
`num_nodes`, `strategy` and `precision`:

- `trainer.strategy: auto` is a single device (or Lightning's own choice for several devices), `ddp` is
  distributed data parallel (NCCL on GPUs, gloo on CPUs);
- `trainer.strategy: deepspeed` is DeepSpeed ZeRO stage 1, 2 or 3 (Rajbhandari et al. 2020, "ZeRO: memory
  optimizations toward training trillion parameter models") with the DeepSpeed config built here from params:
  stage, optimizer/parameter offload to CPU memory, bucket sizes, overlap, gradient clipping, and the `bf16`/`fp16`
  section matching `trainer.precision` (`16-mixed` with dynamic loss scaling). On GPUs this is Lightning's stock
  `DeepSpeedStrategy`; on CPUs it is `CPUDeepSpeedStrategy`, a subclass that only lifts Lightning's CUDA check and
  uses the gloo backend (DeepSpeed's own CPU accelerator does the rest), so ZeRO can be tested without a GPU.

Processes are never started here: Lightning starts them for `trainer.devices` (launcher `local`), or torchrun or
SLURM's `srun` did (see `pipeline/training/launch.py`); then Lightning's cluster environment (torchelastic or
SLURM) is picked up and `devices`/`num_nodes` are taken from the launcher section, which `pipeline/config/`
checks agrees with the `trainer` section.

`consolidate_checkpoint(path)` reads a normal Lightning checkpoint file or a sharded DeepSpeed checkpoint
directory and returns the full fp32 state dict of the LightningModule (keys `model.<name>`), so a stage can write
one safetensors file. Neither is unpickled without restriction: files load with `weights_only=True`, DeepSpeed's
shards with the few DeepSpeed classes they hold allow-listed.

A single-node run's rendezvous store (the `TCPStore` every rank connects to) listens on 127.0.0.1 only, not on
every interface as torch's `env://` default does; multi-node runs and torchrun (whose agent owns the store) keep
the launcher's address.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from pipeline.common import is_deepspeed_checkpoint
from pipeline.config import Config

log = logging.getLogger(__name__)

# Dynamic loss scaling for `16-mixed` under DeepSpeed (`loss_scale: 0` means dynamic): start at 2**16, halve on
# overflow, double after this many overflow-free steps. Same defaults as torch's GradScaler uses for DDP.
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1


class StrategyError(ValueError):
    """A combination of params the chosen hardware or strategy cannot run (printed as a one-line error)."""


# ------------------------------------------------------------------------------------------- accelerator


def resolve_accelerator(cfg: Config) -> str:
    """`cpu` or `gpu`: `trainer.accelerator`, with `auto` meaning a GPU when torch sees one."""
    accelerator = cfg.trainer.accelerator
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise StrategyError("trainer.accelerator is 'gpu' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return accelerator


def launched_externally() -> str | None:
    """`torchrun` or `slurm` when this process was started by torchrun or by `srun` in our sbatch script, else None.

    torchrun sets `TORCHELASTIC_RUN_ID` in every worker; the generated sbatch script exports
    `PIPELINE_LAUNCHER=slurm` before `srun`, and `srun` sets `SLURM_PROCID` in every task.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if os.environ.get("PIPELINE_LAUNCHER") == "slurm" and "SLURM_PROCID" in os.environ:
        return "slurm"
    return None


def process_layout(cfg: Config) -> tuple[int | str, int]:
    """`(devices per node, num_nodes)` as Lightning must see them.

    Under torchrun or SLURM the processes exist already, one per device, so the counts come from the launcher
    section (and, inside a launched process, from the environment the launcher set, which is the truth Lightning's
    cluster environment validates against). Locally, Lightning starts `trainer.devices` processes itself.
    """
    t, la = cfg.trainer, cfg.launcher
    launched = launched_externally()
    if launched == "torchrun":
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        return local, int(os.environ["WORLD_SIZE"]) // local
    if launched == "slurm":
        return int(os.environ.get("SLURM_NTASKS_PER_NODE", la.slurm.gpus_per_node)), int(
            os.environ.get("SLURM_NNODES", la.nnodes)
        )
    if la.kind == "torchrun":
        return la.nproc_per_node, la.nnodes
    if la.kind == "slurm":
        return la.slurm.gpus_per_node or la.nproc_per_node, la.nnodes
    return t.devices, t.num_nodes


# ------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg: Config, accelerator: str | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config from params (https://www.deepspeed.ai/docs/config-json/).

    `gradient_accumulation_steps` and `train_micro_batch_size_per_gpu` are left out: Lightning fills them from the
    Trainer's `accumulate_grad_batches` and the dataloader's batch size (it refuses a config that sets the former),
    so the caller passes `cfg.trainer.accumulate_grad_batches` to the Trainer. Gradient clipping is set here from
    `trainer.gradient_clip_val`, the value the caller also passes to the Trainer.
    """
    accelerator = accelerator or resolve_accelerator(cfg)
    t, ds = cfg.trainer, cfg.deepspeed
    on_gpu = accelerator == "gpu"
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "allgather_bucket_size": ds.allgather_bucket_size,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage == 3:
        # Parameters with fewer elements than this stay whole on every rank (cheaper than gathering them).
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        zero["stage3_prefetch_bucket_size"] = ds.allgather_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        # Our optimizers are torch's AdamW and Adafactor from configure_optimizers; ZeRO partitions their states.
        "zero_allow_untested_optimizer": True,
        # With offload, DeepSpeed would insist on its compiled CPU Adam; torch's optimizers run on CPU tensors too.
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": t.gradient_clip_val,
        "steps_per_print": 10**9,  # Lightning and MLflow do the logging
        "wall_clock_breakdown": False,
    }
    if t.precision in ("bf16-mixed", "bf16-true"):
        config["bf16"] = {"enabled": True}
    elif t.precision == "16-mixed":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0: dynamic loss scaling
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": FP16_HYSTERESIS,
            "min_loss_scale": FP16_MIN_LOSS_SCALE,
        }
    return config


LOOPBACK = "127.0.0.1"


class LoopbackStoreMixin:
    """Initialise torch.distributed from a `TCPStore` bound to 127.0.0.1 when every rank is on this node.

    torch's `env://` rendezvous makes rank zero's store listen on all interfaces; on a single node nothing outside
    the machine needs to reach it. Rank zero binds the socket itself and hands it to the store (`master_listen_fd`).
    """

    _loopback_socket: socket.socket | None = None

    def _loopback_store(self) -> Any:
        if self.num_nodes != 1 or launched_externally() == "torchrun":
            return None
        port = self.cluster_environment.main_port
        timeout = getattr(self, "_timeout", None) or timedelta(minutes=30)
        if self.global_rank == 0:
            if type(self)._loopback_socket is not None:  # a previous, destroyed process group's store
                type(self)._loopback_socket.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, port))
            sock.listen(max(128, self.world_size))
            type(self)._loopback_socket = sock  # the store needs it for the life of the process group
            return torch.distributed.TCPStore(
                LOOPBACK, port, self.world_size, True, timeout, wait_for_workers=False, master_listen_fd=sock.fileno()
            )
        return torch.distributed.TCPStore(LOOPBACK, port, self.world_size, False, timeout)

    def _init_with_loopback_store(self) -> bool:
        """Initialise the default process group on the loopback store; False when the usual path applies."""
        if torch.distributed.is_initialized():
            return False
        store = self._loopback_store()
        if store is None:
            return False
        self._process_group_backend = self._get_process_group_backend()
        kwargs: dict[str, Any] = {"timeout": getattr(self, "_timeout", None) or timedelta(minutes=30), "store": store}
        if self.root_device.type != "cpu":
            kwargs["device_id"] = self.root_device
        _init_dist_connection(self.cluster_environment, self._process_group_backend, **kwargs)
        return True


class LoopbackDDPStrategy(LoopbackStoreMixin, DDPStrategy):
    """DDP whose single-node rendezvous store listens on 127.0.0.1 only."""

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        if not self._init_with_loopback_store():
            super().setup_distributed()


class LoopbackDeepSpeedStrategy(LoopbackStoreMixin, DeepSpeedStrategy):
    """DeepSpeed (GPU) whose single-node rendezvous store listens on 127.0.0.1 only."""

    def _init_deepspeed_distributed(self) -> None:
        self._init_with_loopback_store()  # DeepSpeed then adopts the initialised process group
        super()._init_deepspeed_distributed()


class CPUDeepSpeedStrategy(LoopbackStoreMixin, DeepSpeedStrategy):
    """DeepSpeed on CPU processes with the gloo backend (for tests and CPU-only machines).

    Lightning's `DeepSpeedStrategy.setup_environment` refuses any accelerator but CUDA; everything else works with
    DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`). This subclass skips only that check.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(f"{type(self).__name__} is for the CPU accelerator, got {self.accelerator}")
        DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check, keep the rest

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy first checks that GPU indices match local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        self._init_with_loopback_store()  # DeepSpeed then adopts the initialised process group
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # The stock method passes the device index as DeepSpeed's `device_rank`; a CPU device has none (None),
        # which DeepSpeed cannot compare, so pass the local rank (DeepSpeed's CPU accelerator maps it to `cpu`).
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def _ensure_deepspeed_accelerator(accelerator: str) -> None:
    """Make DeepSpeed's accelerator match Lightning's: DeepSpeed picks it once, at import, from `DS_ACCELERATOR`."""
    wanted = "cpu" if accelerator == "cpu" else "cuda"
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the processes Lightning starts
    from deepspeed.accelerator import get_accelerator

    actual = get_accelerator().device_name()
    if actual != wanted:
        raise StrategyError(
            f"DeepSpeed already runs on its {actual!r} accelerator but trainer.accelerator resolves to "
            f"{accelerator!r}; set DS_ACCELERATOR={wanted} before starting"
        )


# A DeepSpeed op (on CPU: `deepspeed_shm_comm`) is compiled on first use under a `lock` file that torch's
# FileBaton creates and deletes; a process killed mid-compile leaves it, and every later start waits on it forever
# (no message). A compile takes about a minute: a lock older than this is a dead build's.
STALE_BUILD_LOCK_S = 600.0


def clear_stale_build_locks(now: float | None = None) -> list[Path]:
    """Remove DeepSpeed op build locks older than `STALE_BUILD_LOCK_S` (each named in a warning); returns them."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        locks = Path(root).glob("deepspeed_*/lock")
    else:
        from torch.utils.cpp_extension import get_default_build_root

        locks = Path(get_default_build_root()).glob("*/deepspeed_*/lock")
    now = time.time() if now is None else now
    removed = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_S:
                lock.unlink()
                removed.append(lock)
                log.warning(
                    "removed %s: left %.0f minutes ago by a DeepSpeed op build that was killed (it would make "
                    "this run wait forever)",
                    lock,
                    age / 60,
                )
        except FileNotFoundError:  # the build finished meanwhile
            continue
    return removed


def build_strategy(cfg: Config, accelerator: str | None = None) -> Any:
    """The `strategy` argument of `lightning.Trainer`: a name, or a configured DeepSpeed strategy object."""
    accelerator = accelerator or resolve_accelerator(cfg)
    kind = cfg.trainer.strategy
    if kind == "auto":
        return "auto"
    if kind == "ddp":
        return LoopbackDDPStrategy(process_group_backend="nccl" if accelerator == "gpu" else "gloo")
    _ensure_deepspeed_accelerator(accelerator)
    clear_stale_build_locks()
    cls = LoopbackDeepSpeedStrategy if accelerator == "gpu" else CPUDeepSpeedStrategy
    return cls(config=deepspeed_config(cfg, accelerator))


def check_combination(cfg: Config, accelerator: str) -> None:
    """Raise `StrategyError` for params that cannot run on the accelerator found (`auto` resolved): config.py
    checks every combination the params alone decide (offloading, bf16-true with DeepSpeed, '16-mixed' with
    `accelerator: cpu`)."""
    t = cfg.trainer
    if accelerator == "cpu" and t.precision == "16-mixed":
        raise StrategyError("trainer.precision '16-mixed' needs a GPU; use '32-true' or 'bf16-mixed' on CPU")


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """`accelerator`, `devices`, `num_nodes`, `strategy` and `precision` for `lightning.Trainer(**kwargs, ...)`.

    The caller adds the rest, in particular `accumulate_grad_batches=cfg.trainer.accumulate_grad_batches` and
    `gradient_clip_val=cfg.trainer.gradient_clip_val` (the DeepSpeed config is built consistent with those).
    """
    accelerator = resolve_accelerator(cfg)
    check_combination(cfg, accelerator)
    devices, num_nodes = process_layout(cfg)
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": build_strategy(cfg, accelerator),
        "precision": cfg.trainer.precision,
    }


# ------------------------------------------------------------------------------------------------ ranks


def global_rank() -> int | None:
    """This process's global rank when known: from torch.distributed once initialised, else from the variables
    torchrun (`RANK`) or srun (`SLURM_PROCID`) set. None before Lightning has started its processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return None


def is_global_zero() -> bool:
    """True in the one process that logs and writes shared outputs; usable before the Trainer exists.

    Processes that Lightning starts itself (launcher `local`) carry `LOCAL_RANK` and `NODE_RANK` only; global rank
    zero is local rank zero on node zero (the process the user started).
    """
    rank = global_rank()
    if rank is not None:
        return rank == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


# ------------------------------------------------------------------------------------------ checkpoints


def _deepspeed_tag(path: Path) -> str:
    if (path / "latest").is_file():
        return (path / "latest").read_text().strip()
    tags = sorted(p.parent.name for p in path.glob("*/*model_states.pt"))
    if len(set(tags)) != 1:
        raise FileNotFoundError(f"{path}: expected one DeepSpeed checkpoint tag, found {sorted(set(tags))}")
    return tags[0]


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoint shards besides tensors and builtins (allow-listed)."""
    allowed: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
    ):
        with contextlib.suppress(ImportError):
            imported = __import__(module, fromlist=list(names))
            allowed += [getattr(imported, n) for n in names if hasattr(imported, n)]
    import collections

    allowed += [argparse.Namespace, collections.OrderedDict, torch.Size]
    return allowed


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Within the block, every `torch.load` runs with `weights_only=True` (torch's restricted unpickler) and only
    DeepSpeed's own checkpoint classes allow-listed, whatever the caller asked for (DeepSpeed asks for the full,
    unrestricted unpickler, which can run arbitrary code from a crafted file)."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def consolidate_checkpoint(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The full, unsharded fp32 state dict (keys `model.<name>`) of a Lightning or DeepSpeed checkpoint.

    - a file: a normal Lightning checkpoint; its `state_dict` is returned as stored;
    - a directory: a DeepSpeed checkpoint (ZeRO 1/2/3, any number of ranks); DeepSpeed's own zero-to-fp32
      reconstruction merges the per-rank shards of the fp32 master weights.
    Runs in one process, without a process group; tensors are on the CPU. Tied parameters stay tied (the same
    tensor under each name), as DeepSpeed records them.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        if not is_deepspeed_checkpoint(path):
            raise FileNotFoundError(f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest', no shards)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with restricted_torch_load():
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_deepspeed_tag(path))
        # Lightning < 2.1 wrapped the module; strip that prefix so keys are always `model.<name>`.
        state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    elif path.is_file():
        # Our own checkpoint: loop, datamodule and RNG state are plain values, so the restricted unpickler reads it.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" not in checkpoint:
            raise FileNotFoundError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        state = checkpoint["state_dict"]
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in state.items()}
