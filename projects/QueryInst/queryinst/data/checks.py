"""Checks of a config against the datasets it names, run before training and evaluation.

Without them, a mismatch fails deep inside the model or after training: more categories than
``MODEL.QUERYINST.NUM_CLASSES`` gives an ``IndexError`` in the matcher, boxes without masks
with ``MODEL.MASK_ON`` an ``AttributeError`` about ``gt_masks``, and a ``DATASETS.TEST`` of
other classes an ``AssertionError`` in ``COCOEvaluator`` once training has finished, and a
Cityscapes dataset without its files a bare ``AssertionError`` in Detectron2's loader.
"""
from __future__ import annotations

import logging
import math
import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge

from .cityscapes import check_cityscapes_dataset
from .coco_format import DatasetFormatError, _read_json

__all__ = ["DETECTRON2_NUM_CLASSES", "ClassCountError", "check_config_datasets",
           "check_dataset", "check_num_classes_keys", "input_size_note", "keep_for_next_get"]

logger = logging.getLogger(__name__)

DETECTRON2_NUM_CLASSES = 80  # Detectron2's default MODEL.ROI_HEADS.NUM_CLASSES


class ClassCountError(ValueError):
    """The config's class count (or class names) does not fit a dataset or another key;
    the message names both numbers, the dataset or key and the fix. Entry points print it as
    one ``ERROR:`` line."""


def check_num_classes_keys(cfg) -> None:
    """Reject a ``MODEL.ROI_HEADS.NUM_CLASSES`` that QueryInst would silently ignore.

    QueryInst reads its class count from ``MODEL.QUERYINST.NUM_CLASSES`` only. Detectron2's
    ``MODEL.ROI_HEADS.NUM_CLASSES`` may stay at Detectron2's default (80) or equal
    ``MODEL.QUERYINST.NUM_CLASSES``; any other value is an error.

    Also: a non-empty ``MODEL.QUERYINST.CLASS_NAMES`` must have one name per class.

    Raises:
        ClassCountError: naming both keys and values, and the key to set.
    """
    roi, ours = cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.QUERYINST.NUM_CLASSES
    names = cfg.MODEL.QUERYINST.CLASS_NAMES
    if names and len(names) != ours:
        raise ClassCountError(
            f"MODEL.QUERYINST.CLASS_NAMES has {_classes(len(names))} but "
            f"MODEL.QUERYINST.NUM_CLASSES is {ours}: give one name per class, or leave "
            f"CLASS_NAMES empty to take those of DATASETS.TRAIN[0].")
    if roi not in (DETECTRON2_NUM_CLASSES, ours):
        raise ClassCountError(
            f"MODEL.ROI_HEADS.NUM_CLASSES is {roi} but MODEL.QUERYINST.NUM_CLASSES is {ours}: "
            f"QueryInst's class count is MODEL.QUERYINST.NUM_CLASSES (MODEL.ROI_HEADS."
            f"NUM_CLASSES is not read). Set MODEL.QUERYINST.NUM_CLASSES {roi}, and leave "
            f"MODEL.ROI_HEADS.NUM_CLASSES at {DETECTRON2_NUM_CLASSES} or set it equal.")


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def _where(name: str) -> str:
    json_file = MetadataCatalog.get(name).get("json_file", None)
    return f"{json_file} (dataset '{name}')" if json_file else f"dataset '{name}'"


def check_dataset(cfg, name: str, key: str = "DATASETS.TRAIN",
                  keep: Optional[bool] = None) -> Optional[List[dict]]:
    """Check one registered dataset against the model of ``cfg``.

    - its ``thing_classes`` (``MetadataCatalog``; the dataset is loaded with
      ``DatasetCatalog.get`` first when they are not set yet, as for lazily registered COCO
      files) must number ``MODEL.QUERYINST.NUM_CLASSES``;
    - with ``MODEL.MASK_ON``, every annotation must have a "segmentation" (training needs
      the masks, and mask evaluation compares with them).

    The dataset's annotations are loaded here (``DatasetCatalog.get``) when masks are
    checked or the classes are not known yet; with ``keep`` the next ``DatasetCatalog.get``
    (the data loader's) gets these dicts instead of loading again
    (:func:`keep_for_next_get`). A Cityscapes
    instance dataset (metadata ``evaluator_type`` "cityscapes_instance", as Detectron2's
    ``cityscapes_fine_instance_seg_*``) is never loaded here: its files and cityscapesscripts
    are checked instead (:func:`~queryinst.data.cityscapes.check_cityscapes_dataset`), and
    its classes are read from the metadata.

    Args:
        cfg: a config with :func:`queryinst.add_queryinst_config`'s keys.
        name (str): a dataset name, as in ``DATASETS.TRAIN``.
        key (str): the config key that names it, quoted in the messages.
        keep (bool or None): hand the loaded dicts to the next ``DatasetCatalog.get``;
            None: when ``key`` is "DATASETS.TRAIN" (the training loader's load follows).

    Returns:
        list[dict] or None: the dataset dicts loaded here, or None when none were loaded.

    Raises:
        KeyError: ``name`` is not registered.
        ClassCountError: the class counts differ (naming both numbers, the dataset and the
            keys); a ``ValueError``.
        DatasetFormatError: ``MODEL.MASK_ON`` and annotations without "segmentation"
            (naming the json file, the count and the two ways out); for a Cityscapes
            dataset, missing folders or gtFine files.
        MissingPackageError: a Cityscapes dataset and no cityscapesscripts.
    """
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"{key} names dataset '{name}', which is not registered. Register a COCO json and "
            f"its image folder with train_net.py --dataset {name}:JSON:IMAGES (or "
            f"queryinst.data.register_coco_instances_checked); registered: "
            f"{', '.join(sorted(DatasetCatalog.list()))}")
    metadata = MetadataCatalog.get(name)
    dicts = None
    cityscapes = metadata.get("evaluator_type", None) == "cityscapes_instance"
    if cityscapes:
        # Files and package checked instead of loading: Detectron2's Cityscapes loader gives
        # every annotation a "segmentation", and loading its 2975 train images twice costs
        # minutes. The classes come from the metadata (Detectron2 sets its 8).
        check_cityscapes_dataset(name)
    elif cfg.MODEL.MASK_ON or not metadata.get("thing_classes", None):
        dicts = DatasetCatalog.get(name)
        if keep is None:  # the training loader's load follows at once
            keep = key == "DATASETS.TRAIN"
        if keep:
            keep_for_next_get(name, dicts)
    classes = metadata.get("thing_classes", None)
    num_classes = cfg.MODEL.QUERYINST.NUM_CLASSES
    if classes is None:
        logger.warning("Dataset '%s' has no thing_classes in its metadata: its class count "
                       "cannot be checked against MODEL.QUERYINST.NUM_CLASSES.", name)
    elif len(classes) != num_classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        fix = f"Set MODEL.QUERYINST.NUM_CLASSES {len(classes)}."
        if key != "DATASETS.TRAIN":
            fix = (f"Name in {key} a test set with the model's {_classes(num_classes)} (e.g. "
                   f"--dataset my_val:JSON:IMAGES {key} \"('my_val',)\"), or {key} \"()\" "
                   f"to skip evaluation; if the model is meant to have {_classes(len(classes))}, "
                   f"set MODEL.QUERYINST.NUM_CLASSES {len(classes)}.")
        raise ClassCountError(
            f"{_where(name)}, named in {key}, has {_classes(len(classes))} ({shown}) but "
            f"MODEL.QUERYINST.NUM_CLASSES is {num_classes}. {fix} Every dataset of "
            f"DATASETS.TRAIN and DATASETS.TEST must have the model's classes.")
    if cfg.MODEL.MASK_ON and not cityscapes:
        _check_masks(name, dicts)
    return dicts


def keep_for_next_get(name: str, dicts: List[dict]) -> None:
    """Make the next ``DatasetCatalog.get(name)`` return ``dicts`` without loading, and the
    ones after it load again: a dataset checked before training is read once per process,
    not once for the check and once more for the loader (COCO's 118k images: ~20 s each).

    The registered loader function is put back by that next call, which also drops this
    module's reference to ``dicts``.

    Args:
        name: a registered dataset.
        dicts: what ``DatasetCatalog.get(name)`` has just returned.
    """
    loader = DatasetCatalog[name]

    def once():
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        return dicts

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, once)


def _objects(record: dict):
    """The object annotations of an image record, or of every frame of a video record
    (YouTube-VIS loader: "annotations" holds one list per frame)."""
    for ann in record.get("annotations", ()):
        if isinstance(ann, list):
            yield from ann
        else:
            yield ann


def _check_masks(name: str, dicts: List[dict]) -> None:
    total, missing, first = 0, 0, None
    for record in dicts:
        for ann in _objects(record):
            total += 1
            if "segmentation" not in ann:
                missing += 1
                first = first or (f"image {record['file_name']}" if "file_name" in record
                                  else f"video {record.get('video_id')}")
    if missing:
        raise DatasetFormatError(
            f"{_where(name)}: {missing} of {total} annotations have no 'segmentation' (the "
            f"first in {first}), but MODEL.MASK_ON is True: QueryInst learns and "
            f"evaluates instance masks. Add masks (polygons or RLE) to the annotations, or "
            f"set MODEL.MASK_ON False to train and evaluate boxes only.")


def check_config_datasets(cfg, splits: Iterable[str] = ("TRAIN", "TEST"),
                          keep: Iterable[str] = ("TRAIN",)) -> Dict[str, List[Tuple[int, int]]]:
    """Check the config's class keys and every dataset it names, before any training.

    Runs :func:`check_num_classes_keys`, then :func:`check_dataset` on each dataset of
    ``DATASETS.<split>`` for the given splits. Checking ``DATASETS.TEST`` before training
    catches at once what would otherwise fail in the evaluation after the last iteration.
    The datasets of the splits in ``keep`` are read once per process: the next
    ``DatasetCatalog.get`` of each (the loader's) gets the dicts loaded here.

    Args:
        cfg: a config with :func:`queryinst.add_queryinst_config`'s keys.
        splits: "TRAIN" and / or "TEST" (``--eval-only``: "TEST" alone).
        keep: the splits whose loader follows (training: "TRAIN"; ``--eval-only``: "TEST").

    Returns:
        dict: {dataset name: [(height, width) of each image]} of the datasets loaded here
        (the image sizes of their dicts, for :func:`input_size_note` without another read).

    Raises:
        KeyError, ClassCountError, DatasetFormatError: see :func:`check_dataset`.
    """
    check_num_classes_keys(cfg)
    keep = set(keep)
    sizes = {}
    for split in splits:
        for name in cfg.DATASETS[split]:
            dicts = check_dataset(cfg, name, key=f"DATASETS.{split}", keep=split in keep)
            if dicts is not None:
                sizes[name] = [(d["height"], d["width"]) for d in dicts
                               if d.get("height") and d.get("width")]
    return sizes


# How far the test resize may scale a dataset's typical image before train_net.py says so.
# The paper's multi-scale training draws shorter sides from 480 to 800 px (a factor 1.67
# end to end, about 1.3 either way from its middle), so a model sees objects at sizes within
# roughly 1.5x of each other; scaling the images by more than that (e.g. 576 px microscopy
# frames shrunk to the bundled configs' 256 px: 2.25x) changes object sizes beyond what the
# augmentation covers, and small objects lose most of their pixels.
FAR_SCALE = 1.5


def _median_size(names: Iterable[str], image_sizes: Mapping[str, Sequence[Tuple[int, int]]]):
    """(height, width): the median over the images of datasets ``names``, or None without
    any. A dataset's sizes come from ``image_sizes`` (what :func:`check_config_datasets`
    loaded), else from the "images" entries of its COCO json (nothing else is read)."""
    heights, widths = [], []
    for name in names:
        if name in image_sizes:
            sizes = image_sizes[name]
        else:
            json_file = MetadataCatalog.get(name).get("json_file", None)
            images = (_read_json(json_file, lists=("images",), nonempty=())["images"]
                      if json_file else ())
            sizes = [(im["height"], im["width"]) for im in images
                     if isinstance(im, dict) and im.get("height") and im.get("width")]
        heights += [h for h, _ in sizes]
        widths += [w for _, w in sizes]
    if not heights:
        return None
    return int(statistics.median(heights)), int(statistics.median(widths))


def input_size_note(cfg, names: Iterable[str],
                    image_sizes: Optional[Mapping[str, Sequence[Tuple[int, int]]]] = None
                    ) -> Optional[str]:
    """One line when the config's resize scales the median image of datasets ``names`` by
    more than :data:`FAR_SCALE` (either way), in training or at test time; else None.

    The resized size is Detectron2's ``ResizeShortestEdge.get_output_shape`` with
    ``INPUT.MIN_SIZE_TRAIN`` (its choice closest to the image's own size) /
    ``MAX_SIZE_TRAIN`` and ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``.

    Args:
        cfg: the config.
        names: registered COCO-json datasets (``train_net.py --dataset``).
        image_sizes: {name: [(height, width), ...]} already known, as
            :func:`check_config_datasets` returns them; the json of a dataset not in it is
            read (its "images" entries).

    Returns:
        str or None: the median size, the sizes used, the factor and the keys to set.
    """
    names = list(names)
    size = _median_size(names, image_sizes or {})
    if size is None:
        return None
    h, w = size
    inp = cfg.INPUT

    def scaled(short, max_size):
        newh, neww = ResizeShortestEdge.get_output_shape(h, w, short, max_size)
        return newh / h, (newh, neww)

    train = min((scaled(s, inp.MAX_SIZE_TRAIN) for s in inp.MIN_SIZE_TRAIN if s > 0),
                key=lambda r: abs(math.log(r[0])),
                default=(1.0, (h, w)))
    test = scaled(inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST) if inp.MIN_SIZE_TEST > 0 else train
    worst = max(train[0], 1 / train[0], test[0], 1 / test[0])
    if worst <= FAR_SCALE:
        return None
    short, long = min(h, w), max(h, w)
    return (f"the median image of {', '.join(repr(n) for n in names)} is {h}x{w} (HxW), "
            f"resized to {train[1][0]}x{train[1][1]} in training (INPUT.MIN_SIZE_TRAIN "
            f"{tuple(inp.MIN_SIZE_TRAIN)}) and {test[1][0]}x{test[1][1]} at test time "
            f"(INPUT.MIN_SIZE_TEST {inp.MIN_SIZE_TEST}), up to {worst:.2f}x off its own size; "
            f"to keep it: INPUT.MIN_SIZE_TRAIN \"({short},)\" INPUT.MIN_SIZE_TEST {short} "
            f"INPUT.MAX_SIZE_TRAIN {long} INPUT.MAX_SIZE_TEST {long}")
