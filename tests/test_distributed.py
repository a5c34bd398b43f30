"""Distributed training on the CPU: two gloo processes against one process (the truth).

The two processes are started three ways (fixture ``two_processes``): ``queryinst.engine.launch``
as ``train_net.py --num-gpus 2`` does without CUDA; as two machines of one process each
(``--num-machines 2 --machine-rank 0|1 --dist-url tcp://127.0.0.1:PORT``); and by torchrun
with two nodes (``--nnodes 2 --nproc-per-node 1``), the process joining with ``run_in_env``.
One run of two processes (module fixture ``two_processes``) gives each process one of two
images; the same model in this process gets both images. What must agree, and why:

- losses: every loss is a sum over the process's images divided by the matched-query count
  averaged over processes, m = (m_0 + m_1) / 2 (``num_matched_across_processes``). The one
  process divides the sum over both images by m_0 + m_1 = 2m. So the mean of the two
  processes' losses, (S_0 / m + S_1 / m) / 2 = (S_0 + S_1) / (m_0 + m_1), is the one-process
  loss (with each process normalising by its own count it would not be: the images have 3
  and 1 matches);
- gradients: DDP averages the two processes' gradients, i.e. the gradient of that mean;
  hence the same optimiser step (full-model clipping included) and the same parameters
  after it. The step is the project's SGD (``queryinst.engine.solver``), not AdamW: AdamW's first
  step is lr * g / (|g| + eps) per element, which turns gradients that are zero but for
  rounding (e.g. the attention's key bias, to which softmax is invariant: |g| ~ 1e-9) into
  steps of about +-lr whose sign is the rounding's; those elements differ between any two
  summation orders, one process or two;
- the mask heads' "SyncBN" normalises with the statistics of the RoIs of both processes (3
  and 1 RoIs per stage here), as nn.BatchNorm2d does over all of them in one process.

Precision: the runs are in float64, so that the comparisons test the arithmetic and not the
order of float32 sums. In float32 the same runs agree to 3e-6 in the losses and 3e-6 in
the whole-model gradient, but the gradients of some small tensors (the mask heads'
LayerNorm biases) and so their one-step change differ by up to ~2e-4: rounding that
``NaiveSyncBatchNorm``'s E[x^2] - E[x]^2 variance and the split sums amplify.

Sizes: a narrow ResNet-50-FPN (32 channels), 2 stages, 6 queries, 64 x 96 images; both
images have the same size so that one process pads them as each process pads its own.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils import comm

from queryinst import DynamicMaskHead
from queryinst.engine.launch import create_ddp_model, launch, threads_per_worker, worker_note
from queryinst.modeling.criterion import num_matched_across_processes
from queryinst.engine.solver import build_optimizer

import test_model  # its small_cfg (tests/ is on sys.path, as for conftest)
from conftest import run_together
from test_torchrun import TINY as TORCHRUN_TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 64, 96
# GT per image: boxes (x0, y0, x1, y1) in pixels and classes; 3 and 1 instances.
GT = [
    ([[4, 6, 40, 30], [50, 10, 90, 50], [20, 34, 60, 62]], [0, 2, 1]),
    ([[30, 8, 80, 56]], [1]),
]
# RoIs per process for the standalone SyncBN check: different counts on purpose.
ROIS = (3, 2)
DTYPE = torch.float64


def small_cfg():
    """test_model's narrow ResNet-50-FPN with small heads (3 classes, 6 queries, 2 stages),
    2 mask convs with mask norm "SyncBN", SGD lr 0.1."""
    cfg = test_model.small_cfg(num_classes=3, num_proposals=6, num_stages=2)
    cfg.merge_from_list([
        "MODEL.QUERYINST.NUM_MASK_CONVS", 2, "MODEL.QUERYINST.MASK_NORM", "SyncBN",
        # clipped to gradient norm 1: a step of norm 0.1
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 0.1,
    ])
    return cfg


def train_input(i: int) -> dict:
    """Image i (uint8 (3, H, W), seeded noise) with its GT; masks are the filled boxes."""
    gen = torch.Generator().manual_seed(100 + i)
    image = (torch.rand(3, H, W, generator=gen) * 255).to(torch.uint8)
    boxes, classes = GT[i]
    inst = Instances((H, W))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes)
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return {"image": image, "instances": inst}


def mask_head_and_input():
    """A "SyncBN" mask head (16 channels, 2 convs) and 5 RoIs: ((5, 32, 14, 14), (5, 32))."""
    torch.manual_seed(1)
    head = DynamicMaskHead(num_classes=3, hidden_dim=32, dynamic_dim=8, num_convs=2,
                           conv_dim=16, norm="SyncBN")
    gen = torch.Generator().manual_seed(2)
    rois = torch.randn(sum(ROIS), 32, 14, 14, generator=gen, dtype=DTYPE)
    queries = torch.randn(sum(ROIS), 32, generator=gen, dtype=DTYPE)
    return head.to(DTYPE), rois, queries


def train_step(model, inputs, optimizer):
    """One training step as Detectron2's SimpleTrainer does it.

    Returns:
        (dict[str, float], dict[str, Tensor]): the losses, and the gradients before the
        step by parameter name.
    """
    losses = model(inputs)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    grads = {n.removeprefix("module."): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}, grads


def _worker(out_dir):
    """One of the two processes: everything the tests compare, saved to rank{r}.pt."""
    rank = comm.get_rank()
    res = {"threads": torch.get_num_threads(), "local_rank": comm.get_local_rank(),
           "local_size": comm.get_local_size(), "note": worker_note()}

    # The matched count: 3 pairs here, 1 there.
    pairs = 3 if rank == 0 else 1
    indices = [(torch.arange(pairs), torch.arange(pairs))]
    res["num_matched"] = num_matched_across_processes(indices, "cpu")

    # A lone mask head: this process's share of the RoIs.
    head, rois, queries = mask_head_and_input()
    start = sum(ROIS[:rank])
    mine = slice(start, start + ROIS[rank])
    head.train()
    res["head_out"] = head(rois[mine], queries[mine]).detach()
    res["head_state"] = {k: v.clone() for k, v in head.state_dict().items()}

    # The model, as train_net's Trainer wraps it.
    model = build_model(small_cfg()).to(DTYPE)
    model.load_state_dict(torch.load(os.path.join(out_dir, "init.pt")))
    model.train()
    optimizer = build_optimizer(small_cfg(), model)
    ddp = create_ddp_model(model, broadcast_buffers=False)
    res["ddp"] = type(ddp).__name__
    res["losses"], res["grads"] = train_step(ddp, [train_input(rank)], optimizer)
    res["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def init_state(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    state = build_model(small_cfg()).to(DTYPE).state_dict()
    torch.save(state, out_dir / "init.pt")
    return out_dir, state


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Two "machines" on this host, one process each, each started by its own command: through
# queryinst.engine.launch (train_net.py --num-machines 2 --machine-rank R --dist-url ...), or by
# torchrun --nnodes 2 --nproc-per-node 1 (the process joins with run_in_env).
_MACHINE = """
import sys
sys.path.insert(0, {tests!r})
import test_distributed
from queryinst.engine.launch import launch
launch(test_distributed._worker, 1, num_machines=2, machine_rank=int(sys.argv[1]),
       dist_url=sys.argv[2], args=(sys.argv[3],), backend="gloo")
"""
_TORCHRUN_NODE = """
import sys
sys.path.insert(0, {tests!r})
import test_distributed
from queryinst.engine.launch import distributed_env, run_in_env
run_in_env(test_distributed._worker, distributed_env(), args=(sys.argv[1],), backend="gloo")
"""


def _run_two_machines(kind: str, out_dir) -> None:
    """Start both machines' commands at once and wait for both (each must exit 0)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    port = _free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("OMP_NUM_THREADS", None)
    if kind == "machines":
        cmds = [[sys.executable, "-c", _MACHINE.format(tests=tests), str(r),
                 f"tcp://127.0.0.1:{port}", str(out_dir)] for r in (0, 1)]
    else:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port}", "--no-python", sys.executable, "-c",
                 _TORCHRUN_NODE.format(tests=tests), str(out_dir)]] * 2
    run_together(cmds, env, timeout=300)


@pytest.fixture(scope="module", params=[
    "spawn", pytest.param("machines", marks=pytest.mark.slow), "torchrun_nodes"])
def two_processes(request, init_state):
    """Results of the two gloo processes, [rank 0's, rank 1's], started three ways: two
    processes of one machine (``launch``, as ``--num-gpus 2``), two machines of one process
    (``--num-machines 2``), and torchrun with two nodes of one process."""
    out_dir = init_state[0] / request.param
    out_dir.mkdir()
    torch.save(torch.load(init_state[0] / "init.pt"), out_dir / "init.pt")
    if request.param == "spawn":
        launch(_worker, 2, dist_url=f"file://{out_dir}/rendezvous", args=(str(out_dir),),
               backend="gloo")
    else:
        _run_two_machines(request.param, out_dir)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for res in results:
        res["kind"] = request.param
    return results


@pytest.fixture(scope="module")
def one_process(init_state):
    """The truth: the same model and step on both images in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers on this 2-CPU machine
    model = build_model(small_cfg()).to(DTYPE)
    model.load_state_dict(init_state[1])
    model.train()
    losses, grads = train_step(model, [train_input(0), train_input(1)],
                               build_optimizer(small_cfg(), model))
    torch.set_num_threads(threads)
    return losses, model.state_dict(), grads


def test_workers_are_gloo_processes_with_the_cpus_split(two_processes):
    per_machine = 2 if two_processes[0]["kind"] == "spawn" else 1
    for rank, res in enumerate(two_processes):
        local_rank = rank % per_machine  # machine 1's process is its machine's rank 0
        assert (res["local_rank"], res["local_size"]) == (local_rank, per_machine)
        if res["kind"] != "torchrun_nodes":  # torchrun: OMP_NUM_THREADS decides
            assert res["threads"] == threads_per_worker(per_machine)
        assert res["ddp"] == "DistributedDataParallel"
        assert res["note"] == (f"Process {rank} of 2 (gloo, local rank {local_rank} of "
                               f"{per_machine}), {res['threads']} intra-op CPU threads")
    assert threads_per_worker(2, num_cpus=16) == 8
    assert threads_per_worker(3, num_cpus=2) == 1


def test_matched_count_is_the_mean_over_processes(two_processes):
    # 3 and 1 matched pairs: both normalise by 2, i.e. (3 + 1) / 2 processes.
    assert [res["num_matched"] for res in two_processes] == [2.0, 2.0]


def test_two_processes_average_to_the_one_process_losses(two_processes, one_process):
    truth = one_process[0]
    assert set(two_processes[0]["losses"]) == set(truth)  # s{0,1}_loss_{cls,bbox,giou,mask}
    for name, value in truth.items():
        mean = (two_processes[0]["losses"][name] + two_processes[1]["losses"][name]) / 2
        assert mean == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # With per-process normalisers the average would differ: the images differ in loss.
    assert two_processes[0]["losses"] != two_processes[1]["losses"]


def _flat(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[n].flatten().double() for n in names])


def test_gradients_are_the_one_process_gradients(two_processes, one_process):
    truth = one_process[2]
    for res in two_processes:
        assert set(res["grads"]) == set(truth)
        err = (_flat(res["grads"], truth) - _flat(truth, truth)).norm() / _flat(truth, truth).norm()
        assert err <= 1e-5, err.item()


def synced_running_var(bn_running_var: torch.Tensor, n: int, momentum: float = 0.1):
    """The running variance NaiveSyncBatchNorm reaches from 1 in one step where
    nn.BatchNorm2d reached ``bn_running_var`` on the same n values per channel: it uses the
    biased variance, (n - 1) / n times the unbiased one."""
    return (1 - momentum) + (bn_running_var - (1 - momentum)) * (n - 1) / n


def test_one_step_gives_the_one_process_parameters(two_processes, one_process, init_state):
    init = init_state[1]
    truth = dict(one_process[1])
    n = (3 + 1) * 14 * 14  # matched RoIs of both images (per stage) x 14 x 14
    for name in truth:
        if "mask_heads" in name and name.endswith("running_var"):  # the "SyncBN" layers
            truth[name] = synced_running_var(truth[name], n)
    names = [name for name, t in truth.items() if t.is_floating_point()]
    for res in two_processes:
        for name in names:
            err = (res["params"][name] - truth[name]).norm() / truth[name].norm().clamp(1e-12)
            assert err <= 1e-5, (name, err.item())
        # The step itself, over all tensors (BN running statistics included).
        step = _flat(truth, names) - _flat(init, names)
        err = (_flat(res["params"], names) - _flat(init, names) - step).norm() / step.norm()
        assert err <= 1e-5, err.item()
    moved = [n for n in names if not torch.equal(truth[n], init[n])]
    assert len(moved) > 50  # the step changed the trainable tensors


def test_sync_bn_mask_head_normalises_over_all_processes(two_processes):
    """Truth: the same head with nn.BatchNorm2d ("BN") on all 5 RoIs in one process."""
    head, rois, queries = mask_head_and_input()
    truth = DynamicMaskHead(num_classes=3, hidden_dim=32, dynamic_dim=8, num_convs=2,
                            conv_dim=16, norm="BN").to(DTYPE)
    truth.load_state_dict(head.state_dict())  # same names: "SyncBN" and "BN" interchange
    truth.train()
    out = truth(rois, queries).detach()
    torch.testing.assert_close(torch.cat([r["head_out"] for r in two_processes]), out,
                               rtol=1e-7, atol=1e-9)
    n = sum(ROIS) * 14 * 14  # values per channel of the batch
    for name, expected in truth.state_dict().items():
        if name.endswith("running_var"):
            expected = synced_running_var(expected, n)
        for res in two_processes:
            got = res["head_state"][name]
            if name.endswith("num_batches_tracked"):
                # NaiveSyncBatchNorm does not count under several processes (used only
                # with momentum None, a cumulative average; the mask heads keep 0.1).
                assert got == 0 and expected == 1
                continue
            torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"{name}: {m}")


def test_train_net_runs_two_cpu_processes(tmp_path):
    """``train_net.py --num-gpus 2`` without CUDA: 2 iterations of a tiny R18 on the bundled
    nuclei tiles, one image per process; both processes log."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    opts = [*TORCHRUN_TINY, "OUTPUT_DIR", str(tmp_path)]  # 2 iterations, batch 2
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--num-gpus", "2",
           "--dist-url", "auto", "--config-file",
           os.path.join(REPO, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml"), *opts]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, log in enumerate(("log.txt", "log.txt.rank1")):
        with open(tmp_path / log) as f:
            text = f.read()
        assert f"Process {rank} of 2 (gloo, local rank {rank} of 2)" in text
    assert (tmp_path / "model_final.pth").exists()
