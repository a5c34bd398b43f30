"""Evaluators of image datasets: COCO AP for all, plus the Cityscapes benchmark's own AP.

``build_image_evaluator`` picks by the dataset's ``evaluator_type`` (Detectron2 metadata):
Cityscapes datasets (Detectron2's ``cityscapes_fine_instance_seg_*``) get Detectron2's
``CityscapesInstanceEvaluator`` (cityscapesscripts' official instance-level AP) beside COCO
AP; every other image dataset gets COCO AP. Video datasets are evaluated by
``queryinst.video.YTVISEvaluator`` instead.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
)

__all__ = ["CITYSCAPES_KEY", "CityscapesAPEvaluator", "EVALUATORS_BY_TYPE",
           "build_image_evaluator"]

# Key of the Cityscapes results, beside COCOEvaluator's "bbox" and "segm".
CITYSCAPES_KEY = "cityscapes"


class CityscapesAPEvaluator(CityscapesInstanceEvaluator):
    """Detectron2's ``CityscapesInstanceEvaluator`` with its results under
    :data:`CITYSCAPES_KEY` (``{"cityscapes": {"AP": ..., "AP50": ...}}``, percent), so that
    it can run beside ``COCOEvaluator``, whose mask AP is also called "segm"
    (``DatasetEvaluators`` refuses two evaluators with the same key).

    Inputs as Detectron2's: ``outputs[i]["instances"]`` with ``pred_masks`` bool (H, W) in
    original-image pixels, ``pred_classes`` int64, ``scores`` float32. Needs the dataset's
    ``gt_dir`` metadata and the ``cityscapesscripts`` package.
    """

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Run cityscapesscripts' instance-level evaluation (main process; None elsewhere)."""
        results = super().evaluate()
        if results is None:  # not the main process
            return None
        return OrderedDict([(CITYSCAPES_KEY, results["segm"])])


def _coco(cfg, dataset_name: str, output_folder: str) -> COCOEvaluator:
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder,
                         max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)


def _cityscapes(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluator:
    if not cfg.MODEL.MASK_ON:  # the Cityscapes benchmark scores masks only
        return _coco(cfg, dataset_name, output_folder)
    return DatasetEvaluators([CityscapesAPEvaluator(dataset_name),
                              _coco(cfg, dataset_name, output_folder)])


# evaluator_type (Detectron2 dataset metadata) -> builder(cfg, dataset_name, output_folder).
EVALUATORS_BY_TYPE: Dict[str, Callable[..., DatasetEvaluator]] = {
    "coco": _coco,
    "cityscapes_instance": _cityscapes,
}


def build_image_evaluator(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluator:
    """The evaluator of an image dataset, chosen by its ``evaluator_type`` metadata.

    Args:
        cfg: the config (``MODEL.MASK_ON``, ``TEST.DETECTIONS_PER_IMAGE``).
        dataset_name (str): a registered dataset.
        output_folder (str): where ``COCOEvaluator`` writes its json files.

    Returns:
        DatasetEvaluator: ``COCOEvaluator`` (box AP, and mask AP with ``MODEL.MASK_ON``;
        results ``{"bbox": ..., "segm": ...}``), for ``evaluator_type``
        "cityscapes_instance" together with :class:`CityscapesAPEvaluator` (results also
        hold ``{"cityscapes": {"AP", "AP50"}}``). Types without an entry in
        :data:`EVALUATORS_BY_TYPE` get COCO AP.
    """
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    return EVALUATORS_BY_TYPE.get(kind, _coco)(cfg, dataset_name, output_folder)
