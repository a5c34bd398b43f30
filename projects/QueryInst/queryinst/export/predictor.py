"""Run an exported QueryInst (``model.onnx`` with onnxruntime, ``model.ts`` with torch.jit) as
Detectron2's ``DefaultPredictor`` runs the PyTorch model: BGR image in, ``Instances`` in
original-image pixels out.

Steps: channel order to ``INPUT.FORMAT``, Detectron2's ``ResizeShortestEdge`` test transform
(``MIN_SIZE_TEST``, ``MAX_SIZE_TEST``), the graph (``queryinst/export/exporter.py``), then
QueryInst's own post-processing, ``queryinst_postprocess`` (boxes rescaled, not clipped; masks pasted
with Detectron2's ``paste_masks_in_image`` and thresholded at 0.5; docs/method.md §3).
Everything but the graph comes from the ``model.json`` written beside it by
``tools/export_model.py``.

Security: a ``.ts`` file is TorchScript, a program; ``torch.jit.load`` and running it run the
code stored in it, by design. Load only ``.ts`` files you exported yourself (or trust as
you would trust a script); for files from others prefer ``.onnx``, a graph of standard
operators that onnxruntime runs without Python code.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, Instances

from ..modeling.meta_arch.queryinst import queryinst_postprocess
from .exporter import export_info_path
from .quantize import graph_input, u8s8_saturates

__all__ = ["ExportedPredictor"]

logger = logging.getLogger(__name__)


class ExportedPredictor:
    """``DefaultPredictor`` for an exported model file.

    Args:
        path: ``model.onnx``, ``model.int8.onnx`` (``--quantize int8``) or ``model.ts``
            written by ``tools/export_model.py``, with its ``model.json`` beside it. A ``.ts`` file runs the TorchScript code stored in it
            (see the module docstring): prefer ``.onnx`` for files from others.
        num_threads: intra-op threads of onnxruntime / torch (None: the library's default;
            for TorchScript, torch's process-wide setting is left as it is).

    Attributes:
        info (dict): the ``model.json``.
        metadata (Metadata): ``thing_classes`` from the json (empty when it has none, with
            one warning).
        input_format (str): "RGB" or "BGR".
        aug: the ``ResizeShortestEdge`` test transform.

    Raises:
        FileNotFoundError: ``path`` or its json is missing (the message names the file and
            the command that writes both).
        ValueError: a file that is neither ``.onnx`` nor ``.ts``.
    """

    def __init__(self, path: str, num_threads: int | None = None):
        info_path = export_info_path(path)
        for needed in (path, info_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f"{needed}: no such file; tools/export_model.py --output DIR writes "
                    f"DIR/model.onnx (or model.ts) and DIR/model.json together"
                )
        with open(info_path) as f:
            self.info = json.load(f)
        self.input_format = self.info["input_format"]
        size = self.info["min_size_test"]
        self.aug = T.ResizeShortestEdge([size, size], self.info["max_size_test"])
        classes = self.info.get("thing_classes")
        self.metadata = Metadata(thing_classes=classes) if classes else Metadata()
        if not classes:
            logger.warning("%s has no thing_classes: labels show class indices. Export again "
                           "from a model with class names (train_net.py records them) or "
                           "with --dataset NAME:JSON:IMAGES for its DATASETS.TEST[0].", info_path)
        self.output_names = self.info["output_names"]
        if path.endswith(".onnx"):
            import onnxruntime as ort

            self._warn_if_int8_saturates(path)

            options = ort.SessionOptions()
            if num_threads is not None:
                options.intra_op_num_threads = num_threads
            self._session = ort.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
            self._run = self._run_onnx
        elif path.endswith(".ts"):
            self._module = torch.jit.load(path, map_location="cpu")
            self._run = self._run_torchscript
        else:
            raise ValueError(f"{path}: an exported model is a .onnx or .ts file")

    def _warn_if_int8_saturates(self, path: str) -> None:
        # A graph quantized with 8-bit weights (on a CPU with VNNI) gives wrong boxes on an
        # x86 CPU without it (queryinst/export/quantize.py): say so rather than mislead.
        int8 = self.info.get("int8") or {}
        if (int8.get("file") == os.path.basename(path) and not int8.get("reduce_range")
                and u8s8_saturates()):
            logger.warning(
                "%s has 8-bit int8 weights, which ONNX Runtime's int8 kernels saturate on "
                "this CPU (x86 without VNNI): boxes and masks can be far off. Quantize again "
                "on this machine (tools/export_model.py --quantize int8 picks 7-bit weights "
                "here) or with --reduce-range on, or run the float32 model.onnx.", path)

    def _run_onnx(self, image: np.ndarray) -> list[torch.Tensor]:
        outputs = self._session.run(self.output_names, {self.info["input_name"]: image})
        return [torch.from_numpy(o) for o in outputs]

    def _run_torchscript(self, image: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self._module(torch.from_numpy(image)))

    def run_graph(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """The graph's outputs by name for one input as the graph takes it.

        Args:
            image: float32 (3, H, W), ``input_format`` order, 0-255, already resized.

        Returns:
            dict: ``pred_boxes`` (k, 4) XYXY input pixels, ``scores`` (k,),
            ``pred_classes`` int64 (k,), with masks ``pred_masks`` (k, 1, M, M).
        """
        return dict(zip(self.output_names, self._run(np.ascontiguousarray(image, np.float32))))

    def __call__(self, original_image: np.ndarray) -> dict[str, Instances]:
        """
        Args:
            original_image: uint8 (H, W, 3), BGR (OpenCV's order), as ``DefaultPredictor``.

        Returns:
            dict: ``{"instances": Instances}`` of size (H, W): ``pred_boxes`` (original
            pixels, unclipped), ``scores``, ``pred_classes`` and, with masks, ``pred_masks``
            bool (k, H, W).
        """
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        height, width = image.shape[:2]
        graph_image = graph_input(image, self.aug)
        outputs = self.run_graph(graph_image)
        result = Instances(graph_image.shape[1:])
        result.pred_boxes = Boxes(outputs["pred_boxes"])
        result.scores = outputs["scores"]
        result.pred_classes = outputs["pred_classes"]
        if "pred_masks" in outputs:
            result.pred_masks = outputs["pred_masks"]
        return {"instances": queryinst_postprocess(
            result, height, width, mask_threshold=self.info["mask_threshold"]
        )}
