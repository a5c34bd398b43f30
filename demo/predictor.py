"""Run a QueryInst model on images and video frames and draw what it finds.

The model runs through Detectron2's ``DefaultPredictor`` (weights from ``MODEL.WEIGHTS``,
which may also be an official MMDetection/QueryInst ``.pth``, converted on load; test-time
resize ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, input format ``INPUT.FORMAT``); or, given an exported ``model.onnx`` / ``model.ts``, through
``queryinst.export.predictor.ExportedPredictor`` (same input and output); drawing
is Detectron2's ``Visualizer`` (masks, boxes, class names and scores), enlarged for small
images (:func:`draw_scale`).

Weights load strictly (``QueryInstCheckpointer(strict=True)``): a checkpoint of another
config, a backbone-only file, or an unreadable or missing file is a
``queryinst.checkpoint.CheckpointError``. An empty ``MODEL.WEIGHTS`` is allowed (a random
model, e.g. to try the pipeline) with one warning that the model is untrained.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from queryinst.checkpoint import QueryInstCheckpointer
from queryinst.data import model_metadata
from queryinst.export.predictor import ExportedPredictor
from queryinst.video import draw_tracked_frame, use_query_tracker

__all__ = ["DEFAULT_CONFIDENCE_THRESHOLD", "DRAW_SHORT_SIDE", "QueryInstPredictor",
           "VisualizationDemo", "draw_scale"]

logger = logging.getLogger("queryinst.demo")

# Minimum score of a drawn detection in demo/demo.py (Detectron2's demo uses the same).
DEFAULT_CONFIDENCE_THRESHOLD = 0.5
# Small images are drawn enlarged, up to this shorter side (pixels); see draw_scale.
DRAW_SHORT_SIDE = 1024


def draw_scale(height: int, width: int) -> int:
    """Integer factor by which the Visualizer enlarges an image of this size.

    The Visualizer's labels are about 10 px high whatever the image's size, so on a small
    image (a 256x256 microscopy tile) they cover the objects. Images are enlarged by the
    largest integer factor k with k * min(height, width) <= ``DRAW_SHORT_SIDE`` (at least 1):
    256x256 -> 4 (1024x1024), 375x500 -> 2, from a shorter side of 513 px on -> 1 (own size).
    Integer factors keep the pixels sharp (the Visualizer enlarges with nearest neighbour).
    """
    return max(1, DRAW_SHORT_SIDE // max(1, min(height, width)))


class QueryInstPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (``__call__``: BGR image -> ``{"instances": ...}``),
    with the weights loaded by ``QueryInstCheckpointer(strict=True)``.

    ``DefaultPredictor.__init__`` is not called: it would load ``MODEL.WEIGHTS`` with a plain
    ``DetectionCheckpointer`` (no official files, partial loads allowed) and log "No
    checkpoint found" when it is empty. The attributes are the same, plus ``class_names``:
    the names stored in the checkpoint (``train_net.py`` writes them), or None.

    Raises:
        queryinst.checkpoint.CheckpointError: the weights cannot be used (see the module).
    """

    def __init__(self, cfg):  # noqa: the parent's __init__ is replaced, see the docstring
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        self.class_names = None
        if cfg.MODEL.WEIGHTS:
            extra = QueryInstCheckpointer(self.model, strict=True).load(cfg.MODEL.WEIGHTS)
            self.class_names = extra.get("class_names")
        else:
            logger.warning("UNTRAINED MODEL: MODEL.WEIGHTS is empty, the weights are random "
                           "and the detections below mean nothing. Pass a trained "
                           "checkpoint: --opts MODEL.WEIGHTS path/to/model_final.pth")
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        assert self.input_format in ["RGB", "BGR"], self.input_format

    def track(self, image_bgr: np.ndarray) -> Instances:
        """Segment the next frame of a video and extend its tracks (a ``QueryInstVIS``
        model; ``model.start_video()`` starts a video). The input is prepared as
        ``DefaultPredictor.__call__`` prepares it.

        Returns:
            Instances: the frame's tracked detections (``track_ids``), in input pixels.
        """
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        image = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model.track_frame({"image": tensor, "height": height, "width": width})


class VisualizationDemo:
    """Predict on BGR uint8 images and draw the detections scoring >= a threshold.

    Args:
        cfg: a frozen or unfrozen QueryInst config (``MODEL.DEVICE`` chooses the device).
        confidence_threshold: minimum score, in [0, 1], of a drawn / counted detection.
        instance_mode: Detectron2's ``ColorMode`` of the Visualizer.
        tracking: for videos, link the frames' detections into tracks, each drawn in its
            own stable colour with its id (:meth:`run_on_frames`). A ``QueryInstVIS``
            config tracks with its own tracker; an image config with the training-free
            ``QueryCosineTracker`` (``queryinst.video.use_query_tracker``).
        keep_track_masks: with ``tracking``, keep every frame's masks for :meth:`tracks`;
            False frees them after drawing (long streams), and the tracks have no masks.

        exported: instead of ``cfg``'s PyTorch model, an exported ``model.onnx`` /
            ``model.ts`` (``tools/export_model.py``), run by
            ``queryinst.export.predictor.ExportedPredictor``; ``cfg`` is then unused (None)
            and the class names come from the export's ``model.json``. No tracking (the
            tracker needs the model's queries, which the graph does not return).

    Raises:
        queryinst.checkpoint.CheckpointError: ``MODEL.WEIGHTS`` cannot be used (strict load,
            see :class:`QueryInstPredictor`).
        ValueError: ``tracking`` with ``exported``.
        FileNotFoundError: ``exported`` or its ``model.json`` is missing.
    """

    def __init__(self, cfg, confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD,
                 instance_mode: ColorMode = ColorMode.IMAGE, tracking: bool = False,
                 keep_track_masks: bool = True, exported: Optional[str] = None):
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.tracking = tracking
        if exported is not None:
            if tracking:
                raise ValueError("an exported model cannot track (its graph does not return "
                                 "the queries): draw frames on their own (--no-tracking)")
            self.predictor = ExportedPredictor(exported)
            self.metadata = self.predictor.metadata
            return
        self.predictor = QueryInstPredictor(use_query_tracker(cfg) if tracking else cfg)
        # The model's class names: config, checkpoint, else DATASETS.TEST[0]'s metadata.
        self.metadata = model_metadata(cfg, self.predictor.class_names)
        if tracking:
            self.predictor.model.tracker.keep_masks = keep_track_masks

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) at which the model sees an image of this size: the test resize
        (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, Detectron2's ``ResizeShortestEdge``)."""
        aug = self.predictor.aug
        return T.ResizeShortestEdge.get_output_shape(height, width, aug.short_edge_length[0],
                                                     aug.max_size)

    def predict(self, image_bgr: np.ndarray) -> Instances:
        """Detections of one image above the threshold, on the CPU.

        Args:
            image_bgr: uint8 array (H, W, 3), BGR (OpenCV's order).

        Returns:
            Instances of size (H, W): ``pred_boxes`` (pixels of the input), ``scores``,
            ``pred_classes`` and, with masks on, ``pred_masks`` (bool (R, H, W)).
        """
        with torch.no_grad():
            instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]

    def draw(self, image_bgr: np.ndarray, instances: Instances,
             scale: Optional[int] = None) -> np.ndarray:
        """The image with ``instances`` drawn: uint8 BGR array (k*H, k*W, 3).

        Args:
            scale: the enlargement k; None: :func:`draw_scale` (H, W) (1 from a shorter side
                of 513 px on).
        """
        if scale is None:
            scale = draw_scale(*image_bgr.shape[:2])
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, scale=scale,
                                instance_mode=self.instance_mode)
        drawn = visualizer.draw_instance_predictions(predictions=instances).get_image()
        return np.ascontiguousarray(drawn[:, :, ::-1])

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[Instances, np.ndarray]:
        """(detections above the threshold, drawn BGR image); see :meth:`predict`."""
        instances = self.predict(image_bgr)
        return instances, self.draw(image_bgr, instances)

    def run_on_frames(self, frames: Iterable[np.ndarray]
                      ) -> Iterator[Tuple[Instances, np.ndarray]]:
        """:meth:`run_on_image` for each BGR frame of a video, lazily, in order.

        Frames are drawn at their own size (scale 1), the size of the output video. With
        ``tracking``, the frames are one video: its tracks start at the first frame, the
        drawn detections carry ``track_ids`` and :meth:`tracks` gives the whole tracks.
        """
        if not self.tracking:
            for frame in frames:
                instances = self.predict(frame)
                yield instances, self.draw(frame, instances, scale=1)
            return
        self.predictor.model.start_video()
        for frame in frames:
            with torch.no_grad():
                instances = self.predictor.track(frame).to("cpu")
            instances = instances[instances.scores >= self.confidence_threshold]
            drawn = draw_tracked_frame(frame[:, :, ::-1], instances, self.metadata)
            yield instances, np.ascontiguousarray(drawn[:, :, ::-1])

    def tracks(self):
        """list[VideoTrack]: the tracks of the frames given to :meth:`run_on_frames` (with
        ``tracking``), every detection the tracker kept, whatever its score."""
        return self.predictor.model.finish_video()
