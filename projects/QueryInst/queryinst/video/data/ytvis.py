"""YouTube-VIS datasets: checked loading into Detectron2 video dicts, registration, categories.

A YouTube-VIS json (Yang et al., "Video Instance Segmentation", ICCV 2019) has "videos"
(``id``, ``file_names`` [T], ``height``, ``width``, ``length`` = T), "categories" (``id``,
``name``) and "annotations", one per object track: ``id`` (the track's identity),
``video_id``, ``category_id``, ``iscrowd`` and the per-frame lists ``segmentations``
(compressed RLE, uncompressed RLE or polygons; None where the object is absent), ``bboxes``
([x, y, w, h] or None) and ``areas`` (or None), each of length T.

:func:`load_ytvis_json` checks the whole file first, like the COCO loader
(:mod:`queryinst.data.coco_format`), and raises one :class:`DatasetFormatError` naming the
file, each problem's video / annotation id, and the fix; then it builds one dict per video
(see its docstring). Registering does no IO; the predefined splits live under
``$DETECTRON2_DATASETS`` (default ``./datasets``) with the layout of Detectron2's VIS projects
(Mask2Former's ``mask2former_video``)::

    ytvis_2019/{train,valid}/JPEGImages/<video>/<frame>.jpg
    ytvis_2019/{train,valid}.json
    ytvis_2021/{train,valid}/JPEGImages/<video>/<frame>.jpg
    ytvis_2021/{train,valid}.json

The category ids and names are those of the official YouTube-VIS 2019 and 2021 annotation
files (https://youtube-vos.org/dataset/vis/).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode

from ...data.builtin import datasets_root
from ...data.coco_format import (
    DatasetFormatError,
    _annotation_where,
    _check_categories,
    _check_image_file,
    _is_xywh_box,
    _raise_problems,
    _read_json,
    _segmentation_problem,
)

__all__ = [
    "YTVIS_2019_CATEGORIES",
    "YTVIS_2021_CATEGORIES",
    "PREDEFINED_YTVIS_SPLITS",
    "load_ytvis_json",
    "register_ytvis_instances",
    "register_all_ytvis",
    "ytvis_metadata",
]

logger = logging.getLogger(__name__)

# Category names of the official annotation files, in id order: ids are 1..40.
YTVIS_2019_CATEGORIES: Tuple[str, ...] = (
    "person", "giant_panda", "lizard", "parrot", "skateboard", "sedan", "ape", "dog",
    "snake", "monkey", "hand", "rabbit", "duck", "cat", "cow", "fish", "train", "horse",
    "turtle", "bear", "motorbike", "giraffe", "leopard", "fox", "deer", "owl", "surfboard",
    "airplane", "truck", "zebra", "tiger", "elephant", "snowboard", "boat", "shark", "mouse",
    "frog", "eagle", "earless_seal", "tennis_racket",
)
YTVIS_2021_CATEGORIES: Tuple[str, ...] = (
    "airplane", "bear", "bird", "boat", "car", "cat", "cow", "deer", "dog", "duck",
    "earless_seal", "elephant", "fish", "flying_disc", "fox", "frog", "giant_panda", "giraffe",
    "horse", "leopard", "lizard", "monkey", "motorbike", "mouse", "parrot", "person", "rabbit",
    "shark", "skateboard", "snake", "snowboard", "squirrel", "surfboard", "tennis_racket",
    "tiger", "train", "truck", "turtle", "whale", "zebra",
)

# name -> (year, image root, json file), both relative to the datasets root.
PREDEFINED_YTVIS_SPLITS: Dict[str, Tuple[int, str, str]] = {
    "ytvis_2019_train": (2019, "ytvis_2019/train/JPEGImages", "ytvis_2019/train.json"),
    "ytvis_2019_val": (2019, "ytvis_2019/valid/JPEGImages", "ytvis_2019/valid.json"),
    "ytvis_2021_train": (2021, "ytvis_2021/train/JPEGImages", "ytvis_2021/train.json"),
    "ytvis_2021_val": (2021, "ytvis_2021/valid/JPEGImages", "ytvis_2021/valid.json"),
}

_PER_FRAME_KEYS = ("segmentations", "bboxes", "areas")


def ytvis_metadata(year: int) -> dict:
    """Metadata of a YouTube-VIS year: ``thing_classes`` (40 names, contiguous order) and
    ``thing_dataset_id_to_contiguous_id`` ({1: 0, ..., 40: 39}).

    Raises:
        ValueError: ``year`` is not 2019 or 2021.
    """
    names = {2019: YTVIS_2019_CATEGORIES, 2021: YTVIS_2021_CATEGORIES}.get(year)
    if names is None:
        raise ValueError(f"YouTube-VIS year must be 2019 or 2021, got {year!r}")
    return {
        "thing_classes": list(names),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(names))},
    }


def _check_videos(data: dict, image_root: str, verify_images: bool,
                  problems: List[str]) -> Dict[int, dict]:
    """Video id -> video of the json, frame files checked; problems appended."""
    videos: Dict[int, dict] = {}
    for video in data["videos"]:
        vid = video.get("id") if isinstance(video, dict) else None
        names = video.get("file_names") if isinstance(video, dict) else None
        fields_ok = (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                     and all(isinstance(video.get(k), int) and video[k] > 0
                             for k in ("height", "width")))
        if vid is None or not fields_ok:
            problems.append(f"video {str(video)[:200]} needs 'id', a non-empty list "
                            "'file_names' and positive integer 'height', 'width'")
            continue
        where = f"video id {vid}"
        if vid in videos:
            problems.append(f"{where} appears twice; give each video its own id")
        length = video.get("length", len(names))
        if length != len(names):
            problems.append(f"{where}: 'length' is {length!r} but 'file_names' has "
                            f"{len(names)} entries; make 'length' the number of frames")
            continue
        videos[vid] = video
        for t, name in enumerate(names):
            problem = _check_image_file(os.path.join(image_root, name), video["width"],
                                        video["height"], verify_images)
            if problem:
                problems.append(f"{where}, frame {t}: {problem}; put the frame there or "
                                "correct 'file_names' or the image root")
    return videos


def _check_annotations(data: dict, videos: Dict[int, dict], categories: Dict[int, str],
                       problems: List[str]) -> None:
    """Check every annotation (track) against its video; problems appended."""
    annotation_ids = set()
    for ann in data["annotations"]:
        where = _annotation_where(ann, annotation_ids, problems, "the track identity")
        if where is None:
            continue
        video = videos.get(ann.get("video_id"))
        if video is None:
            problems.append(f"{where} refers to video_id {ann.get('video_id')!r}, not a valid "
                            "entry of 'videos'; fix its video_id")
            continue
        where = f"{where} (video id {video['id']})"
        if ann.get("category_id") not in categories:
            problems.append(f"{where} has category_id {ann.get('category_id')!r}, not in "
                            f"'categories' (ids {sorted(categories)}); add the category or "
                            "fix the id")
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{where} has iscrowd {ann.get('iscrowd')!r}; use 0 or 1")
        if not isinstance(ann.get("segmentations"), list):
            problems.append(f"{where} has no list 'segmentations'; give one entry per frame, "
                            "None where the object is absent")
            continue
        length = len(video["file_names"])
        bad_lengths = False
        for key in _PER_FRAME_KEYS:
            values = ann.get(key)
            if values is not None and (not isinstance(values, list) or len(values) != length):
                n = len(values) if isinstance(values, list) else type(values).__name__
                problems.append(f"{where}: '{key}' has {n} entries but the video has {length} "
                                "frames; give one entry per frame, None where the object is "
                                "absent")
                bad_lengths = True
        if bad_lengths:
            continue
        bboxes = ann.get("bboxes") or [None] * length
        for t, segm in enumerate(ann["segmentations"]):
            if segm is None:
                continue
            problem = _segmentation_problem(segm, video["height"], video["width"])
            if problem:
                problems.append(f"{where}, frame {t}: {problem}")
            if bboxes[t] is not None and not _is_xywh_box(bboxes[t]):
                problems.append(f"{where}, frame {t}: bbox {bboxes[t]!r}; needs [x, y, w, h] "
                                "with w, h >= 0 (or None to take the mask's box)")


def _category_map(json_file: str, categories: Dict[int, str],
                  dataset_name: Optional[str]) -> Optional[Dict[int, int]]:
    """Dataset category id -> contiguous id, as Detectron2's ``load_coco_json`` makes it.

    Uses the dataset's metadata mapping if it has one (the predefined splits do), checking
    that the json's categories are in it with the same names; otherwise maps the json's
    sorted ids to 0..C-1 and sets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``.
    """
    if dataset_name is None:
        return None
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    if id_map is None:
        ids = sorted(categories)
        meta.set(thing_classes=[categories[i] for i in ids],
                 thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(ids)})
        return meta.thing_dataset_id_to_contiguous_id
    classes = getattr(meta, "thing_classes", None)
    problems = []
    for cid, name in sorted(categories.items()):
        if cid not in id_map:
            problems.append(f"category id {cid} ({name!r}) is not a category of dataset "
                            f"{dataset_name!r} (ids {sorted(id_map)}); use that dataset's ids")
        elif classes is not None and classes[id_map[cid]] != name:
            problems.append(f"category id {cid} is {name!r} but {classes[id_map[cid]]!r} in "
                            f"dataset {dataset_name!r}; is the json of another year?")
    _raise_problems(json_file, problems)
    return dict(id_map)


def _compressed(segm, height: int, width: int):
    """A checked segmentation as a polygon list (unchanged) or compressed RLE (str counts)."""
    if not isinstance(segm, dict):
        return segm
    if isinstance(segm["counts"], list):  # uncompressed RLE
        import pycocotools.mask as mask_util

        segm = mask_util.frPyObjects(segm, height, width)
    counts = segm["counts"]
    return {"size": [height, width],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _mask_box(segm, height: int, width: int) -> List[float]:
    """The [x, y, w, h] box (pixels) of a polygon list or compressed RLE (pycocotools')."""
    import pycocotools.mask as mask_util

    if isinstance(segm, list):
        segm = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    return [float(v) for v in mask_util.toBbox(segm)]


def load_ytvis_json(json_file: str, image_root: str, dataset_name: Optional[str] = None,
                    extra_annotation_keys: Optional[Sequence[str]] = None,
                    verify_images: bool = False) -> List[dict]:
    """Check and load a YouTube-VIS json into Detectron2 video dicts.

    Checked (every problem collected, then one error): the file is a json object with lists
    "videos" and "categories" (non-empty) and "annotations" (absent or null in a split
    without public annotations, such as the official valid json: no objects); ids are unique; each video has
    a non-empty ``file_names``, positive ``height`` / ``width`` and ``length`` (if given)
    equal to the number of frames, and every frame file exists under ``image_root`` (with
    ``verify_images``, PIL also opens it and its size must match: one header read per
    frame); each annotation names an existing video and category, has a list
    ``segmentations`` and, if given, ``bboxes`` / ``areas``, each with one entry per frame;
    each non-None per-frame segmentation is a polygon list (>= 3 points per polygon) or an
    RLE of the video's size, each non-None box [x, y, w, h] with w, h >= 0.

    Args:
        json_file (str): path of the YouTube-VIS json.
        image_root (str): directory that the videos' ``file_names`` are relative to.
        dataset_name (str or None): as in Detectron2's ``load_coco_json``: when given,
            category ids become contiguous ids 0..C-1 by that dataset's metadata
            ``thing_dataset_id_to_contiguous_id`` if it has one (the json's categories must
            then be in it, with the same names), otherwise by the json's sorted ids, which
            are then set in the metadata with ``thing_classes``.
        extra_annotation_keys (list[str] or None): further annotation keys copied, as they
            are, into every per-frame object of that annotation.
        verify_images (bool): open every frame with PIL (slow for 100k frames).

    Returns:
        list[dict], one per video, in the json's order::

            {"file_names": [T absolute paths], "height": H, "width": W, "length": T,
             "video_id": int,
             "annotations": T lists, frame t's holding one dict per object present in it:
                 {"id": the annotation (track) id, the same in every frame,
                  "category_id": contiguous if dataset_name is given, else the json's,
                  "iscrowd": 0 or 1,
                  "bbox": [x, y, w, h] pixels (the json's, or the mask's box where the json
                          has None), "bbox_mode": BoxMode.XYWH_ABS,
                  "segmentation": polygon list, or compressed RLE {"size": [H, W],
                                  "counts": str} (uncompressed RLE is compressed with
                                  pycocotools' frPyObjects)}}

        An object whose segmentation is None in frame t is not in frame t's list.

    Raises:
        DatasetFormatError: naming ``json_file`` and, for each problem (the first 20, and
            the count), the video / annotation id and the fix.
    """
    data = _read_json(json_file, lists=("videos", "categories"),
                      nonempty=("videos", "categories"))
    # The official valid / test jsons have no annotations (the server holds them).
    if data.get("annotations") is None:
        data["annotations"] = []
    elif not isinstance(data["annotations"], list):
        raise DatasetFormatError(f"{json_file}: 'annotations' must be a list (or absent, for "
                                 "a split without public annotations)")
    problems: List[str] = []
    categories = _check_categories(data, problems)
    videos = _check_videos(data, image_root, verify_images, problems)
    _check_annotations(data, videos, categories, problems)
    _raise_problems(json_file, problems)
    id_map = _category_map(json_file, categories, dataset_name)

    tracks_of: Dict[int, List[dict]] = {vid: [] for vid in videos}
    for ann in data["annotations"]:
        tracks_of[ann["video_id"]].append(ann)
    extra_keys = list(extra_annotation_keys or [])
    dicts = []
    for video in data["videos"]:
        height, width = video["height"], video["width"]
        length = len(video["file_names"])
        frames: List[List[dict]] = [[] for _ in range(length)]
        for ann in tracks_of[video["id"]]:
            bboxes = ann.get("bboxes") or [None] * length
            category = ann["category_id"] if id_map is None else id_map[ann["category_id"]]
            for t, segm in enumerate(ann["segmentations"]):
                if segm is None:
                    continue
                segm = _compressed(segm, height, width)
                box = bboxes[t] if bboxes[t] is not None else _mask_box(segm, height, width)
                obj = {key: ann[key] for key in extra_keys if key in ann}
                obj.update(id=ann["id"], category_id=category, iscrowd=ann.get("iscrowd", 0),
                           bbox=[float(v) for v in box], bbox_mode=BoxMode.XYWH_ABS,
                           segmentation=segm)
                frames[t].append(obj)
        dicts.append({
            "file_names": [os.path.join(image_root, n) for n in video["file_names"]],
            "height": height, "width": width, "length": length, "video_id": video["id"],
            "annotations": frames,
        })
    logger.info(f"Loaded {len(dicts)} videos, {len(data['annotations'])} tracks in YouTube-VIS "
                f"format from {json_file}")
    return dicts


def register_ytvis_instances(name: str, metadata: dict, json_file: str, image_root: str) -> None:
    """Register a YouTube-VIS dataset, like Detectron2's ``register_coco_instances``: loaded
    with :func:`load_ytvis_json` (checked) when ``DatasetCatalog.get(name)`` is called; no IO now.

    Args:
        name (str): dataset name, e.g. "ytvis_2019_train".
        metadata (dict): extra metadata (e.g. :func:`ytvis_metadata`'s thing_classes and
            thing_dataset_id_to_contiguous_id); json_file, image_root and
            evaluator_type="ytvis" are added.
        json_file (str): path of the YouTube-VIS json.
        image_root (str): directory of the frames (``file_names`` are relative to it).

    Raises:
        AssertionError: ``name`` is already registered (as in Detectron2).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, lambda: load_ytvis_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="ytvis", **metadata
    )


def register_all_ytvis(root: Optional[str] = None) -> None:
    """Register :data:`PREDEFINED_YTVIS_SPLITS` under ``root``, with their year's metadata.

    No IO. Calling again re-registers cleanly (previous entries and metadata are removed),
    so a new ``root`` takes effect and repeated calls never raise.

    Args:
        root (str or None): datasets root, resolved now; default
            :func:`queryinst.data.datasets_root` (``$DETECTRON2_DATASETS`` or "datasets").
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = datasets_root(root)
    for name, (year, image_root, json_file) in PREDEFINED_YTVIS_SPLITS.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        register_ytvis_instances(name, ytvis_metadata(year), os.path.join(root, json_file),
                                 os.path.join(root, image_root))
