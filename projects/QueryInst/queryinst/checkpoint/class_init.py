"""Initialise the class-specific rows of a model from a checkpoint trained on other classes.

Fine-tuning a COCO model on Cityscapes (docs/method.md §7) keeps all but the class-specific
tensors of the checkpoint: each stage's classifier (``cls_score``, one row per class) and each
dynamic mask head's logit layer (``predictor``, one output channel per class). Dropping them
throws away what COCO's "person" or "car" rows already know. With
``MODEL.QUERYINST.CLASS_INIT_FROM`` every class of the new model names the checkpoint class
whose rows it starts from; the other classes keep the model's own initialisation (xavier
weights, prior-probability bias, docs/method.md §2.3).
"""
from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from detectron2.data import MetadataCatalog
from torch import Tensor

from .errors import CheckpointError

__all__ = ["CLASS_SPECIFIC_KEY", "ClassInit", "ClassInitError", "class_init_from_config",
           "remap_class_rows"]

logger = logging.getLogger(__name__)

# Model tensors with one row (dim 0) per class: the box stages' classifiers and the mask
# heads' class-specific logit convolutions.
CLASS_SPECIFIC_KEY = re.compile(
    r"^roi_heads\.(box_heads\.\d+\.cls_score|mask_heads\.\d+\.predictor)\.(weight|bias)$")


class ClassInitError(CheckpointError, ValueError):
    """``MODEL.QUERYINST.CLASS_INIT_FROM`` / ``CLASS_INIT_SOURCE`` cannot be applied: the
    message names the key, the offending value and the fix."""


@dataclass(frozen=True)
class ClassInit:
    """Where each class of the model takes its rows from.

    Attributes:
        rows: one entry per model class: the checkpoint's class index, or -1 to keep the
            model's own initialisation.
        source_classes: the checkpoint's class names, in its row order.
        names: ``CLASS_INIT_FROM`` as given: per model class, the checkpoint class name, ""
            where ``rows`` is -1.
    """

    rows: Tuple[int, ...]
    source_classes: Tuple[str, ...]
    names: Tuple[str, ...]


def _source_classes(source: str) -> List[str]:
    if source not in MetadataCatalog.list():
        raise ClassInitError(
            f"MODEL.QUERYINST.CLASS_INIT_SOURCE is {source!r}, which is not a registered "
            f"dataset: name one whose thing_classes are the classes of MODEL.WEIGHTS, e.g. "
            f"'coco_2017_train' for a COCO checkpoint")
    classes = MetadataCatalog.get(source).get("thing_classes", None)
    if not classes:
        raise ClassInitError(
            f"MODEL.QUERYINST.CLASS_INIT_SOURCE {source!r} has no thing_classes in its "
            f"metadata: name a dataset whose thing_classes are the checkpoint's classes")
    return list(classes)


def class_init_from_config(cfg) -> Optional[ClassInit]:
    """Read ``MODEL.QUERYINST.CLASS_INIT_FROM`` and ``CLASS_INIT_SOURCE``.

    Args:
        cfg: a config with :func:`queryinst.add_queryinst_config`'s keys.

    Returns:
        ClassInit, or None when ``CLASS_INIT_FROM`` is empty (the default).

    Raises:
        ClassInitError: ``CLASS_INIT_FROM`` does not have ``NUM_CLASSES`` entries, names a
            class that ``CLASS_INIT_SOURCE``'s thing_classes lack (the closest names are
            suggested), or ``CLASS_INIT_SOURCE`` is not a registered dataset with classes.
    """
    names = tuple(cfg.MODEL.QUERYINST.CLASS_INIT_FROM)
    if not names:
        return None
    num_classes = cfg.MODEL.QUERYINST.NUM_CLASSES
    if len(names) != num_classes:
        raise ClassInitError(
            f"MODEL.QUERYINST.CLASS_INIT_FROM has {len(names)} entries but "
            f"MODEL.QUERYINST.NUM_CLASSES is {num_classes}: give one checkpoint class name "
            f"per class of the model, in the model's class order (\"\" for a class to start "
            f"from random initialisation)")
    source = cfg.MODEL.QUERYINST.CLASS_INIT_SOURCE
    classes = _source_classes(source)
    rows = []
    for i, name in enumerate(names):
        if name and name not in classes:
            close = difflib.get_close_matches(name, classes, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise ClassInitError(
                f"MODEL.QUERYINST.CLASS_INIT_FROM[{i}] is {name!r}, which is not a class of "
                f"MODEL.QUERYINST.CLASS_INIT_SOURCE {source!r}{hint}; use one of its "
                f"thing_classes, or \"\" to start that class from random initialisation")
        rows.append(classes.index(name) if name else -1)
    return ClassInit(tuple(rows), tuple(classes), names)


def remap_class_rows(state: Dict[str, Tensor], model_state: Dict[str, Tensor],
                     init: ClassInit, source: str = "MODEL.WEIGHTS") -> List[str]:
    """Give the class-specific tensors of a checkpoint the model's class rows, in place.

    Every tensor of ``state`` matching :data:`CLASS_SPECIFIC_KEY` whose row count (dim 0)
    differs from the model's is replaced by a copy of the model's tensor (its initialisation)
    in which row ``i`` is the checkpoint's row ``init.rows[i]`` wherever that is >= 0; the
    other dimensions must agree. Tensors that already have the model's shape (a resumed
    run, the same classes) are left as they are.

    Args:
        state: checkpoint tensors by model key, e.g. ``roi_heads.box_heads.0.cls_score.weight``
            float32 (C_src, D); changed in place.
        model_state: the model's ``state_dict()`` (C, D) etc.; not changed.
        init: from :func:`class_init_from_config`.
        source: the file, for messages.

    Returns:
        list[str]: the keys that were remapped (empty when the class counts agree).

    Raises:
        ClassInitError: a class-specific tensor has neither the model's row count nor
            ``len(init.source_classes)`` rows, or other dimensions that differ.
    """
    remapped = []
    for key, value in state.items():
        target = model_state.get(key)
        if (not CLASS_SPECIFIC_KEY.match(key) or target is None
                or value.shape[0] == target.shape[0]):
            continue
        if value.shape[0] != len(init.source_classes) or value.shape[1:] != target.shape[1:]:
            raise ClassInitError(
                f"{source}: {key} has shape {tuple(value.shape)} (the model's: "
                f"{tuple(target.shape)}), but MODEL.QUERYINST.CLASS_INIT_SOURCE has "
                f"{len(init.source_classes)} classes: name in CLASS_INIT_SOURCE a dataset "
                f"with the checkpoint's classes, or set MODEL.QUERYINST.CLASS_INIT_FROM \"()\" "
                f"to start the class-specific layers from random initialisation")
        new = target.detach().clone().to(value.dtype)
        for i, row in enumerate(init.rows):
            if row >= 0:
                new[i] = value[row]
        state[key] = new
        remapped.append(key)
    if remapped:
        pairs = ", ".join(f"{i}<-{name or 'init'}" for i, name in enumerate(init.names))
        logger.info("Initialised the class rows of %d class-specific tensors of %s from its "
                    "classes (model class <- checkpoint class): %s", len(remapped), source,
                    pairs)
    return remapped
