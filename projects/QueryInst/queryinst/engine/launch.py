"""Multi-process training on Detectron2's ``launch``, also without CUDA (gloo).

Detectron2 0.6's ``detectron2.engine.launch`` starts one process per GPU and its worker
asserts CUDA, initialises NCCL and calls ``torch.cuda.set_device``; its ``DefaultTrainer``
wraps the model in ``DistributedDataParallel(device_ids=[local rank])``, which DDP refuses for
a CPU model. Everything else (``detectron2.utils.comm``, the samplers that split the batch,
evaluation's gather, the trainer) already works over any torch.distributed backend. This
module fills only those two gaps:

- :func:`launch`: with CUDA, Detectron2's ``launch`` unchanged (NCCL, one process per GPU);
  without CUDA, the same steps with the gloo backend: one process per requested worker
  (``torch.multiprocessing.spawn``), ``init_process_group``, Detectron2's per-machine
  process group, a barrier, then ``main_func``; each worker uses
  :func:`threads_per_worker` intra-op threads.
- :func:`create_ddp_model` / :func:`ddp_on_any_device`: Detectron2's ``create_ddp_model`` with
  ``device_ids=None`` for a CPU model.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as _d2_defaults
from detectron2.utils import comm
from torch import nn

# The module: ``detectron2.engine.launch`` the attribute is its function of that name.
_d2_launch = importlib.import_module("detectron2.engine.launch")

__all__ = ["launch", "threads_per_worker", "worker_note", "create_ddp_model",
           "ddp_on_any_device"]

DEFAULT_TIMEOUT = _d2_launch.DEFAULT_TIMEOUT  # 30 minutes, as Detectron2's

# Detectron2's own, kept before ddp_on_any_device swaps the module attribute.
_d2_create_ddp_model = _d2_defaults.create_ddp_model


def launch(
    main_func: Callable,
    num_workers_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: str | None = None,
) -> None:
    """Run ``main_func(*args)`` in ``num_workers_per_machine`` processes on each machine.

    Call it on every machine. With one process in all, ``main_func`` runs in this process;
    otherwise, by ``backend``: "nccl", Detectron2's ``launch`` (one process per GPU), or
    "gloo", processes on the CPU.

    Args:
        main_func: called as ``main_func(*args)`` in every worker (picklable: a module-level
            function).
        num_workers_per_machine: processes per machine (``--num-gpus``).
        num_machines: machines in the job (``--num-machines``).
        machine_rank: this machine's rank, 0 .. num_machines - 1 (``--machine-rank``).
        dist_url: torch.distributed init method, e.g. "tcp://127.0.0.1:50152" or
            "file:///shared/path" (``--dist-url``); "auto": a free local TCP port (one
            machine only).
        args: arguments of ``main_func``.
        timeout: timeout of the collective operations.
        backend: "nccl" or "gloo"; None: "nccl" where CUDA is available, else "gloo".

    Raises:
        ValueError: an unknown ``backend``; ``dist_url`` "auto" or None with several machines, or a machine rank
            outside 0 .. num_machines - 1.
        torch.multiprocessing.ProcessRaisedException: a worker raised (its traceback is
            in the message).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: expected 'nccl' or 'gloo'")
    world_size = num_machines * num_workers_per_machine
    if backend == "nccl" or world_size == 1:
        _d2_launch.launch(main_func, num_workers_per_machine, num_machines=num_machines,
                          machine_rank=machine_rank, dist_url=dist_url, args=args,
                          timeout=timeout)
        return
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine rank {machine_rank} is not in 0 .. {num_machines - 1}")
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("several machines need an explicit --dist-url (tcp://HOST:PORT "
                             "of machine 0)")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_workers_per_machine,
        args=(main_func, world_size, num_workers_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
    )


def _free_port() -> int:
    """A TCP port free on this machine now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _gloo_worker(local_rank, main_func, world_size, num_workers_per_machine, machine_rank,
                 dist_url, args, timeout):
    """One spawned CPU process: the steps of Detectron2's ``_distributed_worker`` with gloo
    instead of NCCL and without ``torch.cuda.set_device``."""
    global_rank = machine_rank * num_workers_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=global_rank, timeout=timeout)
    # Detectron2's comm.get_local_rank() / get_local_size() read this group: the ranks of
    # this machine. Every process creates every group (new_group is collective).
    for i in range(world_size // num_workers_per_machine):
        ranks = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    torch.set_num_threads(threads_per_worker(num_workers_per_machine))
    comm.synchronize()
    main_func(*args)


def threads_per_worker(num_workers_per_machine: int, num_cpus: int | None = None) -> int:
    """Intra-op threads of each CPU worker: the machine's CPUs split evenly, at least 1.

    Args:
        num_workers_per_machine: processes on this machine.
        num_cpus: CPUs available; default: those this process may run on
            (``os.sched_getaffinity``, else ``os.cpu_count()``).

    Returns:
        int: ``max(1, num_cpus // num_workers_per_machine)``.
    """
    if num_cpus is None:
        try:
            num_cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            num_cpus = os.cpu_count() or 1
    return max(1, num_cpus // num_workers_per_machine)


def worker_note() -> str:
    """One log line on this process's place in the job, e.g. "Process 1 of 2 (gloo, local
    rank 1 of 2), 1 intra-op CPU threads"; "One process, ..." without a process group."""
    threads = torch.get_num_threads()
    if comm.get_world_size() == 1:
        return f"One process, {threads} intra-op CPU threads"
    return (f"Process {comm.get_rank()} of {comm.get_world_size()} ({dist.get_backend()}, "
            f"local rank {comm.get_local_rank()} of {comm.get_local_size()}), "
            f"{threads} intra-op CPU threads")


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Detectron2's ``create_ddp_model``, with ``device_ids=None`` for a model on the CPU.

    Args:
        model: the model, on its device.
        kwargs: Detectron2's (``fp16_compression``) and DistributedDataParallel's
            (``broadcast_buffers``, ...).

    Returns:
        nn.Module: ``model`` itself with one process, else a DistributedDataParallel of it
        (on CUDA with ``device_ids=[local rank]`` as Detectron2 does).
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and comm.get_world_size() > 1:
        kwargs.setdefault("device_ids", None)  # DDP refuses device_ids for CPU modules
    return _d2_create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def ddp_on_any_device() -> Iterator[None]:
    """Within the block, Detectron2's ``DefaultTrainer.__init__`` wraps its model with
    :func:`create_ddp_model` (it calls ``detectron2.engine.defaults.create_ddp_model`` by
    name, with no way to pass ``device_ids``). Restored on exit, also on an exception."""
    _d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        _d2_defaults.create_ddp_model = _d2_create_ddp_model

