"""Training: what `pretrain`, `finetune` and `lengths` share. `train.py` runs a stage (model, data, Trainer,
checkpoints, MLflow, outputs); `module.py` is the one LightningModule (loss, optimizer, schedule, logging);
`callbacks.py` its Lightning pieces (step checkpoints, data module, logger); `strategy.py` builds DDP or DeepSpeed
from params; `launch.py` starts torchrun or SLURM jobs; `liveness.py` ends a multi-node job whose node died;
`budget.py` matches compute between variants (the `lengths` stage); `entry.py` is the stages' common entry point."""
