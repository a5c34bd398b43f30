"""The MMDetection 3.3.0 reference (tools/reference/, tools/reference_check.py) and its use by
tools/parity_check.py and tools/benchmark.py --reference.

The default suite never installs the reference: it tests the project-side logic (venv
location, error messages, the subprocess protocol against a stand-in process, the dump
contract, the benchmark's reference row) and the parts of the reference's own code that need
no MMDetection (weight exercising, BN calibration, the RoIAlign stand-in). The slow test sets
the reference up from the package index and runs the whole parity check, as docs/official_weights.md says.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from qi_bench import models as bench_models
from qi_bench import parity, runner
from qi_bench import reference as check  # tools/ is on pytest's path (setup.cfg)
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "Base-QueryInst.yaml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

check_script = load_script("tools/reference_check.py", "queryinst_reference_check")
ref_script = load_script("tools/reference/mmdet_queryinst.py", "queryinst_mmdet_reference")
standin = load_script("tools/reference/mmcv_ext_standin.py", "queryinst_mmcv_ext_standin")


# ----------------------------------------------------------------------------- driver


def test_venv_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QUERYINST_REFERENCE_VENV", raising=False)
    monkeypatch.setenv("QUERYINST_CACHE", str(tmp_path))
    assert check.default_venv() == str(tmp_path / "mmdet_reference")
    monkeypatch.setenv("QUERYINST_REFERENCE_VENV", str(tmp_path / "elsewhere"))
    assert check.default_venv() == str(tmp_path / "elsewhere")


def test_missing_venv_is_an_error_that_says_how_to_set_it_up(tmp_path, capsys):
    venv = tmp_path / "no_venv"
    with pytest.raises(check.ReferenceError, match="tools/reference/setup.sh") as e:
        check.reference_python(str(venv))
    assert str(venv) in str(e.value)
    assert check_script.main(["--no-setup", "--venv", str(venv), "--variant", "100"]) == 2
    err = capsys.readouterr().err
    assert "reference_check.py: error: no reference venv at" in err and str(venv) in err


def test_bad_arguments_are_refused_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        check_script.main(["--image", str(tmp_path / "missing.jpg")])
    assert e.value.code == 2
    assert "--image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_script.main(["--variant", "200"])
    assert "invalid choice" in capsys.readouterr().err


def test_torch_requirement_pins_this_venvs_public_versions():
    import torchvision

    req = check.torch_requirement()
    assert req == (f"torch=={torch.__version__.split('+')[0]} "
                   f"torchvision=={torchvision.__version__.split('+')[0]}")
    assert "+" not in req


def test_reference_command_line(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    cmd = check.reference_command("py", "300", "w.pth", seed=3, threads=4, image=str(image),
                                  dump="a.npz", aux=False)
    assert cmd[:2] == ["py", check.SCRIPT]
    args = ref_script.parse_args(cmd[2:])  # the reference's own parser accepts it
    assert (args.variant, args.seed, args.threads, args.checkpoint) == ("300", 3, 4, "w.pth")
    assert (args.dump, args.no_aux, args.serve) == ("a.npz", True, None)
    with pytest.raises(ValueError, match="100, 300"):
        check.reference_command("py", "50", "w.pth")
    with pytest.raises(ValueError, match="dump needs image"):
        check.reference_command("py", "100", "w.pth", dump="a.npz")


def test_default_image_is_a_real_photo():
    from PIL import Image

    with Image.open(check.default_image()) as im:
        assert im.size == (512, 600)


FAKE_SERVER = textwrap.dedent("""\
    import json, sys
    args = sys.argv[1:]
    if "--serve" not in args:
        sys.exit(3)
    print("log lines go to stderr", file=sys.stderr)
    if "{mode}" == "die":
        sys.exit(4)
    if "{mode}" == "chatty":
        print("Loads checkpoint by local backend", flush=True)
    print(json.dumps({{"ready": True, "images": 1, "threads": 1}}), flush=True)
    for n, line in enumerate(sys.stdin):
        if line.strip() == "quit":
            break
        reply = {{"seconds": 0.5 + n}} if "{mode}" == "ok" else {{"error": "no"}}
        print(json.dumps(reply), flush=True)
""")


def fake_reference(tmp_path, monkeypatch, mode):
    script = tmp_path / f"fake_{mode}.py"
    script.write_text(FAKE_SERVER.format(mode=mode))
    monkeypatch.setattr(check, "SCRIPT", str(script))
    return check.ReferenceServer(sys.executable, "100", str(tmp_path / "w.pth"),
                                 str(tmp_path / "x.npy"))


def test_server_protocol(tmp_path, monkeypatch):
    with fake_reference(tmp_path, monkeypatch, "ok") as server:
        assert server.ready == {"ready": True, "images": 1, "threads": 1}
        assert [server.infer(), server.infer()] == [0.5, 1.5]
    assert server.proc.returncode == 0  # quit on close


def test_server_that_dies_or_misanswers_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(check.ReferenceError, match="exit code 4"):
        fake_reference(tmp_path, monkeypatch, "die")
    with pytest.raises(check.ReferenceError, match="protocol expects a JSON line"):
        fake_reference(tmp_path, monkeypatch, "chatty")
    with fake_reference(tmp_path, monkeypatch, "bad") as server:
        with pytest.raises(check.ReferenceError, match="answered"):
            server.infer()


# ----------------------------------------------------------------------------- dump contract


def test_dump_contract_names_what_is_missing():
    names = parity.required_arrays(6)
    assert "stage5_attn_feats" in names and "stage6_attn_feats" not in names
    assert {"input_tensor", "det_sort_order", "topk_inds", "versions_json"} <= set(names)
    parity.check_arrays("ok.npz", names, 6)
    with pytest.raises(ValueError, match=r"x\.npz lacks det_masks, stage2_rois:"):
        parity.check_arrays("x.npz", [n for n in names if n not in ("stage2_rois", "det_masks")], 6)
    aux = parity.required_arrays(6, aux=True)
    assert "fpn_p5" in aux and "stage0_bbox_roi_feats" in aux
    with pytest.raises(ValueError, match="backbone_c2"):
        parity.check_arrays("x_aux.npz", aux[1:], 6, aux=True)


# ----------------------------------------------------------------------------- reference code


class TinyQueryInst(nn.Module):
    """The attributes exercise_weights touches, at toy size."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.rpn_head = nn.Module()
        self.rpn_head.init_proposal_bboxes = nn.Embedding(5, 4)
        head = nn.Module()
        head.norm = nn.LayerNorm(8)
        head.fc_reg = nn.Linear(8, 4)
        head.fc_cls = nn.Linear(8, 3)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.ModuleList([head])
        with torch.no_grad():  # MMDetection's init: constants everywhere
            nn.init.zeros_(head.fc_reg.bias)
            nn.init.constant_(head.fc_cls.bias, -4.595)
            self.backbone[4].weight.zero_()
            self.rpn_head.init_proposal_bboxes.weight[:, :2] = 0.5
            self.rpn_head.init_proposal_bboxes.weight[:, 2:] = 1.0


def tiny(seed: int = 0) -> TinyQueryInst:
    torch.manual_seed(seed)
    return TinyQueryInst()


def test_exercise_weights_leaves_no_constant_or_identity_tensor():
    model = tiny()
    fc_reg = model.roi_head.bbox_head[0].fc_reg.weight.clone()
    ref_script.exercise_weights(model, seed=0, calib_size=16)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            assert not bool((t == t.flatten()[0]).all()), f"{name} is still constant"
    bn = model.backbone[1]
    assert not torch.allclose(bn.weight, torch.ones(8))
    assert (bn.running_var > 0).all()
    boxes = model.rpn_head.init_proposal_bboxes.weight
    assert boxes[:, :2].min() >= 0.2 and boxes[:, :2].max() <= 0.8
    assert boxes[:, 2:].min() >= 0.15 and boxes[:, 2:].max() <= 0.5
    torch.testing.assert_close(model.roi_head.bbox_head[0].fc_reg.weight, fc_reg * 0.1)
    assert abs(model.roi_head.bbox_head[0].fc_cls.bias.mean().item() + 4.595) < 0.2
    # The same seed gives the same weights, another seed others.
    again, other = tiny(), tiny()
    ref_script.exercise_weights(again, seed=0, calib_size=16)
    ref_script.exercise_weights(other, seed=1, calib_size=16)
    for k, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], t), k
    assert not torch.equal(other.backbone[1].running_mean, model.backbone[1].running_mean)


def test_calibration_normalises_each_bn_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(1, 3, 20, 20) * 5 + 2
    assert ref_script.calibrate_backbone_bn(net, x) == 2
    assert net.training  # restored
    net.eval()
    with torch.no_grad():
        inner = net[1](net[0](x))  # BN with weight 1, bias 0: standardised per channel
        out = net(x)
    torch.testing.assert_close(inner.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(inner.var(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)


def test_roi_align_standin_matches_detectron2_roialign_v2():
    from detectron2.layers import ROIAlign

    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16, 20)
    rois = torch.tensor([[0, 1.3, 2.2, 30.5, 25.1], [1, -3.0, 4.0, 12.0, 40.0]])
    out = torch.empty(2, 3, 7, 7)
    standin.roi_align_forward(feats, rois, out, None, None, aligned_height=7, aligned_width=7,
                              spatial_scale=0.5, sampling_ratio=2, pool_mode=1, aligned=True)
    expected = ROIAlign((7, 7), 0.5, 2, aligned=True)(feats, rois)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="average"):
        standin.roi_align_forward(feats, rois, out, None, None, pool_mode=0)


def test_standin_refuses_every_other_op_by_name():
    module = standin._StandIn("mmcv._ext")
    assert module.roi_align_forward is standin.roi_align_forward
    assert module.nms is standin.nms  # MaskTrack R-CNN's RPN and box head need it
    assert hasattr(module, "deform_conv_forward")  # mmcv.ops's import-time check passes
    with pytest.raises(NotImplementedError, match=r"mmcv\._ext\.deform_conv_forward"):
        module.deform_conv_forward(torch.zeros(1, 4))
    with pytest.raises(AttributeError):
        module.__wrapped__


# ----------------------------------------------------------------------------- benchmark


bench = load_script("tools/benchmark.py", "queryinst_benchmark_ref")


def test_benchmark_reference_needs_a_matching_config(capsys):
    cfg = bench_models.queryinst_cfg(BASE_CONFIG, [], "cpu")
    assert bench_models.reference_variant(cfg) == "100"
    for opts, what in ((["MODEL.QUERYINST.NUM_PROPOSALS", "50"], "100 or 300 queries"),
                       (["MODEL.QUERYINST.NUM_CLASSES", "8"], "80 classes"),
                       (["MODEL.RESNETS.DEPTH", "101"], "ResNet-50")):
        with pytest.raises(ValueError, match=what):
            bench_models.reference_variant(bench_models.queryinst_cfg(BASE_CONFIG, opts, "cpu"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--config-file", BASE_CONFIG, "--reference", "--device", "cuda"])
    assert "--device cpu" in capsys.readouterr().err


class FakeServer:
    """Stands in for ReferenceServer: each call sleeps 20 ms and reports 15 ms."""

    def __init__(self):
        self.calls = 0
        self.closed = False

    def infer(self):
        import time

        self.calls += 1
        time.sleep(0.02)
        return 0.015

    def close(self):
        self.closed = True


def test_benchmark_times_the_reference_in_the_same_rounds(monkeypatch):
    server = FakeServer()
    seen = {}

    def fake_start(args, qcfg, images, workdir):
        seen["images"] = images
        return bench_models.ReferenceBench(server, "100"), qcfg

    monkeypatch.setattr(runner, "start_reference", fake_start)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = bench.main(["--config-file", BASE_CONFIG, "--baselines", "none", "--reference",
                             "--input-size", "64", "96", "--iters", "3", "--warmup", "1",
                             "--threads", "1", "--no-flops", "MODEL.QUERYINST.TEST_TOPK", "20"])
    assert server.calls == 4 and server.closed  # 1 warm-up + 3 rounds; closed at the end
    assert len(seen["images"]) == 1 and tuple(seen["images"][0].shape) == (3, 64, 96)
    ours, ref = report["models"]
    assert ref["name"] == "mmdet 3.3.0 reference" and ref["num_queries"] == 100
    assert len(ref["infer_times_s"]) == 3 and min(ref["infer_times_s"]) >= 0.02
    assert ref["reference_self_times_s"] == [0.015] * 3
    per_round = [o / r for o, r in zip(ours["infer_times_s"], ref["infer_times_s"])]
    summary = report["reference"]
    assert summary["ours_over_reference_per_round_median"] == pytest.approx(
        float(np.median(per_round)), abs=2e-3)
    assert ref["latency_vs_queryinst"] == pytest.approx(
        ref["infer_median_s"] / ours["infer_median_s"], abs=2e-3)
    assert "ours / MMDetection 3.3.0 reference latency" in out.getvalue()
    assert "mmdet 3.3.0 reference" in out.getvalue()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_reference_set_up_from_the_index_and_parity_passes(tmp_path):
    """Sets up the reference (minutes the first time), runs both variants, checks parity."""
    try:
        check.setup_reference(quiet=True)
    except check.ReferenceError as e:
        if "pip could not install" in str(e):
            pytest.skip(f"the package index is unreachable, the reference cannot be set up: {e}")
        raise
    out = tmp_path / "run"
    assert check_script.main(["--no-setup", "--out-dir", str(out)]) == 0
    # The checkpoint is exercised: no constant tensor, no identity BN statistics.
    sd = torch.load(out / "reference_100.pth", map_location="cpu", weights_only=True)["state_dict"]
    constant = [k for k, t in sd.items()
                if t.is_floating_point() and bool((t == t.flatten()[0]).all())]
    assert constant == []
    assert len(sd) == 780
    dump = np.load(out / "reference_300.npz")
    assert dump["rpn_proposals"].shape == (300, 4) and dump["det_scores"].shape == (300,)
    assert os.path.exists(out / "reference_300_aux.npz")
