"""Evaluators of image datasets: COCO AP for all, plus the Cityscapes benchmark's own AP.

``build_image_evaluator`` picks by the dataset's ``evaluator_type`` (Detectron2 metadata):
Cityscapes datasets (Detectron2's ``cityscapes_fine_instance_seg_*``) get Detectron2's
``CityscapesInstanceEvaluator`` (cityscapesscripts' official instance-level AP) beside COCO
AP; every other image dataset gets COCO AP. Video datasets are evaluated by
``queryinst.video.YTVISEvaluator`` instead.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import types
from collections import OrderedDict
from typing import Callable, Dict

import numpy as np
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


class _NumpyForCityscapesEval(types.ModuleType):
    """numpy as cityscapesscripts' instance evaluation (2.3.0) needs it: with ``in1d``, which
    NumPy 2.4 removed, and a ``cumsum`` whose last element exists for an empty input."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique=False, invert=False):
        """``numpy.in1d``: ``isin`` of the flattened ``ar1``, as NumPy defined it."""
        return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)

    @staticmethod
    def cumsum(a, *args, **kwargs):
        """``numpy.cumsum``, but ``[0]`` for an empty input (the sum of nothing).

        cityscapesscripts reads ``cumsum(y_true)[-1]`` as the number of true positives of a
        class; when the class has ground truth and predictions but every prediction was set
        aside (mostly on void or crowd pixels) and none matched, ``y_true`` is empty and the
        whole evaluation stops with an IndexError (mcordts/cityscapesScripts issue #89). With
        ``[0]`` the class gets AP 0, as its code gives a class with ground truth and no
        predictions.
        """
        out = np.cumsum(a, *args, **kwargs)
        return out if out.size else np.zeros(1, dtype=out.dtype)


@contextlib.contextmanager
def _cityscapes_evaluation_numpy2(json_dir: str):
    """Run cityscapesscripts' instance evaluation (2.3.0) with NumPy 2, then undo every change.

    Two incompatibilities, both in ``evalInstanceLevelSemanticLabeling``, are patched in that
    module's namespace only: ``np.in1d`` (removed in NumPy 2.4) and ``writeDict2JSON``,
    which cannot serialise the NumPy integers that ``np.count_nonzero`` returns under NumPy 2.
    One bug is patched there too: its crash on a class whose predictions were all set aside
    (:meth:`_NumpyForCityscapesEval.cumsum`).
    The patched writer puts relative paths (the evaluation's "matches.json", which nothing
    reads) under ``json_dir`` instead of the working directory. The module-global ``args``
    that Detectron2 sets are restored on exit as well.

    Without it, with cityscapesscripts 2.3.0 (the latest) and NumPy >= 2.4, Detectron2's
    evaluator fails in ``evaluate``: ``AttributeError: module 'numpy' has no attribute
    'in1d'``, then (with ``in1d`` back) ``'numpy.int64' object has no attribute
    '__dict__'`` while writing "matches.json" into the working directory.
    """
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    def write_json(data, file_name):
        path = os.path.join(json_dir, file_name)  # unchanged when file_name is absolute
        with open(path, "w") as f:
            json.dump(data, f, sort_keys=True, indent=4, default=lambda o: (
                o.item() if isinstance(o, np.generic) else o.__dict__))

    saved = cs_eval.np, cs_eval.writeDict2JSON, copy.copy(vars(cs_eval.args))
    cs_eval.np, cs_eval.writeDict2JSON = _NumpyForCityscapesEval("numpy"), write_json
    try:
        yield
    finally:
        cs_eval.np, cs_eval.writeDict2JSON = saved[:2]
        vars(cs_eval.args).clear()
        vars(cs_eval.args).update(saved[2])


class CityscapesAPEvaluator(CityscapesInstanceEvaluator):
    """Detectron2's ``CityscapesInstanceEvaluator`` (cityscapesscripts' own metric; docs/method.md
    §7.4), runnable with NumPy 2 (:func:`_cityscapes_evaluation_numpy2`), with its results
    under :data:`CITYSCAPES_KEY` so that it can run beside ``COCOEvaluator``, whose mask AP
    is also called "segm" (``DatasetEvaluators`` refuses two evaluators with one key).

    Inputs as Detectron2's: ``outputs[i]["instances"]`` with ``pred_masks`` bool (H, W) in
    original-image pixels, ``pred_classes`` int64, ``scores`` float32. Needs the dataset's
    ``gt_dir`` and ``thing_classes`` metadata and the ``cityscapesscripts`` package.
    """

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """Run cityscapesscripts' instance-level evaluation on the whole split.

        Returns:
            ``{"cityscapes": {"AP": ..., "AP50": ...}}`` in percent on the main process (None
            on the others): AP averaged over the IoUs 0.5:0.95:0.05 and over the classes
            that have ground truth or predictions in the split (the others are NaN and left
            out).
        """
        with _cityscapes_evaluation_numpy2(self._temp_dir):
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
