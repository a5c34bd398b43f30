"""ONNX and TorchScript export (queryinst/export/exporter.py, tools/export_model.py) and the
predictor of exported models (queryinst/export/predictor.py, demo/demo.py --exported).

The truth is the PyTorch model itself: the same weights run through ``QueryInst.inference``
(the CPU's default pooler, not the exported graph's RoIAlign) and through Detectron2's
``DefaultPredictor``. The model is the MobileNetV2 nuclei config with random weights, 20
queries, 20 classes (a query may give several of the top-20 detections), exported by
``tools/export_model.py`` at 256x256 and run at other sizes, which must work: H and W are
dynamic. The box regressions' last layers are scaled by 0.1, so that the random model's
boxes stay at the scale of the image, as a trained model's do (unscaled, three random stages
grow boxes to ~50x the image, where the box tolerance, relative to the image size, means
nothing).
"""
import json
import os

import matplotlib
import numpy as np
import pytest
import torch
from conftest import load_script
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from queryinst import add_queryinst_config
from queryinst.checkpoint import QueryInstCheckpointer
from queryinst.export import ExportableQueryInst, ExportError, check_exportable
from queryinst.export.predictor import ExportedPredictor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CONFIG = os.path.join(ROOT, "configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
OPTS = ["MODEL.QUERYINST.NUM_PROPOSALS", "20", "MODEL.QUERYINST.TEST_TOPK", "20",
        "MODEL.QUERYINST.NUM_CLASSES", "20", "DATASETS.TEST", "('voc_mini',)",
        "MODEL.DEVICE", "cpu"]
# Parity tolerances (issue 13): scores relative, boxes relative to the image's longer side,
# mask IoU of the 0.5-thresholded masks, mask probabilities absolute.
SCORE_RTOL, BOX_TOL, MASK_IOU, MASK_ATOL = 1e-4, 1e-4, 0.999, 1e-3
# (H, W) of the graph's inputs: neither the traced 256x256 nor multiples of 32 (padding).
SIZES = [(200, 312), (333, 250)]
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}


def _cfg(weights, *extra):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(OPTS + ["MODEL.WEIGHTS", weights, *extra])
    return cfg


@pytest.fixture(scope="module")
def weights(tmp_path_factory, one_torch_thread):
    """A checkpoint of the test model: random weights, box regressions scaled by 0.1."""
    torch.manual_seed(0)
    model = build_model(_cfg(""))
    with torch.no_grad():
        for head in model.roi_heads.box_heads:
            head.bbox_pred.weight.mul_(0.1)
            head.bbox_pred.bias.mul_(0.1)
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def pytorch_model(weights):
    model = build_model(_cfg(weights)).eval()
    QueryInstCheckpointer(model, strict=True).load(weights)
    return model


@pytest.fixture(scope="module")
def export_tool():
    return load_script("tools/export_model.py", "queryinst_export_script")


@pytest.fixture(scope="module")
def exported(weights, export_tool, tmp_path_factory):
    """{format: path of the exported file}, both written by tools/export_model.py."""
    paths = {}
    for fmt, name in FORMATS.items():
        out = tmp_path_factory.mktemp(fmt)
        argv = ["--config-file", CONFIG, "--format", fmt, "--output", str(out),
                *OPTS, "MODEL.WEIGHTS", weights]
        assert export_tool.main(argv) == 0
        paths[fmt] = str(out / name)
    return paths


def _mask_iou(a, b):
    """IoU of two stacks of bool masks (K, ...) taken as one set of pixels per mask."""
    a, b = a.flatten(1), b.flatten(1)
    union = (a | b).sum(1)
    inter = (a & b).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union, dtype=float))


def _assert_parity(ours, truth, image_size):
    """``ours``, ``truth``: dicts of pred_boxes, scores, pred_classes, pred_masks (float
    probabilities or bool pasted masks), the same k detections in the same order."""
    assert len(ours["scores"]) == len(truth["scores"]) > 0
    torch.testing.assert_close(ours["scores"], truth["scores"], rtol=SCORE_RTOL, atol=0)
    box_err = (ours["pred_boxes"] - truth["pred_boxes"]).abs().max().item()
    assert box_err <= BOX_TOL * max(image_size), box_err
    assert torch.equal(ours["pred_classes"], truth["pred_classes"])
    masks, true_masks = ours["pred_masks"], truth["pred_masks"]
    if masks.is_floating_point():
        torch.testing.assert_close(masks, true_masks, rtol=0, atol=MASK_ATOL)
        masks, true_masks = masks >= 0.5, true_masks >= 0.5
    assert _mask_iou(masks, true_masks).min().item() >= MASK_IOU


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_graph_equals_pytorch_at_two_sizes(fmt, exported, pytorch_model):
    predictor = ExportedPredictor(exported[fmt], num_threads=1)
    wrapper = ExportableQueryInst(pytorch_model)
    generator = torch.Generator().manual_seed(1)
    for size in SIZES:
        image = torch.rand(3, *size, generator=generator) * 255
        with torch.no_grad():
            truth = dict(zip(predictor.output_names, wrapper(image)))
        ours = predictor.run_graph(image.numpy())
        assert ours["pred_boxes"].dtype == torch.float32
        assert ours["pred_classes"].dtype == torch.int64
        assert ours["pred_masks"].shape == (20, 1, 28, 28)
        _assert_parity(ours, truth, size)


def test_onnx_roialign_is_half_pixel(exported):
    import onnx

    graph = onnx.load(exported["onnx"], load_external_data=False)
    opset = {o.domain: o.version for o in graph.opset_import}[""]
    assert opset >= 16
    roi_aligns = [n for n in graph.graph.node if n.op_type == "RoiAlign"]
    # 4 FPN levels x (3 box stages + the last mask head)
    assert len(roi_aligns) == 16
    for node in roi_aligns:  # set explicitly: onnxruntime's CPU default differs from the spec
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["coordinate_transformation_mode"] == b"half_pixel"
        assert attrs["sampling_ratio"] == 2
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == [3, "height", "width"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_predictor_equals_default_predictor(fmt, exported, weights):
    import cv2

    image = cv2.imread(PHOTO)  # a real photo, 600x512, resized to 300x256 by both
    truth = DefaultPredictor(_cfg(weights))(image)["instances"]
    ours = ExportedPredictor(exported[fmt], num_threads=1)(image)["instances"]
    assert ours.image_size == truth.image_size == image.shape[:2]
    assert ours.pred_masks.dtype == torch.bool
    _assert_parity({k: v.tensor if k == "pred_boxes" else v for k, v in ours.get_fields().items()},
                   {k: v.tensor if k == "pred_boxes" else v for k, v in truth.get_fields().items()},
                   image.shape[:2])
    with open(os.path.splitext(exported[fmt])[0] + ".json") as f:
        info = json.load(f)
    assert info["input_format"] == "RGB" and info["min_size_test"] == 256
    assert len(info["thing_classes"]) == 20 and info["thing_classes"][0] == "aeroplane"


def test_unsupported_settings_are_refused(export_tool, tmp_path, capsys):
    argv = ["--config-file", CONFIG, "--format", "onnx", "--output", str(tmp_path),
            "--opset", "11", *OPTS, "MODEL.WEIGHTS", ""]
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "ERROR: --opset 11 is too old" in err and "Pass --opset 16 or higher" in err
    assert not os.listdir(tmp_path)

    rcnn = _cfg("", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN")
    with pytest.raises(ExportError, match="MODEL.META_ARCHITECTURE GeneralizedRCNN cannot be"):
        check_exportable(rcnn, "torchscript")
    with pytest.raises(ExportError, match="POOLER_TYPE ROIPool cannot be exported"):
        check_exportable(_cfg("", "MODEL.QUERYINST.POOLER_TYPE", "ROIPool"), "onnx")


def test_missing_json_is_named(exported, tmp_path):
    lone = tmp_path / "model.onnx"
    lone.write_bytes(open(exported["onnx"], "rb").read())
    with pytest.raises(FileNotFoundError, match="model.json: no such file; tools/export_model"):
        ExportedPredictor(str(lone))


def test_demo_runs_exported_model(exported, tmp_path, capsys):
    demo = load_script("demo/demo.py", "queryinst_demo_script_export")
    out = tmp_path / "drawn.jpg"
    argv = ["--exported", exported["onnx"], "--input", PHOTO, "--output", str(out),
            "--confidence-threshold", "0"]
    assert demo.main(argv) == 0
    assert f"{PHOTO}: 20 detections with score >= 0 in " in capsys.readouterr().out
    drawn = np.asarray(__import__("cv2").imread(str(out)))
    assert drawn.shape == (1200, 1024, 3)  # 600x512 drawn 2x
    with pytest.raises(SystemExit):  # settings are fixed at export
        demo.parse_args(["--exported", exported["onnx"], "--input", PHOTO,
                         "--opts", "MODEL.DEVICE", "cpu"])
    assert "--exported takes no --opts" in capsys.readouterr().err


def test_detection_only_with_score_threshold(weights, tmp_path):
    """MODEL.MASK_ON False (three outputs) and a positive SCORE_THRESH_TEST (applied inside
    the graph, so k depends on the image), at a size other than the traced one."""
    from queryinst.export import export_model

    cfg = _cfg(weights, "MODEL.MASK_ON", "False")
    model = build_model(cfg).eval()
    QueryInstCheckpointer(model).load(weights)  # without the mask heads' tensors
    image = torch.rand(3, *SIZES[1], generator=torch.Generator().manual_seed(2)) * 255
    with torch.no_grad():
        top20 = ExportableQueryInst(model)(image)[1]
    # a threshold between the 10th and 11th score: 10 detections pass
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(top20[9] + top20[10]) / 2
    model.roi_heads.test_score_thresh = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
    path = export_model(model, cfg, "torchscript", str(tmp_path), torch.rand(3, 256, 256) * 255)
    predictor = ExportedPredictor(path)
    assert predictor.output_names == ["pred_boxes", "scores", "pred_classes"]
    with torch.no_grad():
        truth = dict(zip(predictor.output_names, ExportableQueryInst(model)(image)))
    ours = predictor.run_graph(image.numpy())
    assert len(truth["scores"]) == len(ours["scores"]) == 10
    torch.testing.assert_close(ours["scores"], truth["scores"], rtol=SCORE_RTOL, atol=0)
    assert torch.equal(ours["pred_classes"], truth["pred_classes"])
    box_err = (ours["pred_boxes"] - truth["pred_boxes"]).abs().max().item()
    assert box_err <= BOX_TOL * max(SIZES[1])
