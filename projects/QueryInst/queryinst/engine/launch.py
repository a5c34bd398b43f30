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
- :func:`distributed_env` / :func:`run_in_env`: processes started by another launcher
  (``torchrun``, ``srun``) join the job from their environment instead of spawning: the same
  process group, per-machine group and devices as :func:`launch`'s workers get.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as _d2_defaults
from detectron2.utils import comm
from torch import nn

# The module: ``detectron2.engine.launch`` the attribute is its function of that name.
_d2_launch = importlib.import_module("detectron2.engine.launch")

__all__ = ["launch", "threads_per_worker", "worker_note", "create_ddp_model",
           "ddp_on_any_device", "DistEnv", "LaunchEnvError", "distributed_env", "run_in_env",
           "elastic_restart_count"]

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
    _join("gloo", dist_url, world_size, machine_rank * num_workers_per_machine + local_rank,
          num_workers_per_machine, machine_rank, timeout)
    torch.set_num_threads(threads_per_worker(num_workers_per_machine))
    comm.synchronize()
    main_func(*args)


def _join(backend: str, init_method: Optional[str], world_size: int, rank: int,
          local_size: int, machine_rank: int, timeout: timedelta,
          store: Optional[dist.Store] = None) -> None:
    """``init_process_group`` (through ``store`` when given, else ``init_method``), then
    Detectron2's per-machine group ``comm._LOCAL_PROCESS_GROUP`` (ranks
    ``machine_rank * local_size`` .. ``+ local_size - 1``), which ``comm.get_local_rank()``
    / ``get_local_size()`` read."""
    if store is not None:
        init_method = None
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=timeout, store=store)
    # Every process creates every group (new_group is collective).
    for i in range(world_size // local_size):
        group = dist.new_group(list(range(i * local_size, (i + 1) * local_size)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


class LaunchEnvError(ValueError):
    """The launcher's environment (torchrun / srun variables, command-line flags) cannot
    describe a job: the message names the variable or flag and the fix."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a job started by an outside launcher.

    Attributes:
        launcher: "torchrun" (torch.distributed.elastic, or any launcher that sets
            ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) or "srun" (SLURM).
        rank, world_size: global rank and process count.
        local_rank, local_size: rank on this machine and processes per machine.
        machine_rank: this machine's rank (torchrun's ``GROUP_RANK``, SLURM's node id).
        restart_count: ``TORCHELASTIC_RESTART_COUNT``: how often torchrun has restarted
            the workers (0 for the first start and outside torchrun).
        init_method: torch.distributed init method ("env://": ``MASTER_ADDR`` /
            ``MASTER_PORT``).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    machine_rank: int
    restart_count: int = 0
    init_method: str = "env://"


def _int_var(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchEnvError(f"environment variable {name} is not set (the launcher sets it; "
                                 f"set it yourself when starting the processes by hand)")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_tasks_per_node(environ: Mapping[str, str], world_size: int) -> int:
    """Processes per node of an srun step; SLURM writes e.g. "4(x2)" or "4,4"."""
    counts = []
    for part in environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        if part:
            n, _, times = part.partition("(x")
            counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
    if not counts:
        return world_size // max(1, _int_var(environ, "SLURM_STEP_NUM_NODES", 1))
    if len(set(counts)) != 1:
        raise LaunchEnvError(
            f"srun started {environ['SLURM_STEP_TASKS_PER_NODE']} tasks per node: every node "
            f"needs the same number (srun --ntasks-per-node=G)")
    return counts[0]


def distributed_env(environ: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The job this process was started in by torchrun or srun, or None (a plain start).

    torchrun (also under ``srun torchrun``): ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` set, with ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (default 0 and 1),
    ``GROUP_RANK`` (default ``RANK // LOCAL_WORLD_SIZE``) and
    ``TORCHELASTIC_RESTART_COUNT``. srun alone (one task per GPU): an srun step
    (``SLURM_STEP_ID``) of more than one task, from ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
    ``SLURM_LOCALID``, ``SLURM_NODEID`` and ``SLURM_STEP_TASKS_PER_NODE``; the address of
    rank 0 comes from ``MASTER_ADDR`` / ``MASTER_PORT``, which the job script exports.

    Args:
        environ: the variables; default ``os.environ``.

    Returns:
        DistEnv or None: None outside both launchers and for an srun step of one task.

    Raises:
        LaunchEnvError: a variable that is missing or not an integer, ranks that do not fit
            the counts, or nodes with different task counts.
    """
    environ = os.environ if environ is None else environ
    if all(k in environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        rank, world_size = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        local_size = _int_var(environ, "LOCAL_WORLD_SIZE", 1)
        env = DistEnv("torchrun", rank, world_size, _int_var(environ, "LOCAL_RANK", 0),
                      local_size, _int_var(environ, "GROUP_RANK", rank // max(1, local_size)),
                      _int_var(environ, "TORCHELASTIC_RESTART_COUNT", 0))
    elif "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        world_size = _int_var(environ, "SLURM_STEP_NUM_TASKS",
                              _int_var(environ, "SLURM_NTASKS", 1))
        if world_size == 1:
            return None
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not environ.get(name):
                raise LaunchEnvError(
                    f"srun started {world_size} tasks but {name} is not set: export "
                    f"MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) "
                    f"and MASTER_PORT=<a free port> in the job script, or start the tasks "
                    f"with srun torchrun")
        env = DistEnv("srun", _int_var(environ, "SLURM_PROCID"), world_size,
                      _int_var(environ, "SLURM_LOCALID"),
                      _slurm_tasks_per_node(environ, world_size),
                      _int_var(environ, "SLURM_NODEID"))
    else:
        return None
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < env.local_size
            and env.world_size % env.local_size == 0
            and 0 <= env.machine_rank < env.world_size // env.local_size):
        raise LaunchEnvError(
            f"{env.launcher} environment does not describe a job: rank {env.rank} of "
            f"{env.world_size}, local rank {env.local_rank} of {env.local_size}, machine "
            f"{env.machine_rank}; every machine must run the same number of processes")
    return env


def elastic_restart_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """``TORCHELASTIC_RESTART_COUNT``: 0 on torchrun's first start of the workers (and
    outside torchrun), k after the k-th restart (``torchrun --max-restarts``)."""
    environ = os.environ if environ is None else environ
    return _int_var(environ, "TORCHELASTIC_RESTART_COUNT", 0)


def _attempt_store(env: DistEnv, timeout: timedelta) -> Optional[dist.Store]:
    """Under torchrun with its agent's store (``TORCHELASTIC_USE_AGENT_STORE``): that store,
    its keys prefixed with the restart count. The agent keeps one store over restarts, and
    torch's ``env://`` adds no prefix: the restarted workers read the dead workers' gloo
    addresses ("Gloo connectFullMesh failed ... Connection refused"). None otherwise (a new
    store per start: ``env://``)."""
    if env.launcher != "torchrun" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"queryinst/attempt_{env.restart_count}", store)


def run_in_env(main_func: Callable, env: DistEnv, args: tuple = (),
               timeout: timedelta = DEFAULT_TIMEOUT, backend: Optional[str] = None):
    """Run ``main_func(*args)`` as process ``env.rank`` of a job that torchrun or srun started.

    As :func:`launch`'s workers: ``init_process_group`` (``env.init_method``), Detectron2's
    per-machine group, on CUDA ``torch.cuda.set_device(env.local_rank)``, a barrier, then
    ``main_func``; the process group is destroyed when it returns or raises.

    Args:
        main_func: the work of this process.
        env: from :func:`distributed_env`.
        args: arguments of ``main_func``.
        timeout: timeout of the collective operations.
        backend: "nccl" or "gloo"; None: "nccl" where CUDA is available, else "gloo".

    Returns:
        what ``main_func`` returns.

    Raises:
        ValueError: an unknown ``backend``.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r}: expected 'nccl' or 'gloo'")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    _join(backend, env.init_method, env.world_size, env.rank, env.local_size,
          env.machine_rank, timeout, store=_attempt_store(env, timeout))
    try:
        comm.synchronize()
        return main_func(*args)
    finally:
        dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None


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

