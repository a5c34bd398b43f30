"""Image evaluators chosen by a dataset's ``evaluator_type`` (COCO, Cityscapes)."""
from .build import CITYSCAPES_KEY, EVALUATORS_BY_TYPE, CityscapesAPEvaluator, build_image_evaluator

__all__ = ["CITYSCAPES_KEY", "CityscapesAPEvaluator", "EVALUATORS_BY_TYPE", "build_image_evaluator"]
