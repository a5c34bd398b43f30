"""Image evaluators chosen by a dataset's ``evaluator_type`` (COCO, Cityscapes)."""
from .build import CITYSCAPES_KEY, EVALUATORS_BY_TYPE, CityscapesAPEvaluator, build_image_evaluator

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
