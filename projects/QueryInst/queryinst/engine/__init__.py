"""Training: processes (CPU gloo or GPU NCCL), the optimiser and the trainer's hooks."""
from .launch import create_ddp_model, ddp_on_any_device, launch, threads_per_worker, worker_note
from .solver import build_optimizer, check_losses_finite, split_backbone_param_groups

__all__ = [
    "build_optimizer",
    "check_losses_finite",
    "create_ddp_model",
    "ddp_on_any_device",
    "launch",
    "split_backbone_param_groups",
    "threads_per_worker",
    "worker_note",
]
