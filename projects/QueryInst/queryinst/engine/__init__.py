"""Training: processes (CPU gloo or GPU NCCL), the optimiser and the trainer's hooks."""
from .defaults import default_setup, log_environment, setup_loggers
from .hooks import (
    FiniteLossAMPTrainer,
    FiniteLossTrainer,
    GatherRngStates,
    check_losses_finite,
    with_finite_loss_check,
)
from .launch import (
    DistEnv,
    LaunchEnvError,
    create_ddp_model,
    ddp_on_any_device,
    distributed_env,
    elastic_restart_count,
    launch,
    run_in_env,
    threads_per_worker,
    worker_note,
)
from .solver import build_optimizer, split_backbone_param_groups

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
