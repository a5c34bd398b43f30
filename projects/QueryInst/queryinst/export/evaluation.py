"""COCO AP of an exported graph (float32 or int8) on a registered dataset, measured as
``train_net.py --eval-only`` measures the PyTorch model: Detectron2's ``COCOEvaluator`` with
``max_dets_per_image`` = ``TEST.DETECTIONS_PER_IMAGE`` (``queryinst/evaluation/build.py``),
fed the :class:`~queryinst.export.predictor.ExportedPredictor`'s ``Instances`` in
original-image pixels."""
from __future__ import annotations

from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator

from ..data import read_image
from .predictor import ExportedPredictor

__all__ = ["evaluate_exported"]


def evaluate_exported(predictor: ExportedPredictor, dataset_name: str,
                      output_dir: str) -> dict:
    """Run ``predictor`` on every image of ``dataset_name`` and evaluate.

    Args:
        predictor: the exported graph.
        dataset_name: a registered COCO-style image dataset (e.g. ``nuclei_dsb_val``).
        output_dir: where ``COCOEvaluator`` writes its COCO json and predictions.

    Returns:
        dict: ``COCOEvaluator.evaluate()``'s results, e.g. ``{"bbox": {"AP": ...},
        "segm": {"AP": ...}}`` in percent.
    """
    max_dets_per_image = predictor.info.get("detections_per_image", 100)
    tasks = ("bbox", "segm") if "pred_masks" in predictor.output_names else ("bbox",)
    evaluator = COCOEvaluator(dataset_name, tasks=tasks, distributed=False,
                              output_dir=output_dir, max_dets_per_image=max_dets_per_image)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset_name):
        image = read_image(record["file_name"], format="BGR")
        outputs = predictor(image)
        evaluator.process([{"image_id": record["image_id"], "file_name": record["file_name"],
                            "height": record["height"], "width": record["width"]}], [outputs])
    return evaluator.evaluate()
