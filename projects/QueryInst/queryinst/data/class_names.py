"""The class names of a model: recorded at training, found again by the demo and the export.

``train_net.py`` writes the names of ``DATASETS.TRAIN[0]`` into
``MODEL.QUERYINST.CLASS_NAMES`` (so ``OUTPUT_DIR/config.yaml`` has them) and into every
checkpoint (key "class_names"). ``demo/demo.py`` and ``tools/export_model.py`` take them from
there, so a model trained on a dataset registered only in ``train_net.py --dataset`` still
draws "cell", not "0".
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from .coco_format import _read_json

__all__ = ["dataset_class_names", "model_metadata", "record_class_names"]

logger = logging.getLogger(__name__)


def dataset_class_names(name: str) -> Optional[List[str]]:
    """``thing_classes`` of a registered dataset, without loading its images.

    A COCO json registered lazily (``train_net.py --dataset``,
    ``register_coco_instances_checked``) has no ``thing_classes`` until it is loaded; its
    "categories" are then read from the json, ordered by id as Detectron2's
    ``load_coco_json`` orders them.

    Returns:
        list[str] or None: None for an unknown dataset or one without class names.

    Raises:
        DatasetFormatError: the json file cannot be read.
    """
    if name not in DatasetCatalog.list() and name not in MetadataCatalog.list():
        return None
    metadata = MetadataCatalog.get(name)
    classes = metadata.get("thing_classes", None)
    if classes is None and metadata.get("json_file", None):
        data = _read_json(metadata.json_file, lists=("categories",), nonempty=())
        classes = [str(c.get("name")) for c in sorted(data["categories"],
                                                       key=lambda c: c.get("id", 0))]
    return list(classes) if classes else None


def record_class_names(cfg) -> None:
    """Fill an empty ``MODEL.QUERYINST.CLASS_NAMES`` of a training config with the names of
    ``DATASETS.TRAIN[0]`` (when they number ``MODEL.QUERYINST.NUM_CLASSES``), in place.

    Args:
        cfg: an unfrozen config with QueryInst's keys.
    """
    if cfg.MODEL.QUERYINST.CLASS_NAMES or not len(cfg.DATASETS.TRAIN):
        return
    names = dataset_class_names(cfg.DATASETS.TRAIN[0])
    if names and len(names) == cfg.MODEL.QUERYINST.NUM_CLASSES:
        cfg.MODEL.QUERYINST.CLASS_NAMES = tuple(names)


def model_metadata(cfg, checkpoint_names: Optional[Sequence[str]] = None) -> Metadata:
    """Metadata to draw and name a model's classes with (``thing_classes``).

    The first source with ``MODEL.QUERYINST.NUM_CLASSES`` names wins: the config's
    ``MODEL.QUERYINST.CLASS_NAMES``, the names stored in the checkpoint
    (``checkpoint_names``), then the metadata of ``DATASETS.TEST[0]`` (a registered dataset,
    e.g. by ``--dataset``; once loaded, its own metadata object, thing_colors included).
    Without any, one warning line: the labels show class indices.

    Args:
        cfg: a config with QueryInst's keys.
        checkpoint_names: the "class_names" of the loaded ``MODEL.WEIGHTS``, or None.

    Returns:
        Metadata: with ``thing_classes``, or none when no source has them.
    """
    count = cfg.MODEL.QUERYINST.NUM_CLASSES
    for names in (cfg.MODEL.QUERYINST.CLASS_NAMES, checkpoint_names):
        if names and len(names) == count:
            return Metadata(name="model", thing_classes=list(names))
    test = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    names = dataset_class_names(test) if test else None
    if names and len(names) == count:
        metadata = MetadataCatalog.get(test)
        if metadata.get("thing_classes", None) is not None:
            return metadata
        return Metadata(name=test, thing_classes=names)
    weights = (f"{os.path.basename(cfg.MODEL.WEIGHTS)} has none" if cfg.MODEL.WEIGHTS
               else "MODEL.WEIGHTS is empty")
    found = (f"'{test}' has {len(names)} for {count}" if names
             else f"'{test}' has none" if test else "is not set")
    logger.warning(
        "The model has no class names (MODEL.QUERYINST.CLASS_NAMES is empty, %s, "
        "DATASETS.TEST[0] %s): labels show class indices. Set MODEL.QUERYINST.CLASS_NAMES "
        "\"('name', ...)\" or register the test set with --dataset NAME:JSON:IMAGES.",
        weights, found)
    return Metadata(name="model")
