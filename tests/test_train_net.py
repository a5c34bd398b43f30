"""train_net.py (training, --resume, --eval-only) and queryinst.engine.solver (docs/method.md §2).

The training tests use a reduced model on 128-pixel nuclei tiles (CPU, a few iterations);
they check the plumbing, not accuracy.
"""
import json
import os
import re
import shutil
import sys
import zipfile

import cv2
import pytest
import torch
from conftest import load_script
from PIL import Image
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from torch import nn

from queryinst import add_queryinst_config
from queryinst.engine.solver import build_optimizer, split_backbone_param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_net  # noqa: E402

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

CONFIG = os.path.join(REPO, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
MAX_ITER = 6
# A reduced QueryInst: R18 (basic blocks), 64 channels, 2 stages, 20 queries, 128-px input.
TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.QUERYINST.HIDDEN_DIM", "64",
    "MODEL.QUERYINST.DIM_FEEDFORWARD", "128", "MODEL.QUERYINST.MASK_CONV_DIM", "32",
    "MODEL.QUERYINST.NUM_MASK_CONVS", "1", "MODEL.QUERYINST.NUM_STAGES", "2",
    "MODEL.QUERYINST.NUM_PROPOSALS", "20", "MODEL.QUERYINST.TEST_TOPK", "20",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "1", "SOLVER.BASE_LR", "0.0001",
    # warmup longer than the run: the lr changes at every iteration (checked on resume)
    "SOLVER.WARMUP_ITERS", "10", "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "3",
    "SOLVER.CHECKPOINTS_TO_KEEP", "0",  # keep every checkpoint: the resume tests use them
    "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model gains little from two, and on a busy 2-core
    machine two OpenMP threads wait on each other (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(*flags, opts=()):
    return default_argument_parser().parse_args(["--config-file", CONFIG, *flags, *TINY, *opts])


def _metrics(out_dir):
    """The training lines of OUTPUT_DIR/metrics.json (evaluation lines left out)."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "total_loss" in r]


def _checkpoint(out_dir, name):
    return torch.load(os.path.join(out_dir, name), map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the tiny model for MAX_ITER iterations; return its OUTPUT_DIR."""
    out_dir = str(tmp_path_factory.mktemp("train"))
    results = train_net.main(_args(opts=["OUTPUT_DIR", out_dir]))
    assert set(results) == {"bbox", "segm"}  # Detectron2 always evaluates after the last step
    return out_dir


def test_training_writes_checkpoints(trained):
    files = set(os.listdir(trained))
    assert {"model_0000002.pth", "model_0000005.pth", "model_final.pth", "last_checkpoint",
            "metrics.json", "config.yaml"} <= files
    with open(os.path.join(trained, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    final = _checkpoint(trained, "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1
    assert any(k.startswith("roi_heads.mask_heads.1.") for k in final["model"])
    state = final["trainer"]
    assert "LRScheduler" in state["hooks"]
    assert state["_trainer"]["optimizer"]["state"]  # AdamW moments are checkpointed
    last = _metrics(trained)[-1]
    assert last["iteration"] == MAX_ITER - 1
    assert {"total_loss", "s0_loss_cls", "s1_loss_mask", "lr"} <= set(last)
    assert torch.isfinite(torch.tensor(last["total_loss"]))


def test_checkpoints_to_keep_deletes_older_periodic_checkpoints(tmp_path):
    """The bundled configs keep 1: the newest resume point and model_final.pth."""
    train_net.main(_args(opts=["OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "2",
                               "SOLVER.CHECKPOINTS_TO_KEEP", "1", "TEST.EVAL_PERIOD", "0"]))
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000005.pth", "model_final.pth"]  # model_0000001 and model_0000003 deleted
    assert _checkpoint(tmp_path, "model_0000005.pth")["iteration"] == MAX_ITER - 1


def _interrupted_copy(trained, out_dir):
    """A copy of the trained run as if it had stopped after its checkpoint at iteration 2."""
    shutil.copytree(trained, out_dir)
    for name in ("model_0000005.pth", "model_final.pth", "metrics.json", "log.txt"):
        os.remove(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000002.pth")


def test_resume_restores_iteration_lr_and_optimizer_state(trained, tmp_path):
    out_dir = str(tmp_path / "resumed")
    _interrupted_copy(trained, out_dir)
    cfg = train_net.setup(_args("--resume", opts=["OUTPUT_DIR", out_dir]))

    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    saved = _checkpoint(out_dir, "model_0000002.pth")["trainer"]["_trainer"]["optimizer"]
    resumed = trainer.optimizer.state_dict()
    assert len(resumed["state"]) == len(saved["state"]) > 0
    for key, value in saved["state"].items():
        torch.testing.assert_close(resumed["state"][key]["exp_avg"], value["exp_avg"])

    reference = train_net.Trainer(cfg)  # uninterrupted: the lr of iteration 3
    for _ in range(3):
        reference.scheduler.step()
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == pytest.approx([g["lr"] for g in reference.optimizer.param_groups], rel=1e-9)
    assert lrs[0] < cfg.SOLVER.BASE_LR  # still warming up, so this lr is specific to iter 3


def test_resume_flag_continues_training(trained, tmp_path):
    out_dir = str(tmp_path / "resumed")
    _interrupted_copy(trained, out_dir)
    train_net.main(_args("--resume", opts=["OUTPUT_DIR", out_dir]))

    with open(os.path.join(out_dir, "log.txt")) as f:
        log = f.read()
    assert "Starting training from iteration 3" in log
    assert "Starting training from iteration 0" not in log
    resumed, uninterrupted = _metrics(out_dir)[-1], _metrics(trained)[-1]
    assert resumed["iteration"] == uninterrupted["iteration"] == MAX_ITER - 1
    assert resumed["lr"] == pytest.approx(uninterrupted["lr"], rel=1e-9)
    final = _checkpoint(out_dir, "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER


def test_eval_only_gives_coco_box_and_mask_ap(trained, tmp_path):
    weights = os.path.join(trained, "model_final.pth")
    results = train_net.main(
        _args("--eval-only", opts=["MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path)])
    )
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert isinstance(results[task]["AP"], float)
        assert {"AP50", "AP75"} <= set(results[task])
    assert os.path.isfile(tmp_path / "inference" / "coco_instances_results.json")


# ---------------------------------------------------------------- optimiser (docs/method.md §2)


def nuclei_cfg(*opts):
    """The bundled nuclei config with ``opts`` merged (not frozen); also used by
    test_custom_dataset.py."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg


class _Toy(nn.Module):
    """A model with a detectron2-like ``backbone.bottom_up`` / FPN / head split."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.backbone.fpn = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
        self.backbone.bottom_up[0].weight.requires_grad_(False)  # frozen: left out


def test_adamw_with_backbone_multiplier_and_weight_decay():
    model = _Toy()
    cfg = nuclei_cfg("SOLVER.BASE_LR", "0.001", "SOLVER.BACKBONE_MULTIPLIER", "0.1",
                     "SOLVER.WEIGHT_DECAY", "0.0001", "SOLVER.WEIGHT_DECAY_NORM", "0.0")
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    bottom_up = {id(p) for p in model.backbone.bottom_up.parameters()}
    norms = {id(p) for m in (model.backbone.bottom_up[1], model.head[1]) for p in m.parameters()}
    seen = []
    for group in opt.param_groups:
        for p in group["params"]:
            seen.append(id(p))
            expected_lr = 1e-4 if id(p) in bottom_up else 1e-3  # the FPN keeps the base lr
            assert group["lr"] == pytest.approx(expected_lr)
            assert group["weight_decay"] == (0.0 if id(p) in norms else 1e-4)
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # each trainable parameter once, frozen left out


def test_backbone_multiplier_on_the_real_model():
    from detectron2.modeling import build_model

    cfg = nuclei_cfg(*TINY, "SOLVER.BACKBONE_MULTIPLIER", "0.1")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    bottom_up = {id(p) for p in model.backbone.bottom_up.parameters()}
    base = cfg.SOLVER.BASE_LR
    n_backbone = 0
    for group in opt.param_groups:
        ours = [id(p) in bottom_up for p in group["params"]]
        assert all(ours) or not any(ours)  # a group is wholly backbone or wholly not
        assert group["lr"] == pytest.approx(base * 0.1 if ours[0] else base)
        n_backbone += sum(ours)
    assert n_backbone == sum(p.requires_grad for p in model.backbone.bottom_up.parameters()) > 0


def test_sgd_and_errors():
    model = _Toy()
    opt = build_optimizer(nuclei_cfg("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.9"), model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="OPTIMIZER"):
        build_optimizer(nuclei_cfg("SOLVER.OPTIMIZER", "LAMB"), model)
    with pytest.raises(ValueError):
        build_optimizer(nuclei_cfg("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "per_layer"), model)
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}]
    assert split_backbone_param_groups(groups, nn.Linear(1, 1), 1.0) is groups


def _sgd_step_with_huge_grads(clip_type, max_norm=1.0):
    """One SGD step (lr 1, no momentum, no decay) from given grads; return the updates."""
    torch.manual_seed(0)
    model = _Toy()
    cfg = nuclei_cfg(
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0",
        "SOLVER.WEIGHT_DECAY", "0.0", "SOLVER.WEIGHT_DECAY_NORM", "0.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip_type,
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", str(max_norm),
    )
    opt = build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1000.0 for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    opt.step()
    return [b - p.detach() for b, p in zip(before, params)], grads


def test_full_model_clipping_limits_the_global_gradient_norm():
    updates, grads = _sgd_step_with_huge_grads("full_model", max_norm=1.0)
    total = torch.cat([u.flatten() for u in updates]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-4)  # clipped to max_norm exactly
    grad_norm = torch.cat([g.flatten() for g in grads]).norm()
    for u, g in zip(updates, grads):  # one common factor, directions kept
        torch.testing.assert_close(u, g / grad_norm, rtol=1e-4, atol=1e-7)

    per_param, _ = _sgd_step_with_huge_grads("norm", max_norm=1.0)  # Detectron2's per-parameter
    assert all(u.norm().item() == pytest.approx(1.0, rel=1e-4) for u in per_param)
    assert torch.cat([u.flatten() for u in per_param]).norm().item() > 2.0


def test_full_model_clipping_under_grad_scaler():
    """AMPTrainer's GradScaler unscales before ``step``: clipping sees the true gradients."""
    torch.manual_seed(0)
    model = nn.Module()
    model.backbone = nn.Linear(3, 3)
    model.head = nn.Linear(3, 1)
    cfg = nuclei_cfg(
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0",
        "SOLVER.WEIGHT_DECAY", "0.0", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5",
    )
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    loss = 1e4 * model.head(model.backbone(torch.ones(4, 3))).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(0.5, rel=1e-4)


def _adamw_run(*opts, steps=4):
    """``steps`` AdamW steps with full-model clipping from fixed large gradients; the
    parameters before and after them, and the optimiser."""
    torch.manual_seed(0)
    model = _Toy()
    opt = build_optimizer(nuclei_cfg("SOLVER.BASE_LR", "0.01", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
                                     "0.1", *opts), model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 100.0
        opt.step()
    return start, [p.detach().clone() for p in params], opt


def test_fused_adamw_equals_the_for_loop_update():
    _, fused, opt = _adamw_run()  # SOLVER.FUSED_ADAMW defaults to True
    assert opt.defaults["fused"] is True
    start, loop, opt_loop = _adamw_run("SOLVER.FUSED_ADAMW", "False")
    assert not opt_loop.defaults["fused"]
    moved = torch.cat([(a - b).flatten() for a, b in zip(loop, start)])
    assert moved.abs().max() > 1e-3  # the steps did move the parameters (clipped, decayed)
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Under AMP the GradScaler would pass a fused step scaled gradients: not fused then.
    *_, opt_amp = _adamw_run("SOLVER.AMP.ENABLED", "True", steps=0)
    assert not opt_amp.defaults["fused"]


# ---------------------------------------------------------------- tools/run_demo.py


def _load_run_demo():
    return load_script("tools/run_demo.py", "run_demo")


def test_run_demo_refuses_a_threshold_outside_0_1(capsys):
    with pytest.raises(SystemExit) as info:
        _load_run_demo().parse_args(["--score-threshold", "30"])
    assert info.value.code == 2
    assert "--score-threshold 30 is outside [0, 1]" in capsys.readouterr().err


def test_run_demo_writes_figures_and_resumes(tmp_path, capsys):
    run_demo = _load_run_demo()
    out_dir = str(tmp_path / "demo")
    # the nuclei image job (one --config-file away from make demo's real-video job)
    argv = ["--config-file", CONFIG, "--score-threshold", "0.0", *TINY, "OUTPUT_DIR", out_dir]
    results = run_demo.main(argv)
    assert {"bbox", "segm"} <= set(results) and isinstance(results["segm"]["AP"], float)
    for name in ("val_predictions.png", "losses.png", "model_final.pth"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0
    printed = capsys.readouterr().out
    assert "val_predictions.png" in printed and "mask AP" in printed
    # Issue 10 item 16: the 256x256 tile is drawn 4x (demo/demo.py's rule), ground truth |
    # 8-pixel gap | predictions; the printed demo.py command draws the same detections.
    assert cv2.imread(os.path.join(out_dir, "val_predictions.png")).shape == (1024, 2056, 3)
    assert "demo/demo.py --config-file" in printed and "--confidence-threshold 0.0" in printed
    # The video part: the held-out pseudo-video tracked, scored and drawn (12 frames, 2x).
    assert re.search(r"\[demo\] nuclei_dsb_video_val VIS AP [\d.]+  AP50 [\d.]+  "
                     r"ID switches \d+ \(of 185 GT track-frames\)", printed)
    with Image.open(os.path.join(out_dir, "video", "tracks.gif")) as gif:
        assert gif.n_frames == 12 and gif.size == (384, 384)
    assert zipfile.ZipFile(os.path.join(out_dir, "video", "results.zip")).namelist() == [
        "results.json"]

    iterations, curves = run_demo.read_loss_curves(os.path.join(out_dir, "metrics.json"))
    assert iterations == [MAX_ITER - 1]
    assert set(curves) == {"total", "s0", "s1"}  # TINY has 2 stages
    record = _metrics(out_dir)[-1]
    assert curves["total"] == [record["total_loss"]]
    assert curves["s1"][0] == pytest.approx(
        sum(v for k, v in record.items() if k.startswith("s1_loss_")), rel=1e-9
    )

    run_demo.main(argv)  # a finished run is resumed at its end: evaluated again, not retrained
    # Issue 24 item 8: the re-run says which model it reused, not "wall time: 0.0 min".
    printed = capsys.readouterr().out
    final = os.path.join(out_dir, "model_final.pth")
    assert f"[demo] reused the trained model {final} (a finished run of {MAX_ITER} " in printed
    assert "training + evaluation wall time" not in printed
    with open(os.path.join(out_dir, "log.txt")) as f:
        starts = [line for line in f if "Starting training from iteration" in line]
    assert [s.split()[-1] for s in starts] == ["0", str(MAX_ITER)]


def test_run_demo_real_video_job(tmp_path, capsys):
    """make demo's default config (QueryInstVIS on the PSC time-lapse), 2 iterations of a
    narrowed random-init model: frame AP on ctc_psc_val, the held-out clip tracked, scored
    (1109 GT track-frames in t035-t049) and written as MP4 and GIF (15 frames each)."""
    run_demo = _load_run_demo()
    out_dir = str(tmp_path / "psc")
    argv = ["--score-threshold", "0.0", "MODEL.WEIGHTS", "", "SOLVER.MAX_ITER", "2",
            "TEST.EVAL_PERIOD", "2", "MODEL.QUERYINST.NUM_PROPOSALS", "20",
            "MODEL.QUERYINST.TEST_TOPK", "20", "MODEL.QUERYINST.NUM_STAGES", "1",
            "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256", "OUTPUT_DIR", out_dir]
    results = run_demo.main(argv)
    assert {"bbox", "segm"} <= set(results)
    printed = capsys.readouterr().out
    assert re.search(r"\[demo\] ctc_psc_val mask AP [\d.]+  AP50", printed)
    match = re.search(r"\[demo\] ctc_psc_video_val VIS AP ([\d.]+)  AP50 ([\d.]+)  "
                      r"ID switches (\d+) \(of (\d+) GT track-frames\)", printed)
    assert match and int(match.group(4)) == 1109
    mp4 = cv2.VideoCapture(os.path.join(out_dir, "video", "tracks.mp4"))
    assert mp4.get(cv2.CAP_PROP_FRAME_COUNT) == 15
    assert (mp4.get(cv2.CAP_PROP_FRAME_WIDTH), mp4.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (700, 536)
    with Image.open(os.path.join(out_dir, "video", "tracks.gif")) as gif:
        assert gif.n_frames == 15 and gif.size == (700, 536)


# ---------------------------------------------------------------- QueryInstVIS (issue 12)


def test_vis_training_and_eval_only_on_the_bundled_videos(tmp_path):
    """train_net.py trains QueryInstVIS on (key, reference) pairs of the training
    pseudo-videos (the VIS loader and mapper; loss_track logged), evaluates the held-out
    video with YTVISEvaluator after the last iteration and writes the submission; then
    --eval-only loads that checkpoint strictly and gives the same numbers (tracking is
    deterministic)."""
    out_dir = str(tmp_path / "vis")
    vis = ["MODEL.META_ARCHITECTURE", "QueryInstVIS", "MODEL.WEIGHTS", "",
           "MODEL.QUERYINST_VIS.TRACK_HEAD.EMBED_DIM", "32",
           "DATASETS.TRAIN", "('nuclei_dsb_video_train',)",
           "DATASETS.TEST", "('nuclei_dsb_video_val',)",
           "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "SOLVER.MAX_ITER", "2",
           "OUTPUT_DIR", out_dir]
    results = train_net.main(_args(opts=vis))
    segm = results["segm"]
    assert {"AP", "AP50", "AR10", "ID switches"} <= set(segm)
    assert segm["GT track-frames"] == 185  # the held-out video's
    assert "loss_track" in _metrics(out_dir)[-1]
    with zipfile.ZipFile(os.path.join(out_dir, "inference", "results.zip")) as zf:
        assert zf.namelist() == ["results.json"]
    again = train_net.main(_args("--eval-only", opts=vis + [
        "MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]))
    assert again["segm"] == pytest.approx(segm, nan_ok=True)
