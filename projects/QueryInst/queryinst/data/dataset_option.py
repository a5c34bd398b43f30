"""``train_net.py --dataset NAME:JSON:IMAGES``: register COCO-format datasets from the command line.

Each option registers one dataset, under NAME, with :func:`register_coco_instances_checked`
(validated when first loaded); the config then names it like any Detectron2 dataset::

    python train_net.py --config-file ... \\
        --dataset my_train:data/train.json:data/images \\
        --dataset my_val:data/val.json:data/images \\
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)" MODEL.QUERYINST.NUM_CLASSES 3
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, NamedTuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco_format import register_coco_instances_checked

__all__ = ["DatasetSpec", "add_dataset_argument", "parse_dataset_spec", "register_dataset_specs"]


class DatasetSpec(NamedTuple):
    """One ``--dataset`` value: the dataset name and absolute paths of its json and images."""

    name: str
    json_file: str
    image_root: str


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse ``NAME:JSON:IMAGES`` (an argparse ``type``).

    Args:
        text (str): dataset name, COCO instances json file and image folder, joined by ":"
            (so none of the three may contain ":").

    Returns:
        DatasetSpec: with the paths made absolute.

    Raises:
        argparse.ArgumentTypeError: not three non-empty parts, the json file is not a file,
            or the image folder is not a folder.
    """
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME:JSON:IMAGES (a dataset name, a COCO json file and an "
            f"image folder joined by ':'), e.g. my_train:data/train.json:data/images")
    name, json_file, image_root = parts
    if not os.path.isfile(json_file):
        raise argparse.ArgumentTypeError(f"{text!r}: annotation file {json_file} does not exist")
    if not os.path.isdir(image_root):
        raise argparse.ArgumentTypeError(f"{text!r}: image folder {image_root} does not exist")
    return DatasetSpec(name, os.path.abspath(json_file), os.path.abspath(image_root))


def add_dataset_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the repeatable ``--dataset NAME:JSON:IMAGES`` option (``args.dataset``: a list of
    :class:`DatasetSpec`, empty by default) to a parser, e.g. ``default_argument_parser()``.
    Returns the parser."""
    parser.add_argument(
        "--dataset", action="append", default=[], type=parse_dataset_spec,
        metavar="NAME:JSON:IMAGES",
        help="register a COCO instances json and its image folder as dataset NAME (repeatable);"
             " then name it in DATASETS.TRAIN / DATASETS.TEST and set "
             "MODEL.QUERYINST.NUM_CLASSES to its number of categories")
    parser.add_argument(
        "--verify-images", action="store_true",
        help="when loading --dataset datasets, also open every image with PIL (header, size "
             "against the json); without it only the files' existence is checked")
    return parser


def register_dataset_specs(specs: Iterable[DatasetSpec], verify_images: bool = False) -> None:
    """Register each spec with :func:`register_coco_instances_checked` (no IO until loaded;
    ``verify_images``: PIL opens every image then, ``--verify-images``).

    A name already registered with the same json file and image folder is left as it is (a
    second ``main`` in the same process); with other files, or a name of another dataset
    (e.g. a bundled one), it is an error.

    Raises:
        ValueError: the name is taken by another dataset.
    """
    for spec in specs:
        if spec.name in DatasetCatalog.list():
            meta = MetadataCatalog.get(spec.name)
            if (meta.get("json_file", None), meta.get("image_root", None)) == spec[1:]:
                continue
            raise ValueError(
                f"--dataset {spec.name}:...: the name '{spec.name}' is already registered "
                f"(json_file {meta.get('json_file', None)}); choose another name")
        register_coco_instances_checked(spec.name, {}, spec.json_file, spec.image_root,
                                        verify_images=verify_images)
