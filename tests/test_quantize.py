"""int8 export (queryinst/export/quantize.py, tools/export_model.py --quantize int8).

The truth is the float32 graph of the same export: the int8 graph must give the same top
detections on a real photo (class equal, boxes within 2% of the image's longer side, mask
IoU >= 0.9 after pasting). The fast test's model is the MobileNetV2 nuclei config with
random weights, 20 queries (as tests/test_export.py), with its output layers scaled so that
the random model is decisive as a trained one is: box regressions x0.1 (boxes stay at the
image's scale), class and mask logits x10 (scores and mask probabilities away from their
ties, where any rounding reorders them). The slow test trains the bundled nuclei config and
compares on a held-out nuclei tile. Calibration is audited through ``queryinst.data.read_image``,
which the calibration reader calls for every image.
"""
import json
import logging
import os

import cv2
import matplotlib
import numpy as np
import onnx
import pytest
import torch
from conftest import load_script
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import queryinst.data
from queryinst.config_loading import inference_config
from queryinst.export.predictor import ExportedPredictor

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CONFIG = os.path.join(ROOT, "configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
OPTS = ["MODEL.QUERYINST.NUM_PROPOSALS", "20", "MODEL.QUERYINST.TEST_TOPK", "20",
        "MODEL.DEVICE", "cpu"]
TOP = 5  # detections compared
BOX_TOL, MASK_IOU = 0.02, 0.9


def _files(name):
    return {os.path.realpath(d["file_name"]) for d in DatasetCatalog.get(name)}


@pytest.fixture(scope="module")
def export_tool():
    return load_script("tools/export_model.py", "queryinst_export_script_int8")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, one_torch_thread):
    torch.manual_seed(0)
    model = build_model(inference_config(CONFIG, OPTS + ["MODEL.WEIGHTS", ""]))
    heads = model.roi_heads
    with torch.no_grad():
        for head in heads.box_heads:
            head.bbox_pred.weight.mul_(0.1)
            head.bbox_pred.bias.mul_(0.1)
            head.cls_score.weight.mul_(10)
        for head in heads.mask_heads:
            head.predictor.weight.mul_(10)
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def quantized(weights, export_tool, tmp_path_factory):
    """(output dir, the image files read while the tool ran), written by
    ``tools/export_model.py --quantize int8 --calibration-dataset nuclei_dsb_train``."""
    out = tmp_path_factory.mktemp("int8")
    read, original = [], queryinst.data.read_image

    def audited(file_name, *args, **kwargs):
        read.append(os.path.realpath(file_name))
        return original(file_name, *args, **kwargs)

    queryinst.data.read_image = audited
    try:
        argv = ["--config-file", CONFIG, "--format", "onnx", "--output", str(out),
                "--quantize", "int8", "--calibration-dataset", "nuclei_dsb_train",
                "--calibration-images", "3", *OPTS, "MODEL.WEIGHTS", weights]
        assert export_tool.main(argv) == 0
    finally:
        queryinst.data.read_image = original
    return out, read


def _mask_iou(a, b):
    a, b = a.flatten(1), b.flatten(1)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones(len(a)))


def assert_same_top_detections(ours, truth, image_shape, top=TOP):
    """The ``top`` highest-scoring detections of ``truth`` (Instances in image pixels),
    each matched to the one of ``ours`` with the highest box IoU: class equal, every box
    coordinate within ``BOX_TOL`` of the longer image side, mask IoU >= ``MASK_IOU``."""
    from detectron2.structures import pairwise_iou

    order = truth.scores.argsort(descending=True)[:top]
    truth = truth[order]
    match = pairwise_iou(truth.pred_boxes, ours.pred_boxes).argmax(1)
    ours = ours[match]
    assert torch.equal(ours.pred_classes, truth.pred_classes)
    box_err = (ours.pred_boxes.tensor - truth.pred_boxes.tensor).abs().max().item()
    assert box_err <= BOX_TOL * max(image_shape), box_err
    iou = _mask_iou(ours.pred_masks, truth.pred_masks)
    assert iou.min().item() >= MASK_IOU, iou


def test_calibration_reads_training_images_only(quantized):
    out, read = quantized
    assert len(read) == 3
    assert set(read) <= _files("nuclei_dsb_train")
    assert not set(read) & _files("nuclei_dsb_val")
    info = json.loads((out / "model.json").read_text())["int8"]
    assert info["file"] == "model.int8.onnx" and info["calibration_images"] == 3
    assert info["calibration_dataset"] == "nuclei_dsb_train"


def test_int8_gives_the_fp32_top_detections_on_a_photo(quantized):
    out, _ = quantized
    image = cv2.imread(PHOTO)  # a real photo, 600x512
    truth = ExportedPredictor(str(out / "model.onnx"), num_threads=1)(image)["instances"]
    ours = ExportedPredictor(str(out / "model.int8.onnx"), num_threads=1)(image)["instances"]
    assert ours.image_size == image.shape[:2] and len(ours) == len(truth) == 20
    assert_same_top_detections(ours, truth, image.shape[:2])


def test_int8_graph_quantizes_the_heavy_ops_and_keeps_the_outputs_fp32(quantized):
    out, _ = quantized
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def weight_source(node):
        src = producer.get(node.input[1])
        return src if src is not None and src.op_type == "DequantizeLinear" else None

    info = json.loads((out / "model.json").read_text())["int8"]
    kept = set(info["nodes_kept_fp32"])
    # the layers feeding box decoding and the sigmoids, found in the graph, not by name
    outputs = info["output_layers_fp32"]
    assert sorted(k.split("/")[-2] for k in outputs) == ["bbox_pred"] * 3 + ["cls_score",
                                                                             "predictor"]
    assert set(outputs) <= kept
    # by default every linear op of the ROI heads but the mask convolutions stays fp32
    heads = {n.name for n in graph.node if n.name.startswith("/roi_heads/")
             and n.op_type in ("Conv", "MatMul", "Gemm")}
    mask_convs = {n for n in heads if "/mask_convs" in n}
    # and MobileNetV2's first four blocks: the stem conv, then 2 + 3 + 3 block convs
    early = {n.name for n in graph.node if n.op_type == "Conv" and any(
        n.name.startswith(f"/backbone/bottom_up/features.{b}/") for b in range(4))}
    assert len(mask_convs) == 4 and len(early) == 9
    assert kept == (heads - mask_convs) | early
    quantized_convs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        dq = weight_source(node)
        if node.name in kept:  # float32 inputs and weights, nothing dequantized
            assert dq is None and all(producer[i].op_type != "DequantizeLinear"
                                      for i in node.input if i in producer)
            if node.input[1] in init:
                assert init[node.input[1]].data_type == onnx.TensorProto.FLOAT
        elif node.op_type == "Conv":  # int8 weights, one scale per output channel
            weight = init[dq.input[0]]
            assert weight.data_type == onnx.TensorProto.INT8
            assert len(init[dq.input[1]].dims) == 1 and init[dq.input[1]].dims[0] == weight.dims[0]
            quantized_convs += 1
    # the backbone's from block 4 on (51 - 9), FPN (8) and mask head (4) convolutions
    assert quantized_convs == 54 and info["num_quantized_nodes"] == 54
    # RoIAlign, the box decoding and the sigmoids stay float32 operators
    ops = {n.op_type for n in graph.node}
    assert {"RoiAlign", "Sigmoid", "Exp"} <= ops
    assert not {op for op in ops if op.startswith("QLinear") or op.endswith("Integer")}
    # activations are uint8 (U8S8, ONNX Runtime's x86 int8 path), weights int8
    activation_types = {init[n.input[2]].data_type for n in graph.node
                        if n.op_type == "QuantizeLinear"}
    assert activation_types == {onnx.TensorProto.UINT8}


def test_onnxruntime_runs_every_quantized_conv_as_an_int8_kernel(quantized, tmp_path):
    """What ONNX Runtime makes of the QDQ graph when it loads it (its own optimized graph,
    written out): each of the 54 quantized convolutions fused into one ``QLinearConv``, no
    float32 Conv left reading a DequantizeLinear (the slow path that half of the convolutions
    took with int8 activations and shared biases). The float32 convolutions are MobileNetV2's
    first four blocks and the kept mask logits."""
    import onnxruntime as ort

    out, _ = quantized
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.int8.onnx"), options,
                         providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    # FusedConv: ONNX Runtime's float32 Conv with its activation (the early blocks' ReLU6)
    convs = [n for n in graph.node if n.op_type in ("Conv", "FusedConv", "QLinearConv")]
    assert sum(n.op_type == "QLinearConv" for n in convs) == 54
    float_convs = [n for n in convs if n.op_type != "QLinearConv"]
    assert [n.name for n in float_convs if not n.name.startswith("/backbone/")] == [
        "/roi_heads/mask_heads.2/predictor/Conv"]
    assert len(float_convs) == 1 + 9
    assert all(producer[i].op_type != "DequantizeLinear"
               for n in float_convs for i in n.input if i in producer)


@pytest.mark.parametrize("machine, flags, saturates", [
    ("x86_64", "fpu sse2 avx2 fma", True),  # AVX2 only (AMD Zen 3)
    ("x86_64", "avx2 avx512f avx512bw", True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", "avx2 avx512f avx512_vnni avx512_bf16", False),  # Zen 4, Cascade Lake on
    ("x86_64", "avx2 avx_vnni", False),  # AVX-VNNI (Alder Lake)
    ("aarch64", "", False),  # not x86: other kernels
])
def test_u8s8_saturates_where_x86_lacks_vnni(machine, flags, saturates, tmp_path, monkeypatch):
    from queryinst.export import quantize

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: X\nflags\t\t: {flags}\n\n")
    monkeypatch.setattr(quantize.platform, "machine", lambda: machine)
    assert quantize.u8s8_saturates(str(cpuinfo)) is saturates


def test_int8_weights_use_the_recorded_range(quantized):
    """The record's ``reduce_range`` is this CPU's rule, and the graph holds it: with it every
    int8 weight lies in the 7-bit range [-64, 63], without it the per-channel scales reach
    the 8-bit ends (+-127)."""
    from onnx import numpy_helper

    from queryinst.export.quantize import u8s8_saturates

    out, _ = quantized
    record = json.loads((out / "model.json").read_text())["int8"]
    assert record["reduce_range"] is u8s8_saturates()
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) > 1]
    assert len(weights) >= 54
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest <= 64 if record["reduce_range"] else largest == 127


def test_predictor_warns_when_8_bit_weights_meet_a_cpu_without_vnni(quantized, tmp_path,
                                                                    monkeypatch, caplog):
    import shutil

    from queryinst.export import predictor

    out, _ = quantized
    for name in ("model.int8.onnx", "model.json"):
        shutil.copy(out / name, tmp_path / name)
    info = json.loads((tmp_path / "model.json").read_text())
    info["int8"]["reduce_range"] = False
    (tmp_path / "model.json").write_text(json.dumps(info))
    for saturates, warned in ((True, True), (False, False)):
        monkeypatch.setattr(predictor, "u8s8_saturates", lambda: saturates)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ExportedPredictor(str(tmp_path / "model.int8.onnx"), num_threads=1)
        assert ("saturate on this CPU" in caplog.text) is warned
        assert ("--reduce-range on" in caplog.text) is warned


def test_unshare_initializers_gives_each_layer_its_own_copy(tmp_path):
    """Two Convs reading one bias (one directly, one through an Identity, as the ONNX
    exporter writes equal constants) and a weight of their own: afterwards each reads an
    initializer of its own with the same values, and the graph computes the same output
    (onnxruntime before and after)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from queryinst.export.quantize import unshare_initializers

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["y1"], name="conv1", pads=[1] * 4),
             helper.make_node("Identity", ["b"], ["b2"], name="id"),
             helper.make_node("Conv", ["y1", "w2", "b2"], ["y"], name="conv2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)

    def run(m):
        path = str(tmp_path / "m.onnx")
        onnx.save(m, path)
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert unshare_initializers(model.graph) == 2  # conv1's bias and conv2's (via the Identity)
    conv1, conv2 = (n for n in model.graph.node if n.op_type == "Conv")
    assert conv1.input[1] == "w1" and conv2.input[1] == "w2"  # weights not shared: kept
    biases = {conv1.input[2], conv2.input[2]}
    assert len(biases) == 2 and not biases & {"b", "b2"}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in biases:
        np.testing.assert_array_equal(values[name], values["b"])
    np.testing.assert_array_equal(run(model), before)


def test_demo_runs_the_int8_graph(quantized, tmp_path, capsys):
    out, _ = quantized
    demo = load_script("demo/demo.py", "queryinst_demo_script_int8")
    drawn = tmp_path / "drawn.jpg"
    argv = ["--exported", str(out / "model.int8.onnx"), "--input", PHOTO, "--output",
            str(drawn), "--confidence-threshold", "0"]
    assert demo.main(argv) == 0
    assert f"{PHOTO}: 20 detections with score >= 0 in " in capsys.readouterr().out
    assert cv2.imread(str(drawn)).shape == (1200, 1024, 3)



@pytest.fixture
def fresh_loggers():
    """The tool's main() sets up Detectron2's loggers; ``setup_logger`` is cached per process,
    so its console handler keeps the sys.stderr/stdout of the first in-process call, which
    pytest closes after that test. Clear them so that this test's own capture is used."""
    from detectron2.utils.logger import setup_logger

    def clear():
        setup_logger.cache_clear()
        for name in ("queryinst", "detectron2", "fvcore"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)

    clear()
    yield
    clear()


@pytest.mark.parametrize("extra, message", [
    (["--format", "torchscript", "--quantize", "int8", "--calibration-dataset",
      "nuclei_dsb_train"], "ERROR: --quantize int8 needs --format onnx"),
    (["--format", "onnx", "--opset", "21", "--quantize", "int8", "--calibration-dataset",
      "nuclei_dsb_train"], "ERROR: --opset 21 cannot be quantized"),
    (["--format", "onnx", "--opset", "11", "--quantize", "int8", "--calibration-dataset",
      "nuclei_dsb_train"], "ERROR: --opset 11 cannot be quantized"),
    (["--format", "onnx", "--quantize", "int4", "--calibration-dataset", "nuclei_dsb_train"],
     "ERROR: --quantize 'int4' is not supported"),
    (["--format", "onnx", "--quantize", "int8"], "ERROR: --quantize int8 needs "
                                                  "--calibration-dataset"),
    (["--format", "onnx", "--quantize", "int8", "--calibration-dataset", "nuclei_dsb_val"],
     "ERROR: --calibration-dataset nuclei_dsb_val is a held-out dataset of this config"),
    (["--format", "onnx", "--quantize", "int8", "--calibration-dataset", "held_out_copy"],
     "ERROR: --calibration-dataset held_out_copy shares 1 image(s) with the held-out "
     "DATASETS.TEST nuclei_dsb_val"),
    (["--format", "onnx", "--quantize", "int8", "--calibration-dataset", "no_such_set"],
     "ERROR: --calibration-dataset no_such_set is not a registered dataset"),
    (["--format", "onnx", "--calibration-dataset", "nuclei_dsb_train"],
     "ERROR: --calibration-dataset, --fp32-nodes and --reduce-range go with --quantize int8"),
    (["--format", "onnx", "--reduce-range", "on"],
     "ERROR: --calibration-dataset, --fp32-nodes and --reduce-range go with --quantize int8"),
])
def test_unsupported_quantization_is_refused(extra, message, export_tool, tmp_path, capsys,
                                             fresh_loggers):
    if "held_out_copy" not in DatasetCatalog.list():  # the val tile under another name
        DatasetCatalog.register("held_out_copy", lambda: DatasetCatalog.get("nuclei_dsb_val"))
    argv = ["--config-file", CONFIG, "--output", str(tmp_path), *extra, *OPTS,
            "MODEL.WEIGHTS", ""]
    assert export_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("ERROR:") == 1 and "Traceback" not in err
    assert not os.listdir(tmp_path)  # refused before anything is exported


@pytest.mark.slow
def test_trained_nuclei_model_int8_gives_the_fp32_top_detections(tmp_path, export_tool):
    """A short `make demo`-style training (200 iterations, ~4 min on 2 cores), then the int8
    graph against the fp32 one on the held-out nuclei tile (a real microscopy image)."""
    train_net = load_script("train_net.py", "queryinst_train_net_int8")
    out = tmp_path / "train"
    args = train_net.parse_args(
        ["--config-file", CONFIG, "SOLVER.MAX_ITER", "200", "SOLVER.STEPS", "(160,)",
         "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out), "SEED", "1", "MODEL.DEVICE", "cpu"])
    train_net.main(args)
    exported = tmp_path / "exported"
    assert export_tool.main([
        "--config-file", CONFIG, "--format", "onnx", "--output", str(exported), "--quantize",
        "int8", "--calibration-dataset", "nuclei_dsb_train", "MODEL.WEIGHTS",
        str(out / "model_final.pth")]) == 0
    record = DatasetCatalog.get("nuclei_dsb_val")[0]
    image = cv2.imread(record["file_name"])
    truth = ExportedPredictor(str(exported / "model.onnx"))(image)["instances"]
    ours = ExportedPredictor(str(exported / "model.int8.onnx"))(image)["instances"]
    assert truth.scores.max() > 0.5  # trained: confident detections
    assert_same_top_detections(ours, truth, image.shape[:2], top=10)
