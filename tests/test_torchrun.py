"""train_net.py under torchrun (torch.distributed.elastic) on the CPU: the processes join
torchrun's job (no spawning), and after a worker is killed, torchrun's restart resumes by
itself from the last complete checkpoint to the weights of an uninterrupted run.

torchrun is ``python -m torch.distributed.run`` of this interpreter; its rendezvous is a
c10d store on a free port of 127.0.0.1.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_together
from queryinst.engine.launch import DistEnv, LaunchEnvError, distributed_env, elastic_restart_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
# A tiny R18 QueryInst (as test_distributed.py's train_net run) on 96-pixel nuclei tiles,
# one image per process, random initialisation, fixed seed, no evaluation.
TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.QUERYINST.HIDDEN_DIM", "32",
    "MODEL.QUERYINST.DIM_FEEDFORWARD", "64", "MODEL.QUERYINST.MASK_CONV_DIM", "16",
    "MODEL.QUERYINST.NUM_MASK_CONVS", "1", "MODEL.QUERYINST.NUM_STAGES", "1",
    "MODEL.QUERYINST.NUM_PROPOSALS", "10", "MODEL.QUERYINST.MASK_NORM", "SyncBN",
    "INPUT.MIN_SIZE_TRAIN", "(80, 96)", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINTS_TO_KEEP", "0",
    "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SEED", "7",
]


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*flags) -> list:
    """The torchrun command line: ``python -m torch.distributed.run`` with a c10d rendezvous
    on a free local port, then ``flags``."""
    return [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *flags]


def train_net(*opts) -> list:
    return [os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *TINY, *opts]


def cpu_env() -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(path):
    with open(path) as f:
        return f.read()


def test_distributed_env_reads_torchrun_and_srun_variables():
    torchrun_vars = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                     "GROUP_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                     "TORCHELASTIC_RESTART_COUNT": "2"}
    assert distributed_env(torchrun_vars) == DistEnv("torchrun", 3, 4, 1, 2, 1, 2)
    assert elastic_restart_count(torchrun_vars) == 2 and elastic_restart_count({}) == 0
    # srun torchrun: torchrun's variables win over SLURM's (one agent task per node).
    both = dict(torchrun_vars, SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2")
    assert distributed_env(both).launcher == "torchrun"
    # srun alone, 2 nodes x 2 tasks; rank 2 is node 1's first task.
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}
    assert distributed_env(srun) == DistEnv("srun", 2, 4, 0, 2, 1, 0)
    assert distributed_env({}) is None
    # An srun step of one task, or the batch script itself (no step): a plain start.
    assert distributed_env(dict(srun, SLURM_STEP_NUM_TASKS="1")) is None
    assert distributed_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        distributed_env({k: v for k, v in srun.items() if k != "MASTER_ADDR"})
    with pytest.raises(LaunchEnvError, match="same number"):
        distributed_env(dict(srun, SLURM_STEP_TASKS_PER_NODE="3,1"))
    with pytest.raises(LaunchEnvError, match="rank 4 of 4"):
        distributed_env(dict(torchrun_vars, RANK="4"))
    with pytest.raises(LaunchEnvError, match="RANK='x'"):
        distributed_env(dict(torchrun_vars, RANK="x"))


def test_num_gpus_under_torchrun_is_a_usage_error(tmp_path):
    """The variables torchrun sets, and --num-gpus: one ERROR line, exit status 2, before
    any process group or config."""
    env = dict(cpu_env(), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
           "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --num-gpus given")
    assert "torchrun" in errors[0] and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_torchrun_two_processes_train_one_job(tmp_path):
    """torchrun --nproc-per-node 2: 2 iterations of one job, one image per process (the log
    of each process names its rank and the gloo group), one set of checkpoints."""
    proc = subprocess.run(
        torchrun("--nnodes", "1", "--nproc-per-node", "2", *train_net("OUTPUT_DIR", str(tmp_path))),
        env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, log in enumerate(("log.txt", "log.txt.rank1")):
        text = _read(tmp_path / log)
        assert f"Process {rank} of 2 (gloo, local rank {rank} of 2)" in text
    final = _load(tmp_path / "model_final.pth")
    assert final["iteration"] == 1  # the last of 2 iterations (0-based)
    assert _read(tmp_path / "last_checkpoint") == "model_final.pth"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["machines", "torchrun_nodes"])
def test_two_machines_on_this_host_train_one_job(kind, tmp_path):
    """Two "machines" of one process each, each started by its own command: train_net.py
    --num-machines 2 --machine-rank 0|1 --dist-url tcp://127.0.0.1:PORT, or torchrun
    --nnodes 2 --nproc-per-node 1 twice. (tests/test_distributed.py checks that such a pair
    computes what one process does with both images.)"""
    if kind == "machines":
        url = f"tcp://127.0.0.1:{free_port()}"
        cmds = [[sys.executable, train_net("OUTPUT_DIR", str(tmp_path))[0], "--num-machines",
                 "2", "--machine-rank", str(r), "--dist-url", url,
                 *train_net("OUTPUT_DIR", str(tmp_path))[1:]] for r in (0, 1)]
    else:
        cmds = [torchrun("--nnodes", "2", "--nproc-per-node", "1",
                         *train_net("OUTPUT_DIR", str(tmp_path)))] * 2
    run_together(cmds, cpu_env(), timeout=400)
    for rank, log in enumerate(("log.txt", "log.txt.rank1")):
        assert f"Process {rank} of 2 (gloo, local rank 0 of 1)" in _read(tmp_path / log)
    assert _load(tmp_path / "model_final.pth")["iteration"] == 1


# ------------------------------------------------------------------ automatic recovery

# 8 iterations, checkpoints after iterations 1, 3, 5 and 7 (model_final).
RECOVERY = ["SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2"]


def _workers(agent_pid: int) -> dict:
    """torchrun's worker processes by global rank: the agent's children, ranks read from
    their environment (/proc, Linux)."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    ranks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except FileNotFoundError:  # exited meanwhile
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


@pytest.fixture(scope="module")
def uninterrupted_torchrun(tmp_path_factory):
    """The truth: the same torchrun job of 2 processes, never interrupted."""
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(torchrun("--nnodes", "1", "--nproc-per-node", "2",
                            *train_net(*RECOVERY, "OUTPUT_DIR", str(out_dir))),
                   env=cpu_env(), check=True, capture_output=True, timeout=400)
    return out_dir


@pytest.mark.slow
def test_sigkilled_worker_is_restarted_and_resumes_to_the_uninterrupted_weights(
        uninterrupted_torchrun, tmp_path):
    """torchrun --max-restarts 1; rank 1 SIGKILLed once the second checkpoint exists. The
    restarted workers resume by themselves (no --resume) and end with the weights of the
    uninterrupted job, bit for bit."""
    agent = subprocess.Popen(
        torchrun("--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1",
                 "--monitor-interval", "0.1", *train_net(*RECOVERY, "OUTPUT_DIR", str(tmp_path))),
        env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        last = tmp_path / "last_checkpoint"  # written after the checkpoint is complete
        while not (last.exists() and _read(last) == "model_0000003.pth"):
            assert agent.poll() is None and time.time() < deadline
            time.sleep(0.02)
        os.kill(_workers(agent.pid)[1], signal.SIGKILL)
        _, stderr = agent.communicate(timeout=400)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in stderr  # torchrun saw the SIGKILL
    log = _read(tmp_path / "log.txt")
    assert "torchrun restart 1: resumed automatically from the last complete checkpoint" in log
    resumed_at = int(log.split("training continues at iteration ")[1].split(")")[0])
    assert resumed_at in (4, 6)  # from checkpoint 3 (or 5, had it been written meanwhile)
    # Each process's own RNG states are in the checkpoint (rank 0 writes it), for the resume.
    by_rank = _load(tmp_path / "model_0000005.pth")["trainer"]["rng_by_rank"]
    assert len(by_rank) == 2 and not torch.equal(by_rank[0]["torch"], by_rank[1]["torch"])
    truth = _load(uninterrupted_torchrun / "model_final.pth")["model"]
    got = _load(tmp_path / "model_final.pth")["model"]
    assert got.keys() == truth.keys()
    for k in truth:
        assert torch.equal(got[k], truth[k]), k
