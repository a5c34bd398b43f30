"""Cityscapes instance segmentation on disk: a small real sample, and a check of the layout.

Detectron2 registers the Cityscapes splits itself (``cityscapes_fine_instance_seg_{train,val,
test}``, metadata ``image_dir``, ``gt_dir``, ``evaluator_type="cityscapes_instance"``; the paths
are under ``$DETECTRON2_DATASETS``, read when Detectron2 is imported) and reads them with
``load_cityscapes_instances``. This module adds:

- :func:`write_cityscapes_sample`: labelme's 5 real street frames (the frames of the
  ``labelme_video_example`` video set, read from the labelme sdist) written in the Cityscapes
  layout, the ``gtFine`` label images made from the polygons by cityscapesscripts' own
  converters. ``DETECTRON2_DATASETS=<root>`` then makes Detectron2's built-in Cityscapes
  datasets read it.
- :func:`check_cityscapes_dataset`: the files and the package that Detectron2's loader and
  evaluator need, reported by name and path. Without it, a wrong ``DETECTRON2_DATASETS`` gives
  a bare ``AssertionError`` or a ``FileNotFoundError`` inside a multiprocessing pool, and a
  missing cityscapesscripts a ``ModuleNotFoundError`` after all images were read.

Layout (Cityscapes' own, as unpacked from leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip)::

    <root>/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_{instanceIds.png,
                                                                     labelIds.png,polygons.json}
"""
from __future__ import annotations

import importlib
import io
import math
import os
import shutil
import tempfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from . import bundled_sources as src
from .builtin import write_converted_folder
from .coco_format import DatasetFormatError

__all__ = ["CITYSCAPES_SAMPLE_CITY", "CITYSCAPES_SAMPLE_SPLITS", "LABELME_TO_CITYSCAPES",
           "MissingPackageError", "check_cityscapes_dataset", "cityscapes_gt_files",
           "labelme_to_cityscapes_json", "write_cityscapes_sample"]

CITYSCAPES_SAMPLE_CITY = "labelme"  # no "_": cityscapesscripts splits file names on it
# labelme frame number -> split. The frames are consecutive (a parked car and a truck that
# barely moves): train and val overlap in content, the sample is for format and smoke tests.
CITYSCAPES_SAMPLE_SPLITS: Dict[str, Tuple[int, ...]] = {"train": (100, 101, 102),
                                                        "val": (103, 104)}
LABELME_TO_CITYSCAPES = {"track": "truck", "car": "car"}  # "track" is labelme's spelling

_IMAGE_SUFFIX = "_leftImg8bit.png"
_GT_SUFFIXES = ("_gtFine_instanceIds.png", "_gtFine_labelIds.png", "_gtFine_polygons.json")
_DOWNLOADS = ("leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
              "https://www.cityscapes-dataset.com/downloads/")
_SAMPLE_HINT = ("for the 5-image sample, run tools/prepare_datasets.py and use "
                "DETECTRON2_DATASETS=datasets/cityscapes_sample")


def labelme_to_cityscapes_json(labelme: dict) -> dict:
    """Convert one labelme annotation into Cityscapes' ``gtFine_polygons.json`` format.

    Cityscapes stores integer pixel coordinates (x, y), 0 <= x < imgWidth, 0 <= y < imgHeight;
    both cityscapesscripts (``PIL.ImageDraw.polygon``) and labelme (``labelme.utils.
    shape_to_mask``, also ``ImageDraw.polygon``) read a vertex at pixel (x, y)'s centre. So
    each labelme coordinate is rounded to the nearest integer, halves up (``floor(v + 0.5)``),
    then clipped into the image (labelme's 1000 on a 1000 px wide frame becomes 999): every
    vertex moves by at most 0.5 px, plus the clipping at the border.

    Args:
        labelme (dict): labelme json (``imageHeight``, ``imageWidth``, ``shapes`` of polygons
            labelled as in :data:`LABELME_TO_CITYSCAPES`).

    Returns:
        dict: ``{"imgHeight": H, "imgWidth": W, "objects": [{"label", "polygon"}]}``, one
        object per shape in labelme's order (cityscapesscripts draws them in this order, a
        later one over an earlier one); "polygon" is a list of [x, y] ints.

    Raises:
        ValueError: a shape is not a polygon of >= 3 points, or its label has no Cityscapes
            name in :data:`LABELME_TO_CITYSCAPES`.
    """
    height, width = labelme["imageHeight"], labelme["imageWidth"]
    objects = []
    for index, shape in enumerate(labelme["shapes"]):
        if shape.get("shape_type", "polygon") != "polygon" or len(shape["points"]) < 3:
            raise ValueError(f"shape {index} is not a polygon of >= 3 points")
        if shape["label"] not in LABELME_TO_CITYSCAPES:
            raise ValueError(f"shape {index}: label {shape['label']!r} has no Cityscapes name "
                             f"(known: {LABELME_TO_CITYSCAPES})")
        polygon = [[min(max(math.floor(x + 0.5), 0), width - 1),
                    min(max(math.floor(y + 0.5), 0), height - 1)] for x, y in shape["points"]]
        objects.append({"label": LABELME_TO_CITYSCAPES[shape["label"]], "polygon": polygon})
    return {"imgHeight": height, "imgWidth": width, "objects": objects}


def _stem(frame: int) -> str:
    return f"{CITYSCAPES_SAMPLE_CITY}_000000_{frame:06d}"


_README = """# cityscapes_sample (generated by QueryInst; do not edit)

A 5-image dataset in the Cityscapes layout, for format and smoke tests (too small to train):
`DETECTRON2_DATASETS=<this folder's parent>` makes Detectron2's cityscapes_fine_instance_seg_train
/ _val read it.

Conversion: labelme's video annotation example ({source}): 5 consecutive real frames of a
street (1000x563), 3 polygons each. Frames 00000100..00000104 become city "{city}", sequence
000000, frame 000100..000104. Images: the JPEG pixels written as 8-bit RGB PNG
(leftImg8bit). Polygons: labels mapped to Cityscapes names ({mapping}; "track" is labelme's
label for the truck, split by a tree into two shapes: cab and load bed), coordinates rounded
to the nearest integer pixel (halves up) and clipped into the image, as Cityscapes stores
them (gtFine_polygons.json). gtFine_instanceIds.png and gtFine_labelIds.png were drawn from
that json by cityscapesscripts ("ids" encoding): json2labelImg, and json2instanceImg's
createInstanceImage, its 32-bit image saved as 16-bit PNG (as Cityscapes' own; Pillow 13
no longer writes 32-bit PNGs). Only the 3 objects are annotated: every other pixel is
"unlabeled" (id 0), unlike real Cityscapes, which labels every pixel.

Split: train = frames {train}, val = frames {val} (consecutive frames of one clip: the
splits overlap in content).

Source: {source}.
License: labelme code GPL-3.0-only (the sdist's LICENSE and PKG-INFO); the sdist states no
separate licence or origin for the example frames, which ship inside that package.
"""


def _sample_files(labelme_jsons: Sequence[dict], frames: Sequence[bytes],
                  frame_names: Sequence[str]) -> Tuple[Dict[str, bytes], Dict[str, dict]]:
    """(images, polygon jsons), keyed by their path under ``cityscapes/``."""
    split_of = {frame: split for split, nums in CITYSCAPES_SAMPLE_SPLITS.items()
                for frame in nums}
    images, jsons = {}, {}
    for name, labelme, data in zip(frame_names, labelme_jsons, frames):
        split, stem = split_of[int(name)], _stem(int(name))
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (labelme["imageWidth"], labelme["imageHeight"]):
            raise DatasetFormatError(f"labelme frame {name} is {image.size}, its json says "
                                     f"{(labelme['imageWidth'], labelme['imageHeight'])}")
        png = io.BytesIO()
        image.save(png, format="PNG")
        city = os.path.join(split, CITYSCAPES_SAMPLE_CITY)
        images[os.path.join("leftImg8bit", city, stem + _IMAGE_SUFFIX)] = png.getvalue()
        jsons[os.path.join("gtFine", city, stem + _GT_SUFFIXES[2])] = \
            labelme_to_cityscapes_json(labelme)
    return images, jsons


def write_cityscapes_sample(root: str) -> dict:
    """Write labelme's 5 street frames as a Cityscapes dataset under ``root/cityscapes/``.

    The source is the labelme sdist's ``examples/video_annotation/data_annotated`` (read
    from the package cache, downloaded once; the same files as the ``labelme_video_example``
    video set). Images become ``leftImg8bit`` PNGs (1000x563, uint8 RGB), the polygons
    ``gtFine_polygons.json`` (:func:`labelme_to_cityscapes_json`), and cityscapesscripts
    draws ``gtFine_instanceIds.png`` (16-bit: class id * 1000 + instance index, car 26000,
    truck 27000 and 27001; 0 elsewhere) and ``gtFine_labelIds.png`` (8-bit class ids) from
    each json.
    Splits: :data:`CITYSCAPES_SAMPLE_SPLITS`; a README.md in ``cityscapes/`` gives source
    and licence.

    The tree is built in a hidden temporary folder of ``root`` and renamed to
    ``root/cityscapes`` when complete, so ``cityscapes/`` exists only complete. When it
    exists already, nothing is written and its files are only checked.

    Args:
        root (str): the folder to hold ``cityscapes/`` (the value for ``DETECTRON2_DATASETS``).

    Returns:
        dict: ``{"train": 3, "val": 2, "root": root}`` (images per split, root as given,
        user-expanded).

    Raises:
        PackageFetchError: the labelme sdist could not be downloaded.
        MissingPackageError: cityscapesscripts is not installed.
        DatasetFormatError: an existing ``root/cityscapes`` lacks files of the sample (the
            message names the first and how to rebuild).
    """
    root = os.path.expanduser(root)
    final = os.path.join(root, "cityscapes")
    if not os.path.isdir(final):
        _require_cityscapesscripts("building the Cityscapes sample")
        from cityscapesscripts.preparation.json2labelImg import json2labelImg

        from ..video.data.builtin import LABELME_VIDEO_DIR, fetch_labelme_video_source

        source = fetch_labelme_video_source()
        images, jsons = _sample_files(source["labelme_jsons"], source["frames"],
                                      source["frame_names"])
        readme = _README.format(
            source=f"{src.LABELME} sdist, {LABELME_VIDEO_DIR}/data_annotated",
            city=CITYSCAPES_SAMPLE_CITY,
            mapping=", ".join(f"{a} -> {b}" for a, b in LABELME_TO_CITYSCAPES.items()),
            **{split: ", ".join(map(str, frames))
               for split, frames in CITYSCAPES_SAMPLE_SPLITS.items()})
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".cityscapes-", dir=root)
        try:
            write_converted_folder(tmp, images, readme, jsons)
            for path in jsons:
                base = os.path.join(tmp, path)[: -len(_GT_SUFFIXES[2])]
                _json2instance_png(base + _GT_SUFFIXES[2], base + _GT_SUFFIXES[0])
                json2labelImg(base + _GT_SUFFIXES[2], base + _GT_SUFFIXES[1], "ids")
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):  # else: another process built it meanwhile
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    counts = {}
    for split, frames in CITYSCAPES_SAMPLE_SPLITS.items():
        image_dir = os.path.join(final, "leftImg8bit", split)
        expected = {os.path.join(image_dir, CITYSCAPES_SAMPLE_CITY, _stem(f) + _IMAGE_SUFFIX)
                    for f in frames}
        found = _scan(image_dir, os.path.join(final, "gtFine", split),
                      f"cityscapes_sample {split}") if os.path.isdir(image_dir) else {}
        wrong = sorted(expected ^ set(found)) + _missing_gt(found)
        if wrong:
            raise DatasetFormatError(
                f"{final} is not the Cityscapes sample as built: {wrong[0]} is "
                f"{'not expected' if wrong[0] in found else 'missing'} ({len(wrong)} files "
                f"differ in all). Delete {final} and run tools/prepare_datasets.py again to "
                "rebuild it.")
        counts[split] = len(found)
    return {**counts, "root": root}


def _json2instance_png(json_file: str, png_file: str) -> None:
    """cityscapesscripts' ``json2instanceImg(json_file, png_file, "ids")``, saved as 16-bit.

    Its ``createInstanceImage`` draws the polygons into a 32-bit ("I") image, which
    ``json2instanceImg`` saves as PNG; Pillow >= 13 can no longer write "I" images as PNG
    ("cannot write mode I as PNG"). The ids (at most 33999) fit in 16 bits, the depth of
    Cityscapes' own instanceIds PNGs, so the same image is written as uint16.
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2instanceImg import createInstanceImage

    annotation = Annotation()
    annotation.fromJsonFile(json_file)
    ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int64)
    if ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{json_file}: instance ids {ids.min()}..{ids.max()} do not fit 16 bits")
    Image.fromarray(ids.astype(np.uint16)).save(png_file)


def cityscapes_gt_files(image_file: str, gt_dir: str) -> Tuple[str, str, str]:
    """The gtFine files of a Cityscapes image, as Detectron2's loader looks for them.

    Args:
        image_file (str): ``<image_dir>/<city>/<stem>_leftImg8bit.png``.
        gt_dir (str): the split's gtFine folder.

    Returns:
        tuple: ``<gt_dir>/<city>/<stem>_gtFine_instanceIds.png``, ``..._labelIds.png``,
        ``..._polygons.json``.
    """
    city = os.path.basename(os.path.dirname(image_file))
    stem = os.path.basename(image_file)[: -len(_IMAGE_SUFFIX)]
    return tuple(os.path.join(gt_dir, city, stem + suffix) for suffix in _GT_SUFFIXES)


def _scan(image_dir: str, gt_dir: str, what: str) -> Dict[str, Tuple[str, str, str]]:
    """image file -> its gtFine files, for every ``<city>/*_leftImg8bit.png`` of image_dir.

    Raises DatasetFormatError for entries that Detectron2's loader would stop at with a bare
    assert: a file directly in ``image_dir``, or a file in a city folder not named
    ``*_leftImg8bit.png``.
    """
    found = {}
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            raise DatasetFormatError(
                f"{what}: {city_dir} is a file, but Detectron2's Cityscapes loader reads every "
                f"entry of {image_dir} as a city folder. Move it out of {image_dir}.")
        for name in sorted(os.listdir(city_dir)):
            path = os.path.join(city_dir, name)
            if not name.endswith(_IMAGE_SUFFIX):
                raise DatasetFormatError(
                    f"{what}: {path} is not named <city>_<seq>_<frame>{_IMAGE_SUFFIX}, but "
                    f"Detectron2's Cityscapes loader reads every file of {city_dir} as an "
                    "image. Move it out of the city folder.")
            found[path] = cityscapes_gt_files(path, gt_dir)
    return found


class MissingPackageError(ModuleNotFoundError):
    """A package that a feature needs is not installed; the message names the package, what
    needs it and the command that installs it. Programs print it as one line."""


def _require_cityscapesscripts(purpose: str) -> None:
    """Raise MissingPackageError naming the package and the fix when it cannot be imported."""
    for module in ("cityscapesscripts.helpers.labels",
                   "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise MissingPackageError(
                f"{purpose} needs the package cityscapesscripts (module {module} cannot be "
                f"imported: {e}); Detectron2's Cityscapes loader and CityscapesInstanceEvaluator "
                "import it. Install it with 'pip install cityscapesscripts' (or 'make setup', "
                "which installs requirements.txt).", name="cityscapesscripts") from e


def check_cityscapes_dataset(name: str) -> None:
    """Check that a registered Cityscapes instance dataset can be loaded and evaluated.

    Checks, without loading any annotation (a few directory listings): cityscapesscripts is
    importable; the metadata's ``image_dir`` exists and holds ``<city>/*_leftImg8bit.png``
    images (and nothing else, as Detectron2's loader asserts); every image has its three
    ``gtFine`` files (``_gtFine_instanceIds.png``, ``_gtFine_labelIds.png``,
    ``_gtFine_polygons.json``) under ``gt_dir``.

    Args:
        name (str): a dataset registered with metadata ``evaluator_type="cityscapes_instance"``,
            ``image_dir`` and ``gt_dir`` (as Detectron2's ``cityscapes_fine_instance_seg_*``;
            their paths are under ``$DETECTRON2_DATASETS``, default ``datasets``, as it was
            when Detectron2 was imported).

    Raises:
        ValueError: the dataset is not a Cityscapes instance dataset.
        MissingPackageError: cityscapesscripts is not installed. An ``ImportError`` (not a
            ``DatasetFormatError``): the data may be fine, the environment lacks a package,
            and callers that handle a missing optional package catch ``ImportError``.
        DatasetFormatError: a folder is missing or holds no images, or images lack gtFine
            files (the count and the first missing path); every message names the dataset,
            the path and the fix.
    """
    from detectron2.data import MetadataCatalog

    metadata = MetadataCatalog.get(name)
    if metadata.get("evaluator_type", None) != "cityscapes_instance":
        raise ValueError(f"dataset '{name}' is not a Cityscapes instance dataset (its metadata "
                         f"evaluator_type is {metadata.get('evaluator_type', None)!r}, not "
                         "'cityscapes_instance')")
    _require_cityscapesscripts(f"dataset '{name}' (Cityscapes)")
    image_dir, gt_dir = metadata.image_dir, metadata.gt_dir
    what = f"dataset '{name}'"
    env = os.environ.get("DETECTRON2_DATASETS")
    env_text = (f"DETECTRON2_DATASETS is {env!r}" if env is not None
                else "DETECTRON2_DATASETS is not set (default: 'datasets', relative to the "
                     "working directory)")
    if not os.path.isdir(image_dir):
        raise DatasetFormatError(
            f"{what} expects its Cityscapes images in {image_dir} (metadata image_dir; "
            f"{os.path.abspath(image_dir)}), which does not exist. Detectron2 places its "
            "Cityscapes splits under $DETECTRON2_DATASETS/cityscapes/ when it is imported; "
            f"{env_text}. Set DETECTRON2_DATASETS to the folder that holds cityscapes/ "
            f"(with leftImg8bit/ and gtFine/, unpacked from {_DOWNLOADS}) before starting, "
            f"or, {_SAMPLE_HINT}.")
    found = _scan(image_dir, gt_dir, what)
    if not found:
        raise DatasetFormatError(
            f"{what}: {image_dir} (metadata image_dir) holds no <city>/*{_IMAGE_SUFFIX} "
            f"images. Unpack leftImg8bit_trainvaltest.zip into the folder that holds "
            f"cityscapes/ ({_DOWNLOADS}), or, {_SAMPLE_HINT}.")
    missing = _missing_gt(found)
    if missing:
        absent = set(missing)
        lacking = sum(any(gt in absent for gt in files) for files in found.values())
        where = "" if os.path.isdir(gt_dir) else f"; {gt_dir} does not exist"
        raise DatasetFormatError(
            f"{what}: {lacking} of {len(found)} images in {image_dir} lack gtFine files "
            f"({len(missing)} files missing, the first {missing[0]}{where}). Every image "
            f"needs {', '.join('<stem>' + s for s in _GT_SUFFIXES)} in {gt_dir}/<city>/ "
            "(metadata gt_dir): unpack gtFine_trainvaltest.zip (it holds all three for the "
            "train and val images) into the folder that holds cityscapes/, next to "
            f"leftImg8bit/; or, {_SAMPLE_HINT}.")


def _missing_gt(found: Dict[str, Tuple[str, str, str]]) -> List[str]:
    """The gtFine files of ``found`` (see :func:`_scan`) that are not on disk, in order."""
    return [gt for files in found.values() for gt in files if not os.path.isfile(gt)]
