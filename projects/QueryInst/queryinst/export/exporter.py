"""Export a QueryInst image model to ONNX or TorchScript: one image tensor in, four tensors out.

The graph is the model's own inference (docs/method.md §3) traced on one sample image:
normalisation and padding to the backbone's size divisibility (``preprocess_image``), the
backbone, the learnable proposals, every box stage, the top-k over (queries x classes), the
last dynamic mask head and ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``. Nothing is re-implemented:
:class:`ExportableQueryInst` calls ``QueryInst.inference(..., do_postprocess=False)``. What
tracing would freeze to the sample's size is written to stay a function of the input
(``LearnableProposals`` scales by the traced image size; ``MatrixROIPooler`` runs
torchvision's RoIAlign in a trace; the last mask head runs once per detection instead of
once per distinct query, the same values). Tests run the exported graph at sizes other than
the traced one (``tests/test_export.py``).

Graph (both formats):

- input ``image``: float32 (3, H, W) in ``INPUT.FORMAT`` channel order, pixel values 0-255,
  already resized by the test transform (``ResizeShortestEdge(MIN_SIZE_TEST,
  MAX_SIZE_TEST)``), not normalised, not padded; H and W dynamic.
- outputs, k = min(``MODEL.QUERYINST.TEST_TOPK``, ``TEST.DETECTIONS_PER_IMAGE``, N*C) (fewer
  with a positive ``SCORE_THRESH_TEST``): ``pred_boxes`` float32 (k, 4) XYXY pixels of the
  input (unclipped), ``scores`` float32 (k,), ``pred_classes`` int64 (k,) and, with
  ``MODEL.MASK_ON``, ``pred_masks`` float32 (k, 1, M, M) mask probabilities (M = 28 by
  default) in the box, not pasted.
- a video model (``QueryInstVIS``) adds ``query_indices`` int64 (k,), the query of each
  detection, and ``track_embeddings`` float32 (k, E), what its tracker compares
  (``QueryInstVIS.frame_detections``); the tracker itself, which keeps tracks between
  frames, runs in Python (``OnlineTracker.update`` after ``one_detection_per_query``).

Pasting into the original image stays outside the graph (``queryinst.export.predictor``).
ONNX uses opset >= 16, where torchvision exports ``aligned=True`` RoIAlign as ``RoiAlign``
with ``coordinate_transformation_mode="half_pixel"`` set explicitly (opset 11 has no such
attribute and would drop the half-pixel offset).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportableQueryInst",
    "MIN_ONNX_OPSET",
    "check_exportable",
    "export_model",
    "export_info_path",
    "output_names",
]

# Output file name by format.
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# ONNX RoiAlign gained coordinate_transformation_mode (half_pixel, RoIAlignV2's offset) in 16.
MIN_ONNX_OPSET = 16
INPUT_NAME = "image"
# Meta-architectures the export takes; a video model's graph is its per-frame detector.
EXPORTABLE_ARCHITECTURES = ("QueryInst", "QueryInstVIS")


class ExportError(ValueError):
    """A model or setting that cannot be exported; the message names the key or flag and
    the fix."""


def output_names(mask_on: bool, video: bool = False) -> list[str]:
    """The graph's output names, in order: boxes, scores, classes (and masks with masks on;
    and a video model's query indices and track embeddings)."""
    names = ["pred_boxes", "scores", "pred_classes"] + (["pred_masks"] if mask_on else [])
    return names + ["query_indices", "track_embeddings"] if video else names


def export_info_path(model_path: str) -> str:
    """The json written next to an exported model: ``DIR/model.onnx`` -> ``DIR/model.json``;
    a quantized graph shares its float graph's json: ``DIR/model.int8.onnx`` ->
    ``DIR/model.json``."""
    root = os.path.splitext(model_path)[0]
    return (root[: -len(".int8")] if root.endswith(".int8") else root) + ".json"


def check_exportable(cfg, fmt: str, opset: int = MIN_ONNX_OPSET) -> None:
    """Refuse what the export does not support, before the model is built.

    Args:
        cfg: the QueryInst config to export.
        fmt: "onnx" or "torchscript".
        opset: the ONNX opset (``--opset``); ignored for TorchScript.

    Raises:
        ExportError: naming the key or flag and the fix: an unknown format; an opset below
            16; a meta-architecture other than ``QueryInst`` and ``QueryInstVIS``; a pooler
            other than RoIAlign / RoIAlignV2; an
            ``INPUT.FORMAT`` other than RGB or BGR; ``MODEL.QUERYINST.INFERENCE_DTYPE``
            other than float32.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r} is not supported: use one of {sorted(EXPORT_FORMATS)}")
    if fmt == "onnx" and opset < MIN_ONNX_OPSET:
        raise ExportError(
            f"--opset {opset} is too old: ONNX RoiAlign has coordinate_transformation_mode "
            f"(the half-pixel offset of MODEL.QUERYINST.POOLER_TYPE ROIAlignV2) only from "
            f"opset {MIN_ONNX_OPSET}; below it the graph would silently pool other pixels. "
            f"Pass --opset {MIN_ONNX_OPSET} or higher"
        )
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in EXPORTABLE_ARCHITECTURES:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {arch} cannot be exported: only "
            f"{' and '.join(EXPORTABLE_ARCHITECTURES)} can (set MODEL.META_ARCHITECTURE)"
        )
    pooler = cfg.MODEL.QUERYINST.POOLER_TYPE
    if pooler not in ("ROIAlignV2", "ROIAlign"):
        raise ExportError(
            f"MODEL.QUERYINST.POOLER_TYPE {pooler} cannot be exported: set it to ROIAlignV2 "
            f"(the paper's) or ROIAlign"
        )
    dtype = cfg.MODEL.QUERYINST.INFERENCE_DTYPE
    if dtype != "float32":
        raise ExportError(
            f"MODEL.QUERYINST.INFERENCE_DTYPE {dtype} cannot be exported: the graph is the "
            f"float32 model; export with MODEL.QUERYINST.INFERENCE_DTYPE float32"
        )
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise ExportError(f"INPUT.FORMAT {cfg.INPUT.FORMAT} cannot be exported: use RGB or BGR")


class ExportableQueryInst(nn.Module):
    """A traceable view of a QueryInst model: ``image`` (3, H, W) -> the graph's outputs.

    Args:
        model: a ``QueryInst`` or ``QueryInstVIS`` in eval mode (its modules are used as they
            are; nothing is copied).

    Raises:
        ExportError: ``model`` is neither (see :func:`check_exportable`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from ..modeling.meta_arch.queryinst import QueryInst
        from ..video.modeling.meta_arch import QueryInstVIS

        if type(model) not in (QueryInst, QueryInstVIS):
            raise ExportError(
                f"{type(model).__name__} cannot be exported: only "
                f"{' and '.join(EXPORTABLE_ARCHITECTURES)} can (MODEL.META_ARCHITECTURE)"
            )
        self.model = model
        self.mask_on = model.roi_heads.mask_on
        self.video = type(model) is QueryInstVIS
        self.eval()  # the exporters keep the wrapper's mode, and set it on the model too

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """
        Args:
            image: float32 (3, H, W), ``INPUT.FORMAT`` order, 0-255, already resized.

        Returns:
            ``pred_boxes`` (k, 4) XYXY input pixels, ``scores`` (k,), ``pred_classes`` int64
            (k,) and, with masks, ``pred_masks`` float32 (k, 1, M, M) probabilities
            (module docstring); a video model's ``query_indices`` int64 (k,) and
            ``track_embeddings`` float32 (k, E) last.
        """
        if self.video:
            result = self.model.frame_detections({"image": image})
        else:
            result = self.model.inference([{"image": image}], do_postprocess=False)[0]
        outputs = (result.pred_boxes.tensor, result.scores, result.pred_classes)
        outputs += (result.pred_masks,) if self.mask_on else ()
        if self.video:
            outputs += (result.query_indices, result.track_embeddings)
        return outputs


@contextlib.contextmanager
def _portable_attention():
    """Self-attention through its composite ops while tracing: ``nn.MultiheadAttention``'s
    inference fast path is one fused op (``aten::_native_multi_head_attention``) that ONNX
    has no translation for."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def export_model(
    model: nn.Module,
    cfg,
    fmt: str,
    output_dir: str,
    sample: Tensor,
    opset: int = 17,
    thing_classes: list[str] | None = None,
) -> str:
    """Trace ``model`` on ``sample`` and write ``output_dir/model.onnx`` or ``model.ts`` and
    ``model.json`` beside it (what :class:`~queryinst.export.predictor.ExportedPredictor`
    needs: input format, test sizes, thresholds, class names, output names, opset).

    ONNX goes through ``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based
    exporter; H, W declared dynamic): the graph is the same trace as the TorchScript file.
    The TorchScript file is traced on the model's device (tensors the graph creates are
    fixed to it).

    Args:
        model: a ``QueryInst`` built from ``cfg``, weights loaded.
        cfg: its config (sizes, format, thresholds are recorded).
        fmt: "onnx" or "torchscript".
        output_dir: created if missing.
        sample: float32 (3, H, W), an input as the graph takes it (resized, 0-255).
        opset: ONNX opset, >= 16.
        thing_classes: class names recorded for drawing, or None.

    Returns:
        str: the path of the model file.

    Raises:
        ExportError: an unsupported format, opset or model (:func:`check_exportable`).
    """
    check_exportable(cfg, fmt, opset)
    wrapper = ExportableQueryInst(model)
    names = output_names(wrapper.mask_on, wrapper.video)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, EXPORT_FORMATS[fmt])
    sample = sample.to(model.device, torch.float32)
    with torch.no_grad(), _portable_attention(), warnings.catch_warnings():
        # The tracer flags every shape check and Python constant; the graph's generality
        # is tested instead, at sizes other than the sample's (tests/test_export.py).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "onnx":
            torch.onnx.export(
                wrapper, (sample,), path, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=names,
                dynamic_axes={INPUT_NAME: {1: "height", 2: "width"},
                              **{name: {0: "detections"} for name in names}},
            )
        else:
            traced = torch.jit.trace(wrapper, (sample,), check_trace=False)
            traced.save(path)
    info = _export_info(cfg, fmt, os.path.basename(path), opset, names, thing_classes)
    with open(export_info_path(path), "w") as f:
        json.dump(info, f, indent=2)
    return path


def _export_info(cfg, fmt, file_name, opset, names, thing_classes) -> dict[str, Any]:
    """The json beside the model: everything the predictor needs besides the graph."""
    q = cfg.MODEL.QUERYINST
    return {
        "format": fmt,
        "file": file_name,
        "opset": opset if fmt == "onnx" else None,
        "input_name": INPUT_NAME,
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "output_names": names,
        "num_proposals": q.NUM_PROPOSALS,
        "num_classes": q.NUM_CLASSES,
        "score_thresh_test": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        # Binarisation of the pasted masks, as QueryInst's own post-processing.
        "mask_threshold": 0.5,
        "thing_classes": list(thing_classes) if thing_classes is not None else None,
        "weights": cfg.MODEL.WEIGHTS,
        "torch_version": torch.__version__,
    }
