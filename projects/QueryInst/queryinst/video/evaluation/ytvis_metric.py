"""YouTube-VIS metrics: track AP/AR and identity switches (docs/method.md §6.4).

The AP follows the definitions of the official YouTube-VIS evaluation: videos take the place
of COCO's images and tracks the place of its annotations, so pycocotools' ``COCOeval`` does the
greedy matching by score, the 101-point interpolated precision and the summary; only the IoU
and the areas change:

* spatio-temporal mask IoU of a prediction track d and a GT track g over the T frames of a
  video: ``sum_t |d_t & g_t| / sum_t |d_t | g_t|``; a frame where only one side has a mask
  adds that mask's area to the union, a frame where neither has one adds nothing
  (0 when the union is empty);
* a track's area is its mean mask area over the frames where it is present; the area ranges
  are all, small (< 128²), medium (128²..256²) and large (> 256²) pixels;
* matching per (video, category) at IoU 0.50:0.05:0.95, at most 1/10/100 tracks per video and
  category; crowd GT tracks (``iscrowd``) are ignored as in COCO.

Identity switches (which AP does not see) are counted per frame after a one-to-one matching of
GT masks and predicted track masks at mask IoU >= 0.5.

Inputs are plain YouTube-VIS json content: the GT dict (``videos``, ``annotations`` with
per-frame ``segmentations``, ``categories``) and the results list
(``{video_id, category_id, score, segmentations}`` with compressed RLE or None per frame).
"""
from __future__ import annotations

import contextlib
import io
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

__all__ = [
    "METRIC_NAMES",
    "AREA_RANGES",
    "to_rle",
    "rle_areas",
    "spatio_temporal_iou",
    "YTVISeval",
    "evaluate_ytvis",
    "identity_switches",
]

# The reported metrics (percent), in the order of the table.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")
# name -> [lo, hi] of a track's mean area in pixels (bounds inclusive, as in COCOeval).
AREA_RANGES = OrderedDict(
    [("all", [0.0, 1e5 ** 2]), ("small", [0.0, 128.0 ** 2]),
     ("medium", [128.0 ** 2, 256.0 ** 2]), ("large", [256.0 ** 2, 1e5 ** 2])])
_MAX_DETS = [1, 10, 100]


def to_rle(segm, height: int, width: int) -> Optional[dict]:
    """One frame's segmentation as a compressed RLE, or None where the object is absent.

    Args:
        segm: None; a compressed RLE (``counts`` str or bytes); an uncompressed RLE
            (``counts`` a list of run lengths, column-major, starting with zeros); or a
            polygon list ``[[x0, y0, x1, y1, ...], ...]`` in pixels.
        height, width: the frame size in pixels (used for polygons and uncompressed RLE).

    Returns:
        dict with ``size`` [H, W] and ``counts`` (bytes), or None.

    Raises:
        ValueError: for anything else.
    """
    if segm is None:
        return None
    if isinstance(segm, dict) and "counts" in segm:
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise ValueError(f"an RLE needs 'size' [height, width], got {size!r}")
        if isinstance(segm["counts"], list):
            return mask_util.frPyObjects(segm, *size)
        return segm
    if isinstance(segm, list):
        if len(segm) == 0:  # an empty polygon list: present but empty
            return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    raise ValueError(f"a segmentation must be None, an RLE dict or a polygon list, "
                     f"got {type(segm).__name__}")


# pycocotools' area() of a list builds its result from a uint8 array of the list's length
# (2.0.11 under NumPy 2: OverflowError beyond 255 masks): dense frames are measured in chunks.
_AREA_CHUNK = 255


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """Pixel areas of compressed RLEs.

    Args:
        rles: N compressed RLE dicts (any N, also > 255).

    Returns:
        int64 array (N,): foreground pixel counts.
    """
    chunks = [np.asarray(mask_util.area(list(rles[i:i + _AREA_CHUNK])), dtype=np.int64)
              for i in range(0, len(rles), _AREA_CHUNK)]
    return np.concatenate(chunks).reshape(-1) if chunks else np.zeros(0, dtype=np.int64)


def _areas(rles: Sequence[Optional[dict]]) -> List[Optional[float]]:
    return [None if r is None else float(mask_util.area(r)) for r in rles]


def _mean_area(rles: Sequence[Optional[dict]]) -> float:
    """Mean mask area (pixels) over the frames where the track is present; 0 if never."""
    areas = [a for a in _areas(rles) if a is not None]
    return float(np.mean(areas)) if areas else 0.0


def spatio_temporal_iou(dts: Sequence[Sequence[Optional[dict]]],
                        gts: Sequence[Sequence[Optional[dict]]]) -> np.ndarray:
    """Spatio-temporal mask IoU of every prediction track against every GT track.

    Args:
        dts: D tracks, each a list of T compressed RLEs or None (absent).
        gts: G tracks, each a list of T compressed RLEs or None; all tracks of one video.

    Returns:
        float64 array (D, G): sum over frames of intersections / sum over frames of unions
        (docs/method.md §6.4); 0 where the union is empty.

    Raises:
        ValueError: if the tracks do not all have the same number of frames.
    """
    D, G = len(dts), len(gts)
    lengths = {len(t) for t in list(dts) + list(gts)}
    if len(lengths) > 1:
        raise ValueError(f"tracks of one video have different lengths: {sorted(lengths)}")
    inter = np.zeros((D, G))
    union = np.zeros((D, G))
    T = lengths.pop() if lengths else 0
    for t in range(T):
        d_idx = [i for i in range(D) if dts[i][t] is not None]
        g_idx = [j for j in range(G) if gts[j][t] is not None]
        d_rle = [dts[i][t] for i in d_idx]
        g_rle = [gts[j][t] for j in g_idx]
        d_area = np.zeros(D)
        g_area = np.zeros(G)
        d_area[d_idx] = rle_areas(d_rle)
        g_area[g_idx] = rle_areas(g_rle)
        frame_inter = np.zeros((D, G))
        if d_idx and g_idx:
            ious = np.asarray(mask_util.iou(d_rle, g_rle, [0] * len(g_rle))).reshape(
                len(d_idx), len(g_idx))
            for a, b in zip(*np.nonzero(ious)):  # exact pixel counts where masks overlap
                frame_inter[d_idx[a], g_idx[b]] = mask_util.area(
                    mask_util.merge([d_rle[a], g_rle[b]], intersect=True))
        inter += frame_inter
        union += d_area[:, None] + g_area[None, :] - frame_inter
    return np.divide(inter, union, out=np.zeros((D, G)), where=union > 0)


def _video_lengths(gt: dict) -> Dict[int, Tuple[int, int, int]]:
    """video id -> (T, H, W)."""
    out = {}
    for v in gt["videos"]:
        T = v.get("length", len(v.get("file_names", [])))
        out[v["id"]] = (int(T), int(v["height"]), int(v["width"]))
    return out


def _tracks(rows: Sequence[dict], videos: Dict[int, Tuple[int, int, int]], what: str
            ) -> List[dict]:
    """Rows (GT annotations or results) as COCO-style annotations of video "images".

    Each gets ``id`` 1..N in row order (COCOeval uses 0 for "unmatched"), ``image_id`` = video
    id, ``segmentations`` as compressed RLE or None, ``area`` = mean area where present.
    """
    out = []
    for i, row in enumerate(rows):
        for key in ("video_id", "category_id", "segmentations"):
            if key not in row:
                raise ValueError(f"{what} {i} has no '{key}'")
        vid = row["video_id"]
        if vid not in videos:
            raise ValueError(f"{what} {i} refers to video {vid}, which the GT does not have")
        T, H, W = videos[vid]
        segms = row["segmentations"]
        if len(segms) != T:
            raise ValueError(f"{what} {i} (video {vid}) has {len(segms)} segmentations, "
                             f"the video has {T} frames")
        try:
            rles = [to_rle(s, H, W) for s in segms]
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what} {i} (video {vid}): {e}") from e
        for r in rles:
            if r is not None and list(r["size"]) != [H, W]:
                raise ValueError(f"{what} {i} (video {vid}) has a mask of size {list(r['size'])}"
                                 f", the video is {H}x{W}")
        out.append({"id": i + 1, "image_id": vid, "category_id": row["category_id"],
                    "iscrowd": int(row.get("iscrowd", 0)), "score": float(row.get("score", 1.0)),
                    "segmentations": rles, "area": _mean_area(rles)})
    return out


def _coco(videos: List[dict], anns: List[dict], categories: List[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": videos, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class YTVISeval(COCOeval):
    """COCOeval on videos: tracks matched by spatio-temporal mask IoU (docs/method.md §6.4).

    Args:
        gt: a YouTube-VIS GT dict (``videos`` with id/height/width/length or file_names,
            ``annotations`` with video_id/category_id/segmentations/iscrowd, ``categories``).
        results: list of ``{video_id, category_id, score, segmentations}``.

    After ``evaluate(); accumulate(); summarize()``, ``stats[:8]`` are AP, AP50, AP75, APs,
    APm, APl, AR1, AR10 as fractions (-1 where nothing is defined). Results of a category the
    GT does not list are not evaluated.

    Raises:
        ValueError: a row lacks a key, names an unknown video, its number of frames differs
            from the video's, or a mask's size from the video's height x width.
    """

    def __init__(self, gt: dict, results: Sequence[dict]):
        videos = _video_lengths(gt)
        images = [{"id": v["id"], "height": v["height"], "width": v["width"]}
                  for v in gt["videos"]]
        categories = list(gt.get("categories", []))
        coco_gt = _coco(images, _tracks(gt.get("annotations", []), videos, "GT annotation"),
                        categories)
        coco_dt = _coco(images, _tracks(results, videos, "result"), categories)
        super().__init__(coco_gt, coco_dt, iouType="segm")
        self.params.imgIds = sorted(videos)
        self.params.catIds = sorted(c["id"] for c in categories)
        self.params.areaRng = [list(r) for r in AREA_RANGES.values()]
        self.params.areaRngLbl = list(AREA_RANGES)
        self.params.maxDets = list(_MAX_DETS)

    def _prepare(self):
        """Group tracks by (video, category); crowd GT tracks are ignored."""
        p = self.params
        gts = self.cocoGt.loadAnns(self.cocoGt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
        dts = self.cocoDt.loadAnns(self.cocoDt.getAnnIds(imgIds=p.imgIds, catIds=p.catIds))
        self._gts, self._dts = defaultdict(list), defaultdict(list)
        for g in gts:
            g["ignore"] = int(bool(g["iscrowd"]))
            self._gts[g["image_id"], g["category_id"]].append(g)
        for d in dts:
            self._dts[d["image_id"], d["category_id"]].append(d)
        self.evalImgs = defaultdict(list)
        self.eval = {}

    def computeIoU(self, imgId, catId):
        """(D, G) spatio-temporal IoU, D = the video's tracks of the category by score, capped
        at the largest maxDets (the order ``evaluateImg`` assumes)."""
        gt = self._gts[imgId, catId]
        dt = self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: self.params.maxDets[-1]]
        return spatio_temporal_iou([d["segmentations"] for d in dt],
                                   [g["segmentations"] for g in gt])


def evaluate_ytvis(gt: dict, results: Sequence[dict]) -> Tuple["OrderedDict[str, float]", str]:
    """YouTube-VIS AP/AR of ``results`` against ``gt`` (docs/method.md §6.4).

    Args:
        gt: YouTube-VIS GT dict (see ``YTVISeval``).
        results: list of ``{video_id, category_id, score, segmentations}``.

    Returns:
        (metrics, table): metrics maps ``METRIC_NAMES`` to percent (NaN where undefined, e.g.
        APl without large GT tracks, as Detectron2's COCOEvaluator reports); table is
        pycocotools' summary text.

    Raises:
        ValueError: see ``YTVISeval``.
    """
    ev = YTVISeval(gt, results)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.evaluate()
        ev.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        ev.summarize()
    metrics = OrderedDict(
        (name, float(s * 100) if s >= 0 else float("nan"))
        for name, s in zip(METRIC_NAMES, ev.stats[: len(METRIC_NAMES)]))
    return metrics, table.getvalue()


def identity_switches(gt: dict, results: Sequence[dict], iou_thresh: float = 0.5,
                      min_score: float = 0.0) -> Dict[str, object]:
    """Identity switches of the predicted tracks (docs/method.md §6.4).

    In every frame the present, non-crowd GT masks and the present predicted masks (of any
    category) are matched one to one (Hungarian on mask IoU, ``scipy.optimize
    .linear_sum_assignment``), keeping pairs with IoU >= ``iou_thresh``. A GT track has a
    switch in a frame where its matched prediction differs from the one it was last matched
    to (frames where it is unmatched do not reset that memory).

    Args:
        gt: YouTube-VIS GT dict.
        results: result rows; a row's identity is its ``track_id`` if it has one, otherwise its
            index in the list.
        iou_thresh: least mask IoU of a matched pair.
        min_score: rows scoring below it are left out.

    Returns:
        {"ID switches": int, "GT track-frames": int (present frames of non-crowd GT tracks),
        "per_video": {video_id: (switches, GT track-frames)}}.

    Raises:
        ValueError: as ``YTVISeval`` for malformed rows.
    """
    videos = _video_lengths(gt)
    gts = [g for g in _tracks(gt.get("annotations", []), videos, "GT annotation")
           if not g["iscrowd"]]
    dts = _tracks(results, videos, "result")
    ident = [row.get("track_id", i) for i, row in enumerate(results)]
    per_video = {}
    for vid, (T, _, _) in videos.items():
        g_v = [g for g in gts if g["image_id"] == vid]
        d_v = [(ident[d["id"] - 1], d) for d in dts
               if d["image_id"] == vid and d["score"] >= min_score]
        last = {}
        switches = frames = 0
        for t in range(T):
            gi = [j for j, g in enumerate(g_v) if g["segmentations"][t] is not None]
            di = [i for i, (_, d) in enumerate(d_v) if d["segmentations"][t] is not None]
            frames += len(gi)
            if not gi or not di:
                continue
            ious = np.asarray(mask_util.iou([d_v[i][1]["segmentations"][t] for i in di],
                                            [g_v[j]["segmentations"][t] for j in gi],
                                            [0] * len(gi))).reshape(len(di), len(gi))
            for a, b in zip(*linear_sum_assignment(-ious)):
                if ious[a, b] < iou_thresh:
                    continue
                g_id, d_id = gi[b], d_v[di[a]][0]
                if g_id in last and last[g_id] != d_id:
                    switches += 1
                last[g_id] = d_id
        per_video[vid] = (switches, frames)
    return {"ID switches": sum(s for s, _ in per_video.values()),
            "GT track-frames": sum(f for _, f in per_video.values()),
            "per_video": per_video}
