"""COCO-format instance datasets, checked before Detectron2 loads them.

Detectron2's ``load_coco_json`` trusts its input: it drops polygons with fewer than 3 points and
instances left without a valid segmentation (with only a log warning), asserts on some problems
and fails late, inside the data loader, on others (a missing image file). The functions here
check the whole file first and raise :class:`DatasetFormatError` naming the file and each
problem, then build from that one parse the dicts ``load_coco_json`` would return, so no
annotation is ever lost without an error and the file is parsed once per load.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Optional

from PIL import Image

__all__ = [
    "DatasetFormatError",
    "validate_coco_instances",
    "load_coco_instances",
    "register_coco_instances_checked",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 20  # problems listed in one error message; the total is always given
_TRANSPOSING_EXIF = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable, or not valid COCO (or YouTube-VIS) format."""


def _read_json(json_file: str, lists=("images", "annotations", "categories"),
               nonempty=("images", "categories")) -> dict:
    """Parse a json file whose top level is an object with the lists ``lists`` (those in
    ``nonempty`` non-empty); raise :class:`DatasetFormatError` naming the file otherwise."""
    if not os.path.isfile(json_file):
        raise DatasetFormatError(f"{json_file}: annotation file does not exist")
    with open(json_file, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DatasetFormatError(f"{json_file}: annotation file is empty")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{json_file}: malformed json ({e})") from e
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_file}: top level must be a json object")
    missing = [k for k in lists if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetFormatError(f"{json_file}: no list named {', '.join(map(repr, missing))}")
    for key in nonempty:
        if not data[key]:
            raise DatasetFormatError(f"{json_file}: '{key}' is empty")
    return data


def _check_image_file(path: str, width: int, height: int, verify: bool) -> Optional[str]:
    """Return a problem with one image file, or None. Reads the header (and verifies) only."""
    if not os.path.isfile(path):
        return f"image file {path} does not exist"
    if not verify:
        return None
    try:
        with Image.open(path) as im:
            im.verify()  # headers and, for PNG, checksums; a truncated JPEG body passes
        with Image.open(path) as im:  # verify() must come first and leaves the file unusable
            size = im.size
            transposed = im.getexif().get(0x0112, 1) in _TRANSPOSING_EXIF
    except Exception as e:  # PIL raises many types for bad files
        return f"image file {path} cannot be read by PIL ({type(e).__name__}: {e})"
    if transposed:  # Detectron2's read_image applies the EXIF rotation
        size = size[::-1]
    if size != (width, height):
        return f"image file {path} is {size[0]}x{size[1]} but the json says {width}x{height}"
    return None


def _is_xywh_box(box) -> bool:
    """Whether ``box`` is a list [x, y, w, h] of 4 finite numbers with w, h >= 0."""
    return (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            and box[2] >= 0 and box[3] >= 0)


def _segmentation_problem(segm, height: int, width: int) -> Optional[str]:
    if isinstance(segm, dict):  # RLE, compressed (str counts) or not (list counts)
        if not isinstance(segm.get("counts"), (str, list)):
            return "RLE without 'counts'"
        if list(segm.get("size", ())) != [height, width]:
            return f"RLE size {segm.get('size')} differs from the image's [{height}, {width}]"
        return None
    if not isinstance(segm, list) or not segm:
        return "segmentation must be a non-empty list of polygons or an RLE dict"
    for polygon in segm:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            n = len(polygon) if isinstance(polygon, list) else "?"
            return f"polygon with {n} coordinates (needs an even number, at least 6 = 3 points)"
        try:  # one C-level pass (COCO: ~17M coordinates); inf - inf sums to nan
            finite = math.isfinite(sum(polygon))
        except TypeError:  # a str, None, list, ... among the coordinates
            finite = False
        if not finite:
            return "polygon with non-numeric or non-finite coordinates"
    return None


def validate_coco_instances(json_file: str, image_root: str, verify_images: bool = True) -> dict:
    """Check a COCO instances json (and its image files) without changing anything.

    Checked: the file exists, is non-empty, valid json with lists "images" and "categories"
    (each non-empty) and "annotations"; ids are unique; every annotation names an existing image
    and category, has a bbox [x, y, w, h] of 4 finite numbers with w, h >= 0, and, if it has a
    segmentation, polygons of >= 3 points or an RLE of the image's size; every image file
    exists under ``image_root`` and, with ``verify_images``, PIL opens and verifies it and its
    size (after EXIF rotation) matches the json. Images without annotations are valid.

    Args:
        json_file (str): path of the json file.
        image_root (str): directory that the images' "file_name" entries are relative to.
        verify_images (bool): open each image with PIL (reads headers, not pixels).

    Returns:
        dict: the parsed json.

    Raises:
        DatasetFormatError: listing the file and its problems (the first 20, and the count).
    """
    return _validate_parsed(_read_json(json_file), json_file, image_root, verify_images)


def _validate_parsed(data: dict, json_file: str, image_root: str, verify_images: bool) -> dict:
    """:func:`validate_coco_instances` of the parsed json ``data``; returns ``data``."""
    problems: List[str] = []

    category_ids = set(_check_categories(data, problems))

    images = {}
    for img in data["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        fields_ok = isinstance(img, dict) and isinstance(img.get("file_name"), str) and all(
            isinstance(img.get(k), int) and img[k] > 0 for k in ("height", "width"))
        if iid is None or not fields_ok:
            problems.append(f"image {img!r} needs 'id', 'file_name' and positive 'height', 'width'")
            continue
        if iid in images:
            problems.append(f"image id {iid} appears twice")
        images[iid] = img
        problem = _check_image_file(os.path.join(image_root, img["file_name"]),
                                    img["width"], img["height"], verify_images)
        if problem:
            problems.append(f"image id {iid}: {problem}")

    annotation_ids = set()
    for ann in data["annotations"]:
        where = _annotation_where(ann, annotation_ids, problems)
        if where is None:
            continue
        if ann.get("image_id") not in images:
            problems.append(f"{where} refers to image_id {ann.get('image_id')!r}, not in 'images'")
            continue
        if ann.get("category_id") not in category_ids:
            problems.append(f"{where} has category_id {ann.get('category_id')!r}, not in "
                            f"'categories' (ids {sorted(category_ids)})")
        box = ann.get("bbox")
        if not _is_xywh_box(box):
            problems.append(f"{where} has bbox {box!r}; needs [x, y, w, h] with w, h >= 0")
        if ann.get("ignore", 0):
            problems.append(f"{where} has 'ignore' set, which Detectron2 does not support")
        if "segmentation" in ann:
            img = images[ann["image_id"]]
            problem = _segmentation_problem(ann["segmentation"], img["height"], img["width"])
            if problem:
                problems.append(f"{where} (image_id {ann['image_id']}): {problem}")

    _raise_problems(json_file, problems)
    return data


def _raise_problems(json_file: str, problems: List[str]) -> None:
    """Raise one :class:`DatasetFormatError` naming ``json_file`` and listing ``problems``
    (the first 20, and the count); do nothing if there are none."""
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        hidden = len(problems) - _MAX_LISTED
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        raise DatasetFormatError(f"{json_file}: {len(problems)} problem(s):\n  {listed}{more}")


def load_coco_instances(
    json_file: str, image_root: str, dataset_name: Optional[str] = None, verify_images: bool = True
) -> List[dict]:
    """Validate a COCO instances json, then make Detectron2's dataset dicts of it.

    Args:
        json_file (str): path of the json file.
        image_root (str): directory of the images.
        dataset_name (str or None): as in ``load_coco_json``: when given, category ids are
            mapped to contiguous ids 0..C-1 and "thing_classes" /
            "thing_dataset_id_to_contiguous_id" are set in that dataset's metadata.
        verify_images (bool): see :func:`validate_coco_instances`.

    Returns:
        list[dict]: Detectron2 dataset dicts (file_name, height, width, image_id,
        annotations), one per image, images without annotations included; equal to
        Detectron2's ``load_coco_json(json_file, image_root, dataset_name)``'s. The file is
        parsed once.

    Raises:
        DatasetFormatError: see :func:`validate_coco_instances`.
    """
    data = validate_coco_instances(json_file, image_root, verify_images=verify_images)
    return _load_parsed(data, json_file, image_root, dataset_name)


def _load_parsed(data: dict, json_file: str, image_root: str, dataset_name: Optional[str]):
    """The dicts of Detectron2's ``load_coco_json(json_file, image_root, dataset_name)``,
    made from ``data``, the json's content already parsed and validated.

    ``load_coco_json`` parses the file itself (``pycocotools.coco.COCO(json_file)``): for
    COCO's 118k images a second parse of ~20 s, and a second parsed copy and pycocotools'
    index in memory. Here the same records are built from ``data``, without another parse
    and without patching pycocotools (which a thread loading another dataset would see):
    images sorted by id, each with its annotations in file order; per annotation
    "iscrowd", "bbox", "keypoints" (x, y + 0.5, as Detectron2 makes them pixel centres),
    "category_id" (contiguous 0..C-1 with ``dataset_name``), "segmentation" (polygons, or
    RLE with list counts compressed by ``pycocotools.mask.frPyObjects``), "bbox_mode"
    ``BoxMode.XYWH_ABS``. With ``dataset_name``, its metadata gets "thing_classes" (ordered
    by id) and "thing_dataset_id_to_contiguous_id", as ``load_coco_json`` sets them.
    The checks that ``load_coco_json`` asserts (unique ids, known images and categories, no
    "ignore", polygons of >= 3 points) were made by :func:`_validate_parsed`, so none of
    its filtering applies; tests/test_datasets.py compares the two on one json.
    """
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode

    id_map = None
    if dataset_name is not None:
        from detectron2.data import MetadataCatalog

        categories = {c["id"]: c["name"] for c in data["categories"]}
        ids = sorted(categories)
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = [categories[i] for i in ids]
        id_map = {cid: i for i, cid in enumerate(ids)}
        meta.thing_dataset_id_to_contiguous_id = id_map

    per_image: Dict[object, list] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    images = {img["id"]: img for img in data["images"]}
    keys = ("iscrowd", "bbox", "keypoints", "category_id")
    dicts = []
    for image_id in sorted(images):
        img = images[image_id]
        objs = []
        for ann in per_image[image_id]:
            obj = {key: ann[key] for key in keys if key in ann}
            segm = ann.get("segmentation")
            if segm:
                if isinstance(segm, dict) and isinstance(segm["counts"], list):
                    segm = mask_util.frPyObjects(segm, *segm["size"])
                obj["segmentation"] = segm
            if ann.get("keypoints"):  # integer pixel indices -> pixel centres
                obj["keypoints"] = [v if i % 3 == 2 else v + 0.5
                                    for i, v in enumerate(ann["keypoints"])]
            obj["bbox_mode"] = BoxMode.XYWH_ABS
            if id_map:
                obj["category_id"] = id_map[obj["category_id"]]
            objs.append(obj)
        dicts.append({"file_name": os.path.join(image_root, img["file_name"]),
                      "height": img["height"], "width": img["width"], "image_id": image_id,
                      "annotations": objs})
    logger.info("Loaded %d images in COCO format from %s", len(dicts), json_file)
    return dicts


def register_coco_instances_checked(name: str, metadata: dict, json_file: str, image_root: str,
                                    verify_images: bool = False):
    """Register a COCO-format dataset like Detectron2's ``register_coco_instances``, but loaded
    with :func:`load_coco_instances` (validated) when ``DatasetCatalog.get(name)`` is called.

    Args:
        name (str): dataset name, e.g. "my_cells_train".
        metadata (dict): extra metadata (e.g. thing_classes); json_file, image_root and
            evaluator_type="coco" are added.
        json_file (str): path of the COCO instances json.
        image_root (str): directory of the images.
        verify_images (bool): also open every image with PIL when loading (headers: minutes
            on COCO's 118k images); by default only their existence is checked.

    Raises:
        AssertionError: ``name`` is already registered (as in Detectron2).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name,
                                                              verify_images=verify_images))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def _annotation_where(ann, seen: set, problems: List[str], meaning: str = "") -> Optional[str]:
    """"annotation id N" for messages about ``ann``; a missing id (then None is returned) or
    a repeated one is added to ``problems``. ``seen`` collects the ids met so far;
    ``meaning`` says what the id stands for (e.g. "the track identity")."""
    aid = ann.get("id") if isinstance(ann, dict) else None
    if aid is None:
        what = f" ({meaning})" if meaning else ""
        problems.append(f"annotation without 'id'{what}: {str(ann)[:200]}")
        return None
    where = f"annotation id {aid}"
    if aid in seen:
        problems.append(f"{where} appears twice; give each annotation its own id")
    seen.add(aid)
    return where


def _check_categories(data: dict, problems: List[str]) -> Dict[int, str]:
    """Category id -> name of the json; problems appended."""
    categories: Dict[int, str] = {}
    for cat in data["categories"]:
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or not isinstance(cat.get("name"), str):
            problems.append(f"category {cat!r} needs an integer 'id' and a string 'name'")
            continue
        if cid in categories:
            problems.append(f"category id {cid} appears twice; give each category its own id")
        categories[cid] = cat["name"]
    return categories
