"""Fault tolerance (docs/training.md, "Fault tolerance"): atomic checkpoints, a resume that ends with
the weights of an uninterrupted run, a NaN loss that stops training before the optimizer step,
and DataLoader workers (seeding, no duplicated augmentations, a corrupt image named).

The training tests use the reduced model of test_train_net.py on 128-pixel nuclei tiles (CPU).
The truth for a resumed run is the uninterrupted run with the same config.
"""
import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase, default_argument_parser
from PIL import Image
from torch import nn

from queryinst import QueryInstDatasetMapper
from queryinst.checkpoint import QueryInstCheckpointer
from queryinst.data.train_loader import ResumableTrainingSampler, SeededMapDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_net  # noqa: E402
from test_train_net import TINY as TRAIN_NET_TINY  # noqa: E402

# One intra-op thread for the tiny model (conftest's one_torch_thread).
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*"),
              pytest.mark.usefixtures("one_torch_thread")]

CONFIG = os.path.join(REPO, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
MAX_ITER = 6
# test_train_net.py's reduced QueryInst, here with batch 2 and multi-scale input (so that the
# augmentations vary), a fixed seed and no evaluation; later pairs override earlier ones.
TINY = [*TRAIN_NET_TINY, "INPUT.MIN_SIZE_TRAIN", "(96, 112, 128)", "SOLVER.IMS_PER_BATCH", "2",
        "DATASETS.TEST", "()", "SEED", "7",
        "MODEL.WEIGHTS", "",  # random init: no download
        ]


def _args(*flags, opts=()):
    return default_argument_parser().parse_args(["--config-file", CONFIG, *flags, *TINY, *opts])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(path):
    with open(path) as f:
        return f.read().strip()


# ------------------------------------------------------------------------ atomic checkpoints


class _HalfWriteThenFail(Exception):
    pass


def _half_then_raise(data, f):
    """torch.save that dies halfway through: half the bytes reach the file."""
    import io
    buf = io.BytesIO()
    _REAL_SAVE(data, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    raise _HalfWriteThenFail


_REAL_SAVE = torch.save


def test_failed_save_keeps_previous_checkpoint_and_last_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(4, 3)
    ckpt = QueryInstCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000002", iteration=2)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _half_then_raise)
    with pytest.raises(_HalfWriteThenFail):
        ckpt.save("model_0000005", iteration=5)
    monkeypatch.setattr(torch, "save", _REAL_SAVE)

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]
    assert _read(tmp_path / "last_checkpoint") == "model_0000002.pth"
    restored = nn.Linear(4, 3)
    QueryInstCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, good[k])


_KILLED_WRITER = """
import os, sys, torch
from torch import nn
from queryinst.checkpoint import QueryInstCheckpointer
ckpt = QueryInstCheckpointer(nn.Linear(4, 3), sys.argv[1])
ckpt.save("model_0000002", iteration=2)
real = torch.save
def dying_save(data, f):  # half the bytes on disk, then the process vanishes (no cleanup)
    import io
    buf = io.BytesIO(); real(data, buf); f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
    f.flush(); os.fsync(f.fileno()); os._exit(9)
torch.save = dying_save
ckpt.save("model_0000005", iteration=5)
"""


def test_process_killed_during_save_resumes_from_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects", "QueryInst"))
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    files = sorted(os.listdir(tmp_path))
    # the half-written temporary file is left behind, but it is neither *.pth nor named
    assert [f for f in files if f.endswith(".pth")] == ["model_0000002.pth"]
    assert any(f.startswith(".model_0000005.pth.") and f.endswith(".tmp") for f in files)
    assert _read(tmp_path / "last_checkpoint") == "model_0000002.pth"
    ckpt = QueryInstCheckpointer(nn.Linear(4, 3), str(tmp_path))
    assert ckpt.get_all_checkpoint_files() == [str(tmp_path / "model_0000002.pth")]
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 2


# ------------------------------------------------------------------- resume determinism


def test_sampler_is_detectron2s_stream_from_any_position():
    """Same indices as Detectron2's TrainingSampler with that seed (the truth), over several
    passes of a 5-image dataset; started at 7, the same stream from position 7."""
    from detectron2.data.samplers import TrainingSampler
    truth = list(itertools.islice(iter(TrainingSampler(5, shuffle=True, seed=3)), 23))
    ours = list(itertools.islice(iter(ResumableTrainingSampler(5, seed=3)), 23))
    assert [i for _, i in ours] == truth and [p for p, _ in ours] == list(range(23))
    later = list(itertools.islice(iter(ResumableTrainingSampler(5, seed=3, start=7)), 16))
    assert later == ours[7:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The truth: MAX_ITER iterations in one go (checkpoints at iterations 2 and 5)."""
    out_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    train_net.main(_args(opts=["OUTPUT_DIR", out_dir]))
    return out_dir


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(uninterrupted, tmp_path):
    out_dir = str(tmp_path)
    # Stopped after iteration 2's checkpoint: the files written by then, nothing later.
    stopped = _load(os.path.join(uninterrupted, "model_0000002.pth"))
    torch.save(stopped, os.path.join(out_dir, "model_0000002.pth"))
    with open(os.path.join(out_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    train_net.main(_args("--resume", opts=["OUTPUT_DIR", out_dir]))

    _assert_same_weights(_load(os.path.join(out_dir, "model_final.pth"))["model"],
                         _load(os.path.join(uninterrupted, "model_final.pth"))["model"])
    resumed = _load(os.path.join(out_dir, "model_final.pth"))["trainer"]["_trainer"]
    truth = _load(os.path.join(uninterrupted, "model_final.pth"))["trainer"]["_trainer"]
    for key, state in truth["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["exp_avg"], state["exp_avg"])


def test_training_loader_leaves_the_global_rng_to_the_model(tmp_path):
    """Iterating the training loader (the aspect-ratio-grouped one starts its DataLoader at the
    first batch) draws nothing from torch's global RNG, which dropout uses: a resumed run,
    whose first batch comes after the checkpoint's RNG states are restored, would otherwise
    draw one number more than the uninterrupted run."""
    cfg = train_net.setup(_args(opts=["OUTPUT_DIR", str(tmp_path)]))
    assert cfg.DATALOADER.ASPECT_RATIO_GROUPING
    loader = iter(train_net.Trainer.build_train_loader(cfg))
    torch.manual_seed(3)
    state = torch.get_rng_state()
    next(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_resumed_run_with_dropout_ends_with_the_uninterrupted_weights(tmp_path):
    """MODEL.QUERYINST.DROPOUT 0.1: stopped after iteration 2's checkpoint and resumed, the
    run ends bit for bit with the weights of the uninterrupted one."""
    dropout = ["MODEL.QUERYINST.DROPOUT", "0.1", "SOLVER.MAX_ITER", "4"]
    truth, out_dir = str(tmp_path / "truth"), str(tmp_path / "resumed")
    train_net.main(_args(opts=[*dropout, "OUTPUT_DIR", truth]))
    os.makedirs(out_dir)
    torch.save(_load(os.path.join(truth, "model_0000002.pth")),
               os.path.join(out_dir, "model_0000002.pth"))
    with open(os.path.join(out_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")
    train_net.main(_args("--resume", opts=[*dropout, "OUTPUT_DIR", out_dir]))
    _assert_same_weights(_load(os.path.join(out_dir, "model_final.pth"))["model"],
                         _load(os.path.join(truth, "model_final.pth"))["model"])


def test_sigkilled_training_resumes_to_the_uninterrupted_weights(uninterrupted, tmp_path):
    """A real SIGKILL of train_net.py once iteration 2's checkpoint exists, then --resume."""
    out_dir = str(tmp_path)
    script = [sys.executable, os.path.join(REPO, "train_net.py")]
    opts = ["--config-file", CONFIG, *TINY, "OUTPUT_DIR", out_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(script + opts, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out_dir, "model_0000002.pth")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out_dir, "model_final.pth"))
    subprocess.run(script + ["--resume"] + opts, env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _assert_same_weights(_load(os.path.join(out_dir, "model_final.pth"))["model"],
                         _load(os.path.join(uninterrupted, "model_final.pth"))["model"])


# ------------------------------------------------------------------------------- NaN loss


class _Snapshot(HookBase):
    """Keeps the parameters at the start of iteration ``at``."""

    def __init__(self, at):
        self.at, self.weights = at, None

    def before_step(self):
        if self.trainer.iter == self.at:
            self.weights = {k: v.detach().clone()
                            for k, v in self.trainer.model.named_parameters()}


def test_nan_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = train_net.setup(_args(opts=["OUTPUT_DIR", str(tmp_path)]))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    forward = trainer.model.forward

    def poisoned_forward(batched_inputs):  # iteration 4: one term NaN
        losses = forward(batched_inputs)
        if trainer.iter == 4:
            losses["s1_loss_mask"] = losses["s1_loss_mask"] * float("nan")
        return losses

    trainer.model.forward = poisoned_forward
    snapshot = _Snapshot(4)
    trainer.register_hooks([snapshot])
    with pytest.raises(FloatingPointError, match=r"iteration=4: s1_loss_mask=nan"):
        trainer.train()

    # No optimizer step (BatchNorm's running statistics did see the failed forward).
    _assert_same_weights(dict(trainer.model.named_parameters()), snapshot.weights)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000002.pth"]  # no model_final.pth of the failed run
    assert _read(tmp_path / "last_checkpoint") == "model_0000002.pth"
    saved = _load(tmp_path / "model_0000002.pth")
    assert saved["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


# -------------------------------------------------------------------------------- workers


def _batches(cfg_opts, n):
    cfg = train_net.setup(_args(opts=cfg_opts))
    loader = train_net.Trainer.build_train_loader(cfg)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_workers_give_the_samples_of_the_main_process_and_differ(tmp_path):
    opts = ["OUTPUT_DIR", str(tmp_path), "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96, 112, 128)"]
    main = _batches(opts + ["DATALOADER.NUM_WORKERS", "0"], 4)
    workers = _batches(opts + ["DATALOADER.NUM_WORKERS", "2"], 4)
    samples = [d for batch in main for d in batch]
    for a, b in zip(samples, [d for batch in workers for d in batch]):
        assert a["file_name"] == b["file_name"] and torch.equal(a["image"], b["image"])
    # Worker 0 maps stream positions 0, 2, 4, ..., worker 1 positions 1, 3, 5, ...: their
    # augmentations (output sizes) must not be copies of each other.
    sizes = [tuple(d["image"].shape) for d in samples]
    assert sizes[0::2] != sizes[1::2]
    assert len(set(sizes)) > 1


def test_corrupt_image_in_a_worker_raises_with_the_file_name(tmp_path):
    path = tmp_path / "tile_7.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated PNG
    cfg = train_net.setup(_args(opts=["OUTPUT_DIR", str(tmp_path)]))
    dicts = [{"file_name": str(path), "height": 64, "width": 64, "image_id": 0,
              "annotations": []}]
    from detectron2.data.build import build_batch_data_loader
    loader = build_batch_data_loader(
        SeededMapDataset(dicts, QueryInstDatasetMapper(cfg, True), seed=0),
        ResumableTrainingSampler(1, seed=0), 1, num_workers=2)
    with pytest.raises(Exception, match=r"cannot read image .*tile_7\.png"):
        next(iter(loader))
