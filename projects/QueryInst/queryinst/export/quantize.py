"""Static int8 quantization of an exported QueryInst ONNX graph with ONNX Runtime.

``tools/export_model.py --format onnx --quantize int8 --calibration-dataset NAME`` writes
``model.onnx`` (float32, ``queryinst/export/exporter.py``) and then, beside it,
``model.int8.onnx``: the same graph quantized by ONNX Runtime's own
``onnxruntime.quantization.quantize_static`` in the QDQ format (QuantizeLinear /
DequantizeLinear pairs around the quantized operators, which ONNX Runtime fuses into int8
kernels when it loads the graph), int8 weights per output channel, uint8 activations with
scales calibrated (min / max) on preprocessed frames of a training dataset.

So that ONNX Runtime runs every quantized convolution as an int8 kernel (``QLinearConv``)
rather than DequantizeLinear -> float32 Conv -> QuantizeLinear, the activations are uint8
(U8S8, its x86 int8 path; with int8 activations it fused only half of ResNet-50's
convolutions) and no two quantized layers share a weight or bias initializer
(:func:`unshare_initializers`). docs/benchmark.md ("int8") has the per-operator profiles.

What is quantized and what is not:

- Only the heavy linear operators, ``QUANTIZED_OP_TYPES`` (``Conv``, ``MatMul``, ``Gemm``):
  the backbone and FPN convolutions, the heads' linear layers, the dynamic interaction's
  products (docs/method.md §2) and the mask head's convolutions. Everything else, RoIAlign,
  LayerNorm, softmax, the box decoding (``Exp``, ``Add``, ``Mul``), the top-k and the
  sigmoids, runs in float32 on dequantized values.
- The layers whose outputs are decoded or squashed stay float32 too
  (:func:`fp32_output_layers`): the box regressions (decoded into boxes, which the next
  stage's RoIAlign samples), the classification logits and the mask logits (both go through
  a sigmoid, the reported scores and mask probabilities). They are found in the graph, not
  by name: every quantizable node from which a ``Sigmoid`` or an ``Exp`` is reached through
  non-quantizable nodes only.
- The ROI heads' linear operators other than the mask head's convolutions stay float32
  (``DEFAULT_FP32_NODES``): quantized, they cost ~1.5 mask AP more than they save in time
  (the box stages refine each other's boxes, so their errors compound). So do
  MobileNetV2's first four blocks, whose int8 activations cost ~1.9 mask AP. ``extra_fp32``
  (regular expressions on node names) keeps more operators in float32.

Calibration never reads a held-out image: :func:`calibration_dicts` refuses a dataset of
``DATASETS.TEST`` and a dataset that shares an image file with one.

On x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI) ONNX Runtime's U8S8 kernels add
pairs of uint8 x int8 products in 16 bits, which saturate with 8-bit weights: there the
weights are quantized to a 7-bit range (``reduce_range``, ONNX Runtime's advice for such
CPUs; :func:`u8s8_saturates`). On an AMD EPYC Zen 3 the 8-bit graph moved a top box by 31
px of a 600x512 photo; with 7-bit weights the top detections kept to the float graph's.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from detectron2.data import transforms as T

__all__ = [
    "DEFAULT_FP32_NODES",
    "QUANTIZE_MODES",
    "QUANTIZED_OP_TYPES",
    "QuantizeError",
    "CalibrationImages",
    "calibration_dicts",
    "check_quantizable",
    "fp32_output_layers",
    "u8s8_saturates",
    "graph_input",
    "quantize_int8",
    "quantized_path",
    "unshare_initializers",
]

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# Kept float32 by default (regular expressions on the exported node names, which follow the
# module paths): every linear operator of the ROI heads except the mask head's convolutions,
# i.e. the box stages' self-attention, dynamic interaction, FFN, classification and
# regression layers and the mask head's dynamic interaction. Quantized, they cost 1.8 mask
# AP on a ctc_psc_val model (33.7 -> 31.9; 32.5 with only the activation-by-activation
# products kept float32), against 0.3 kept float32: each stage's boxes feed the next stage's
# RoIAlign, so their errors compound over the stages (docs/benchmark.md, "int8").
#
# And MobileNetV2's first four blocks (``features.0``-``features.3``: the stem and the
# inverted residuals at strides 2 and 4, 9 convolutions). With them int8, three trained nuclei
# models lost 1.9 +- 0.4 mask AP on their training tiles against the float32 graph; with them
# float32, 0.5 +- 0.4 (on seed 1: blocks 4-9 float32 instead, 1.8; percentile or entropy
# calibration instead of min/max, 2.4 and 2.3). Chosen on nuclei_dsb_train, never on the
# held-out tile. ResNet node names do not match (docs/benchmark.md, "int8").
DEFAULT_FP32_NODES = (r"^/roi_heads/(?!mask_heads\.\d+/mask_convs)",
                      r"^/backbone/bottom_up/features\.[0-3]/")
# Operators whose input is decoded or squashed into an output: their producers stay fp32.
_FP32_CONSUMERS = ("Sigmoid", "Exp")
# Nodes whose output does not depend on the values of their input (walks stop there).
_SHAPE_ONLY = ("Shape", "Size", "ConstantOfShape")


class QuantizeError(ValueError):
    """A setting or calibration dataset the int8 export refuses; the message names the flag
    or key and the fix."""


def quantized_path(fp32_path: str, mode: str = "int8") -> str:
    """``DIR/model.onnx`` -> ``DIR/model.int8.onnx``."""
    root, ext = os.path.splitext(fp32_path)
    return f"{root}.{mode}{ext}"


def check_quantizable(fmt: str, opset: int, mode: str = "int8") -> None:
    """Refuse a quantization the tool does not do, before anything is built.

    Args:
        fmt: the export format (``--format``).
        opset: the ONNX opset (``--opset``).
        mode: ``--quantize`` (only "int8").

    Raises:
        QuantizeError: a mode other than int8; a format other than onnx (TorchScript graphs
            are not quantized here); an opset below 16 (RoIAlign's half-pixel offset, see
            ``exporter.MIN_ONNX_OPSET``) or above the newest one torch's ONNX exporter writes.
    """
    from torch.onnx import _constants

    from .exporter import MIN_ONNX_OPSET

    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"--quantize {mode!r} is not supported: use --quantize int8")
    if fmt != "onnx":
        raise QuantizeError(
            f"--quantize {mode} needs --format onnx: the int8 graph is made by ONNX Runtime's "
            f"quantize_static from the ONNX graph; a --format {fmt} file cannot be quantized. "
            f"Export with --format onnx --quantize {mode}"
        )
    newest = _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not MIN_ONNX_OPSET <= opset <= newest:
        raise QuantizeError(
            f"--opset {opset} cannot be quantized: --quantize {mode} takes opsets "
            f"{MIN_ONNX_OPSET}-{newest} (from {MIN_ONNX_OPSET}: RoIAlign's half-pixel offset; "
            f"up to {newest}: the newest torch's ONNX exporter writes). Pass --opset 17"
        )


def _image_files(dicts: Iterable[dict]) -> set[str]:
    """Every image path of a list of Detectron2 dataset dicts (image or video)."""
    files = set()
    for d in dicts:
        if "file_name" in d:
            files.add(os.path.realpath(d["file_name"]))
        files.update(os.path.realpath(f) for f in d.get("file_names", ()))
    return files


def calibration_dicts(cfg, name: str) -> list[dict]:
    """The dataset dicts of calibration dataset ``name``, checked to hold no held-out image.

    Args:
        cfg: the exported model's config; ``DATASETS.TEST`` names its held-out datasets.
        name: a registered Detectron2 dataset (e.g. ``nuclei_dsb_train``).

    Returns:
        list[dict]: its dicts, each with ``file_name``.

    Raises:
        QuantizeError: ``name`` is not registered, is one of ``DATASETS.TEST``, shares an
            image file with one of them, or has no image.
    """
    from detectron2.data import DatasetCatalog

    held_out = list(cfg.DATASETS.TEST)
    if name in held_out:
        raise QuantizeError(
            f"--calibration-dataset {name} is a held-out dataset of this config (DATASETS.TEST "
            f"{tuple(held_out)}): calibrating on it would tune the int8 scales to the images the "
            f"model is evaluated on. Pass a training dataset, e.g. DATASETS.TRAIN "
            f"{tuple(cfg.DATASETS.TRAIN)} or its image-level twin"
        )
    if name not in DatasetCatalog.list():
        train_like = sorted(n for n in DatasetCatalog.list() if n.endswith("_train"))
        raise QuantizeError(f"--calibration-dataset {name} is not a registered dataset; "
                            f"registered training sets: {', '.join(train_like)}")
    dicts = [d for d in DatasetCatalog.get(name) if "file_name" in d]
    if not dicts:
        raise QuantizeError(f"--calibration-dataset {name} has no images with file_name "
                            f"(a video dataset?): pass an image dataset")
    files = _image_files(dicts)
    for test_name in held_out:
        if test_name not in DatasetCatalog.list():
            continue
        shared = files & _image_files(DatasetCatalog.get(test_name))
        if shared:
            raise QuantizeError(
                f"--calibration-dataset {name} shares {len(shared)} image(s) with the held-out "
                f"DATASETS.TEST {test_name} (e.g. {sorted(shared)[0]}): calibrate on images "
                f"that are not evaluated on"
            )
    return dicts


def graph_input(image: np.ndarray, aug: T.Augmentation) -> np.ndarray:
    """An image as the exported graph takes it.

    Args:
        image: uint8 (H, W, 3) in the graph's ``input_format``.
        aug: the test transform (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``).

    Returns:
        np.ndarray: float32 (3, h, w), 0-255, resized.
    """
    resized = aug.get_transform(image).apply_image(image)
    return np.ascontiguousarray(resized.astype(np.float32).transpose(2, 0, 1))


class CalibrationImages:
    """ONNX Runtime ``CalibrationDataReader`` over dataset images, preprocessed as the
    predictor preprocesses (read in ``input_format``, resized by the test transform).

    Args:
        dicts: dataset dicts with ``file_name`` (from :func:`calibration_dicts`).
        num_images: how many, spread evenly over ``dicts`` (all of them if fewer).
        input_name: the graph's input name.
        input_format: "RGB" or "BGR".
        min_size, max_size: ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``.

    Attributes:
        files (list[str]): the images it feeds, in order.
        files_read (list[str]): every image it has read so far (for audits and tests).
    """

    def __init__(self, dicts: Sequence[dict], num_images: int, input_name: str,
                 input_format: str, min_size: int, max_size: int):
        if num_images < 1:
            raise QuantizeError(f"--calibration-images {num_images}: pass at least 1")
        picks = np.unique(np.linspace(0, len(dicts) - 1, min(num_images, len(dicts))).round())
        self.files = [dicts[int(i)]["file_name"] for i in picks]
        self.files_read: list[str] = []
        self.input_name = input_name
        self.input_format = input_format
        self.aug = T.ResizeShortestEdge([min_size, min_size], max_size)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next ``{input_name: float32 (3, h, w)}``, or None after the last image."""
        from ..data import read_image

        if self._next >= len(self.files):
            return None
        path = self.files[self._next]
        self._next += 1
        self.files_read.append(path)
        return {self.input_name: graph_input(read_image(path, format=self.input_format),
                                             self.aug)}

    def rewind(self) -> None:
        """Start again from the first image."""
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)


def fp32_output_layers(graph) -> list[str]:
    """Names of the quantizable nodes whose outputs are decoded or squashed.

    Walks back from every ``Sigmoid`` and ``Exp`` node through non-quantizable nodes (not
    through shape-only ones) and collects the ``QUANTIZED_OP_TYPES`` nodes where the walk
    stops: in QueryInst the box regressions (``bbox_pred``, one per stage), the last stage's
    classification logits (``cls_score``) and the mask logits (the mask head's
    ``predictor``).

    Args:
        graph: an ``onnx.GraphProto``.

    Returns:
        list[str]: node names, in graph order.
    """
    producer = {out: node for node in graph.node for out in node.output}
    found, seen = set(), set()
    stack = [n for n in graph.node if n.op_type in _FP32_CONSUMERS]
    while stack:
        node = stack.pop()
        for name in node.input:
            src = producer.get(name)
            if src is None or src.name in seen or src.op_type in _SHAPE_ONLY:
                continue
            seen.add(src.name)
            if src.op_type in QUANTIZED_OP_TYPES:
                found.add(src.name)
            else:
                stack.append(src)
    return [n.name for n in graph.node if n.name in found]


def unshare_initializers(graph) -> int:
    """Give every ``QUANTIZED_OP_TYPES`` node its own copy of each initializer that it shares
    with another node, directly or through ``Identity`` nodes, in place.

    The ONNX exporter stores equal constants once: layers with equal biases (e.g. all-zero
    ones) read one initializer, some through an ``Identity``. ``quantize_static`` quantizes
    such a bias once, with one layer's scales, and ONNX Runtime then cannot fuse the other
    layers into int8 kernels: they stay DequantizeLinear -> float32 Conv -> QuantizeLinear,
    slower than the float32 graph's Conv (docs/benchmark.md, "int8").

    Args:
        graph: an ``onnx.GraphProto``.

    Returns:
        int: the number of initializer copies added.
    """
    inits = {t.name: t for t in graph.initializer}
    identity_of = {n.output[0]: n.input[0] for n in graph.node
                   if n.op_type == "Identity" and n.input[0] in inits}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            if name in inits:
                users[name] = users.get(name, 0) + 1
    copies = 0
    for node in graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        for i, name in enumerate(node.input):
            source = identity_of.get(name, name)
            if source not in inits or (source == name and users[name] == 1):
                continue
            if source == name:
                users[name] -= 1  # its last user keeps the original
            copy = graph.initializer.add()
            copy.CopyFrom(inits[source])
            copy.name = f"{source}__{copies}"
            node.input[i] = copy.name
            copies += 1
    return copies


def u8s8_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels saturate on this CPU: x86 without VNNI.

    Without ``avx512_vnni`` or ``avx_vnni`` the x86 kernels multiply with ``vpmaddubsw``,
    which sums each pair of uint8 x int8 products into a saturating int16; 8-bit weights
    can overflow it (2 x 255 x 127 > 32767), 7-bit ones cannot. ARM and other CPUs: False.

    Args:
        cpuinfo: the file listing the CPU flags (Linux); where it cannot be read, PyTorch's
            own probe (``torch.cpu._is_vnni_supported``, AVX512-VNNI) decides.

    Returns:
        bool: True on x86 CPUs without VNNI.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    from ..modeling.fast_inference import _cpu_feature, cpuinfo_field

    flags = cpuinfo_field("flags", cpuinfo)
    if flags is None:
        return not _cpu_feature("vnni")
    return not ({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def quantize_int8(fp32_path: str, reader: CalibrationImages,
                  extra_fp32: Sequence[str] = (), out_path: str | None = None,
                  calibration_dataset: str | None = None,
                  activations: str = "uint8",
                  reduce_range: bool | None = None) -> dict[str, Any]:
    """Quantize ``fp32_path`` statically to int8 (ONNX Runtime ``quantize_static``, QDQ,
    per-channel int8 weights, 8-bit activations, min/max calibration) and record it in the
    ``model.json`` beside it under ``"int8"``.

    Shared initializers are copied first (:func:`unshare_initializers`), so that ONNX Runtime
    fuses every quantized Conv into ``QLinearConv``.

    Args:
        fp32_path: ``DIR/model.onnx`` written by ``export_model`` (its json beside it).
        reader: the calibration images.
        extra_fp32: regular expressions; quantizable nodes whose name matches one stay fp32
            (beside ``DEFAULT_FP32_NODES`` and :func:`fp32_output_layers`).
        out_path: where to write (default ``DIR/model.int8.onnx``).
        calibration_dataset: the dataset's name, recorded.
        activations: "uint8" (default: unsigned activations with signed weights, U8S8, ONNX
            Runtime's x86 int8 kernels) or "int8" (S8S8). On x86, ONNX Runtime fuses an int8
            (S8S8) Conv only where it can rewrite the activation to uint8 itself, which it
            does not where the quantized tensor has several readers (the first convolution
            of every ResNet block and the FPN's): those stayed DequantizeLinear -> float32
            Conv -> QuantizeLinear (docs/benchmark.md, "int8").
        reduce_range: quantize the weights to a 7-bit range, for CPUs whose int8 kernels
            saturate with 8-bit weights; None (default): :func:`u8s8_saturates` on this
            machine. Recorded in ``model.json``; ``ExportedPredictor`` warns where a graph
            with 8-bit weights meets such a CPU.

    Returns:
        dict: what was recorded: file, calibration dataset files count, the nodes kept in
        float32, the number of quantized nodes, the ONNX Runtime version.

    Raises:
        QuantizeError: ``activations`` other than "uint8" or "int8".
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from .exporter import export_info_path

    quant_types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if activations not in quant_types:
        raise QuantizeError(f"activations {activations!r}: use one of {sorted(quant_types)}")
    if reduce_range is None:
        reduce_range = u8s8_saturates()
    out_path = out_path or quantized_path(fp32_path)
    model = onnx.load(fp32_path)
    outputs = fp32_output_layers(model.graph)
    keep = list(outputs)
    patterns = [re.compile(p) for p in (*DEFAULT_FP32_NODES, *extra_fp32)]
    candidates = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OP_TYPES]
    keep += [n for n in candidates if n not in keep and any(p.search(n) for p in patterns)]
    copies = unshare_initializers(model.graph)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        source = fp32_path
        if copies:
            source = os.path.join(tmp, "unshared.onnx")
            onnx.save(model, source)
        del model
        quantize_static(
            source, out_path, reader,
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True, activation_type=quant_types[activations],
            weight_type=QuantType.QInt8, nodes_to_exclude=keep,
            calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
        )
    record = {
        "file": os.path.basename(out_path),
        "quant_format": "QDQ",
        "weights": "int8 per channel" + (", 7-bit range" if reduce_range else ""),
        "reduce_range": bool(reduce_range),
        "activations": f"{activations} per tensor, min/max calibrated",
        "initializer_copies": copies,
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "num_quantized_nodes": len(candidates) - len(keep),
        "output_layers_fp32": outputs,
        "default_fp32": list(DEFAULT_FP32_NODES),
        "nodes_kept_fp32": keep,
        "extra_fp32": list(extra_fp32),
        "calibration_dataset": calibration_dataset,
        "calibration_images": len(reader.files_read),
        "onnxruntime_version": onnxruntime.__version__,
    }
    info_path = export_info_path(fp32_path)
    with open(info_path) as f:
        info = json.load(f)
    info["int8"] = record
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    logger.info("wrote %s: %d nodes quantized, %d kept fp32, calibrated on %d images",
                out_path, record["num_quantized_nodes"], len(keep), record["calibration_images"])
    return record
