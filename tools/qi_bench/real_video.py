"""tools/compare_real_video.py's parts: Cell Tracking Challenge (CTC) files from tracks, the
CTC measures, laptrack's linking on the same masks, and the frame-AP runs of both detectors.

CTC layout (Ulman et al., Nature Methods 14:1141, 2017): one 16-bit label image per frame
(0 = background, k = the cell of track k) and a track file with one line ``L B E P`` per
track: label, first and last frame (0-based, inclusive) and parent label (0: none). A
track's label is present in every frame from B to E, so a track that misses frames is cut
there: the part after the gap gets a new label whose parent is the part before it (the CTC
convention for a gap).

Measures:
- DET, TRA, LNK: ``traccuracy`` (``CTCMatcher`` + ``CTCMetrics``; a reference cell is matched
  to the computed cell covering more than half of it);
- SEG: ``py-ctcmetrics`` (``ctc_metrics``; mean Jaccard index of each reference cell with its
  matched cell, 0 when unmatched): traccuracy 0.4.3 has no SEG.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["CTCTracks", "Detection", "EDGE_ERRORS", "ctc_measures", "detection_labels",
           "first_frames", "frame_ap", "gt_ctc_tracks", "gt_label_images", "laptrack_identities",
           "linking_distance", "load_config", "load_model", "ours_labels", "paint_labels",
           "relabel", "split_at_gaps", "track_clip", "video_tracks", "write_ctc",
           "write_ctc_pair", "ytvis_scores"]


# traccuracy's link errors returned by ctc_measures, which TRA and LNK weigh (1, 1.5 and 1)
EDGE_ERRORS = {"fp_edges": "links not in the reference",
               "fn_edges": "reference links missed",
               "ws_edges": "links of the wrong kind"}


@dataclass
class Detection:
    """One segmented cell of one frame.

    Attributes:
        identity: its track (>= 1); unique within the frame.
        mask: compressed RLE dict (pycocotools) or bool (H, W) array, frame pixels.
        score: detection score in [0, 1]; where masks overlap the higher score keeps the pixel.
    """

    identity: int
    mask: object
    score: float = 1.0


def _decode(mask) -> np.ndarray:
    from pycocotools import mask as mask_util

    if isinstance(mask, dict):
        counts = mask["counts"]
        rle = {"size": mask["size"],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return mask_util.decode(rle).astype(bool)
    return np.asarray(mask, dtype=bool)


def paint_labels(frames: Sequence[Sequence[Detection]], height: int, width: int) -> np.ndarray:
    """Label images of detections: each frame painted in ascending score, so that where two
    masks overlap the higher-scoring one keeps the pixel (a CTC label image holds one cell
    per pixel).

    Args:
        frames: T lists of :class:`Detection`.
        height, width: frame size in pixels.

    Returns:
        uint16 (T, H, W): 0 background, else the detection's identity.

    Raises:
        ValueError: an identity outside 1..65535, twice in one frame, or a mask of another size.
    """
    out = np.zeros((len(frames), height, width), np.uint16)
    for t, dets in enumerate(frames):
        ids = [d.identity for d in dets]
        if len(set(ids)) != len(ids) or any(not 1 <= i <= 65535 for i in ids):
            raise ValueError(f"frame {t}: identities must be unique and in 1..65535, got {ids}")
        for d in sorted(dets, key=lambda d: d.score):
            m = _decode(d.mask)
            if m.shape != (height, width):
                raise ValueError(f"frame {t}: mask of size {m.shape}, frames are "
                                 f"{(height, width)}")
            out[t][m] = d.identity
    return out


@dataclass
class CTCTracks:
    """Label images and track file rows in the CTC layout.

    Attributes:
        labels: uint16 (T, H, W), each label present in every frame from its first to last.
        rows: (label, first frame, last frame, parent label) per track, by label.
        identity: label -> the identity it was cut from (itself for a track without gaps).
    """

    labels: np.ndarray
    rows: List[Tuple[int, int, int, int]]
    identity: Dict[int, int]


def split_at_gaps(labels: np.ndarray) -> CTCTracks:
    """Cut every identity of ``labels`` at the frames where it is absent (see the module).

    The first part keeps the identity's value; each later part takes the next free label
    (above the largest identity) and, as parent, the part before it.

    Args:
        labels: integer (T, H, W), 0 background.

    Returns:
        CTCTracks.

    Raises:
        ValueError: more than 65535 labels after cutting (CTC label images are 16-bit).
    """
    labels = np.asarray(labels)
    out = labels.astype(np.uint16, copy=True)
    present: Dict[int, List[int]] = {}
    for t in range(labels.shape[0]):
        for i in np.unique(labels[t]):
            if i:
                present.setdefault(int(i), []).append(t)
    next_label = max(present, default=0) + 1
    rows, identity = [], {}
    for ident in sorted(present):
        frames = present[ident]
        parts = [[frames[0]]]
        for t in frames[1:]:
            if t == parts[-1][-1] + 1:
                parts[-1].append(t)
            else:
                parts.append([t])
        parent = 0
        for k, part in enumerate(parts):
            label = ident if k == 0 else next_label
            if k:
                next_label += 1
                if label > 65535:
                    raise ValueError("more than 65535 CTC labels after cutting tracks at gaps")
                for t in part:
                    out[t][labels[t] == ident] = label
            rows.append((label, part[0], part[-1], parent))
            identity[label] = ident
            parent = label
    rows.sort()
    return CTCTracks(out, rows, identity)


def write_ctc(folder: str, tracks: CTCTracks, mask_name: str, track_file: str) -> None:
    """Write ``tracks`` as CTC files: ``folder/<mask_name % t>`` (16-bit TIFF, tifffile) for
    every frame and ``folder/<track_file>`` (``L B E P`` lines).

    Args:
        folder: created if missing.
        mask_name: e.g. "mask%03d.tif" (results) or "man_track%03d.tif" (reference).
        track_file: e.g. "res_track.txt" or "man_track.txt".
    """
    import tifffile

    os.makedirs(folder, exist_ok=True)
    for t, frame in enumerate(tracks.labels):
        tifffile.imwrite(os.path.join(folder, mask_name % t), frame.astype(np.uint16))
    with open(os.path.join(folder, track_file), "w") as f:
        f.writelines(f"{a} {b} {c} {d}\n" for a, b, c, d in tracks.rows)


def write_ctc_pair(out_dir: str, gt: CTCTracks, res: CTCTracks) -> Tuple[str, str]:
    """The reference and result folders of one sequence as both measuring packages read them:
    ``gt/TRA`` (man_track%03d.tif, man_track.txt), ``gt/SEG`` (man_seg%03d.tif) and ``res``
    (mask%03d.tif, res_track.txt). Returns (gt folder, res folder)."""
    gt_dir, res_dir = os.path.join(out_dir, "gt"), os.path.join(out_dir, "res")
    write_ctc(os.path.join(gt_dir, "TRA"), gt, "man_track%03d.tif", "man_track.txt")
    write_ctc(os.path.join(gt_dir, "SEG"), gt, "man_seg%03d.tif", "man_track.txt")
    os.remove(os.path.join(gt_dir, "SEG", "man_track.txt"))
    write_ctc(res_dir, res, "mask%03d.tif", "res_track.txt")
    return gt_dir, res_dir


def ctc_measures(out_dir: str, gt: CTCTracks, res: CTCTracks) -> Dict[str, float]:
    """DET, SEG, TRA and LNK of ``res`` against ``gt`` (see the module for which package
    computes which), in [0, 1], and the link errors behind TRA and LNK; the files are written
    under ``out_dir`` (:func:`write_ctc_pair`).

    Returns:
        {"DET", "SEG", "TRA", "LNK", "fp_edges", "fn_edges", "ws_edges"}: the last three are
        traccuracy's counts of result links absent from the reference, reference links the
        result misses, and links of the wrong kind (division or not); only the four
        measures, all 0, for a result without any cell; LNK NaN when the reference has no
        link (a one-frame clip).
    """
    from ctc_metrics.scripts.evaluate import evaluate_sequence
    from traccuracy import run_metrics
    from traccuracy.loaders import load_ctc_data
    from traccuracy.matchers import CTCMatcher
    from traccuracy.metrics import CTCMetrics

    gt_dir, res_dir = write_ctc_pair(out_dir, gt, res)
    if not res.rows:  # nothing detected: every reference cell and link is missed
        return {"DET": 0.0, "SEG": 0.0, "TRA": 0.0, "LNK": 0.0}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        gt_graph = load_ctc_data(os.path.join(gt_dir, "TRA"),
                                 os.path.join(gt_dir, "TRA", "man_track.txt"), name="gt")
        res_graph = load_ctc_data(res_dir, os.path.join(res_dir, "res_track.txt"), name="res")
        results, _ = run_metrics(gt_graph, res_graph, CTCMatcher(), [CTCMetrics()])
        seg = evaluate_sequence(res_dir, gt_dir, metrics=["SEG"], threads=1)["SEG"]
    scores = results[0]["results"]
    return {"DET": float(scores["DET"]), "SEG": float(seg), "TRA": float(scores["TRA"]),
            "LNK": float(scores["LNK"]),
            **{k: int(scores[k]) for k in EDGE_ERRORS}}


def gt_label_images(gt: dict, video_id: int, num_frames: Optional[int] = None
                    ) -> Tuple[np.ndarray, Dict[int, int]]:
    """The reference label images of one video of a YouTube-VIS GT dict (the bundled clips
    hold each CTC track as one annotation whose ``parent`` is the CTC parent).

    Args:
        gt: YouTube-VIS GT (``videos``, ``annotations`` with ``segmentations`` RLEs or None).
        video_id: the video.
        num_frames: keep only the first frames (None: all).

    Returns:
        (uint16 (T, H, W) label images with label = annotation id, {label: parent label}).

    Raises:
        ValueError: an unknown video id, or an annotation id above 65535.
    """
    video = next((v for v in gt["videos"] if v["id"] == video_id), None)
    if video is None:
        raise ValueError(f"video {video_id} is not in the GT json")
    T = video["length"] if num_frames is None else min(num_frames, video["length"])
    frames: List[List[Detection]] = [[] for _ in range(T)]
    parents = {}
    for ann in gt["annotations"]:
        if ann["video_id"] != video_id or ann.get("iscrowd", 0):
            continue
        parents[int(ann["id"])] = int(ann.get("parent") or 0)
        for t, seg in enumerate(ann["segmentations"][:T]):
            if seg is not None:
                frames[t].append(Detection(int(ann["id"]), seg))
    return paint_labels(frames, video["height"], video["width"]), parents


def gt_ctc_tracks(gt: dict, video_id: int, num_frames: Optional[int] = None) -> CTCTracks:
    """:func:`gt_label_images` in the CTC layout, with the GT's own parents (divisions) on
    the first part of each track that has one."""
    labels, parents = gt_label_images(gt, video_id, num_frames)
    tracks = split_at_gaps(labels)
    present = {r[0] for r in tracks.rows}
    tracks.rows = [(a, b, c, d if d else (parents.get(a, 0) if parents.get(a, 0) in present
                                          else 0)) for a, b, c, d in tracks.rows]
    return tracks


def linking_distance(gt: dict, percentile: float = 99.0) -> float:
    """How far a cell's centroid moves from one frame to the next in a YouTube-VIS GT (the
    training clip): the ``percentile`` of the displacements of every annotation between
    consecutive frames where it is present, in pixels. laptrack's linking cut-off.

    Raises:
        ValueError: no annotation is present in two consecutive frames.
    """
    steps = []
    for ann in gt["annotations"]:
        prev = None
        for seg in ann["segmentations"]:
            if seg is None:
                prev = None
                continue
            m = _decode(seg)
            ys, xs = np.nonzero(m)
            c = np.array([ys.mean(), xs.mean()]) if len(ys) else None
            if prev is not None and c is not None:
                steps.append(float(np.hypot(*(c - prev))))
            prev = c
    if not steps:
        raise ValueError("no annotation is present in two consecutive frames")
    return float(np.percentile(steps, percentile))


def laptrack_identities(labels: np.ndarray, max_distance: float, max_missed: int
                        ) -> Dict[Tuple[int, int], int]:
    """Link the cells of per-frame label images with laptrack (LAP linking of centroids,
    Jaqaman et al., Nature Methods 5:695, 2008): frame-to-frame links and gap closing over at
    most ``max_missed`` missing frames, both within ``max_distance`` pixels; no splitting or
    merging (the PSC clip's reference has no division).

    Args:
        labels: integer (T, H, W) label images of detections (any values, 0 background).
        max_distance: largest centroid distance of a link, pixels.
        max_missed: a track may skip this many frames (as the project's trackers'
            ``MAX_MISSED``).

    Returns:
        {(t, label in frame t): laptrack's track id + 1}.
    """
    import pandas as pd
    from laptrack import LapTrack
    from scipy import ndimage

    rows = []
    for t, frame in enumerate(labels):
        ids = [int(i) for i in np.unique(frame) if i]
        for i, (y, x) in zip(ids, ndimage.center_of_mass(frame > 0, frame, ids)):
            rows.append({"frame": t, "y": y, "x": x, "label": i})
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    cut = float(max_distance) ** 2  # squared Euclidean costs
    tracker = LapTrack(metric="sqeuclidean", cutoff=cut, gap_closing_metric="sqeuclidean",
                       gap_closing_cutoff=cut, gap_closing_max_frame_count=max_missed + 1,
                       splitting_cutoff=False, merging_cutoff=False)
    track_df, _, _ = tracker.predict_dataframe(df, ["y", "x"], only_coordinate_cols=False)
    return {(int(r.frame), int(r.label)): int(r.track_id) + 1
            for r in track_df.itertuples(index=False)}


def video_tracks(labels: np.ndarray, identity_of: Dict[Tuple[int, int], int],
                 scores: Dict[Tuple[int, int], float]):
    """``VideoTrack``s (what ``YTVISEvaluator`` takes) of label images: one track per
    identity, its frame masks the pixels of its labels.

    Args:
        labels: integer (T, H, W).
        identity_of: (t, label) -> identity.
        scores: (t, label) -> detection score; a track's score is their mean (as
            ``OnlineTracker.finish``).

    Returns:
        list[VideoTrack] by identity (category 0; boxes xyxy of the mask, pixels).
    """
    import torch

    from queryinst.video import VideoTrack
    from queryinst.video.structures import encode_mask

    T = labels.shape[0]
    by_id: Dict[int, VideoTrack] = {}
    for t, frame in enumerate(labels):
        for i in np.unique(frame):
            if not i:
                continue
            ident = identity_of[(t, int(i))]
            tr = by_id.setdefault(ident, VideoTrack(ident, 0, 0.0, [None] * T, [None] * T,
                                                    [None] * T))
            m = frame == i
            ys, xs = np.nonzero(m)
            tr.boxes[t] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                                       dtype=torch.float32)
            tr.masks[t] = encode_mask(m)
            tr.frame_scores[t] = float(scores[(t, int(i))])
    for tr in by_id.values():
        present = [s for s in tr.frame_scores if s is not None]
        tr.score = sum(present) / len(present)
    return [by_id[k] for k in sorted(by_id)]


def read_json(path: str) -> dict:
    """A json file (the bundled GT)."""
    with open(path) as f:
        return json.load(f)


# ---- the models: configs, the clip's tracks and detections, frame AP, training ----

def load_config(config_file: str, opts: Sequence[str] = ()):
    """A frozen config of this project (``merge_config``: a bad key or file raises)."""
    from detectron2.config import get_cfg

    from queryinst import add_queryinst_config
    from queryinst.config_loading import merge_config

    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, config_file, list(opts))
    cfg.freeze()
    return cfg


def load_model(cfg, weights: str):
    """The config's model in eval mode; ``weights`` "random" keeps the random (untrained)
    initialisation, otherwise the checkpoint is loaded strictly (``QueryInstCheckpointer``)."""
    import torch
    from detectron2.modeling import build_model

    from queryinst.checkpoint import QueryInstCheckpointer

    torch.manual_seed(cfg.SEED)  # a random model is the same in every run
    model = build_model(cfg).eval()
    if weights != "random":
        QueryInstCheckpointer(model, strict=True).load(weights)
    return model


def first_frames(video_name: str, image_name: str, n: int, out_dir: str) -> Tuple[str, str]:
    """Register the first ``n`` frames of a bundled clip and of its per-frame image set as
    new datasets (``<name>_first<n>``; the clip's GT json trimmed into ``out_dir``), for
    short runs. Returns their names; registering twice is a no-op."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = (f"{video_name}_first{n}", f"{image_name}_first{n}")
    if names[0] in DatasetCatalog.list():
        return names
    vmeta, imeta = MetadataCatalog.get(video_name), MetadataCatalog.get(image_name)
    gt = read_json(vmeta.json_file)
    for v in gt["videos"]:
        v["file_names"], v["length"] = v["file_names"][:n], min(n, v["length"])
    kept = []
    for a in gt["annotations"]:
        segs = a["segmentations"][:n]
        if any(s is not None for s in segs):
            kept.append({**a, "segmentations": segs, "bboxes": a["bboxes"][:n],
                         "areas": a["areas"][:n], "length": len(segs)})
    gt["annotations"] = kept
    os.makedirs(out_dir, exist_ok=True)
    json_file = os.path.join(out_dir, f"{names[0]}.json")
    with open(json_file, "w") as f:
        json.dump(gt, f)
    videos = DatasetCatalog.get(video_name)
    files = {os.path.basename(f) for v in videos for f in v["file_names"][:n]}

    def trimmed_videos():
        return [{**v, "file_names": v["file_names"][:n], "length": min(n, v["length"]),
                 "annotations": v["annotations"][:n]} for v in DatasetCatalog.get(video_name)]

    def trimmed_images():
        return [d for d in DatasetCatalog.get(image_name)
                if os.path.basename(d["file_name"]) in files]

    DatasetCatalog.register(names[0], trimmed_videos)
    DatasetCatalog.register(names[1], trimmed_images)
    keep = ("thing_classes", "thing_dataset_id_to_contiguous_id", "evaluator_type", "image_root")
    MetadataCatalog.get(names[0]).set(json_file=json_file,
                                      **{k: vmeta.get(k) for k in keep if vmeta.get(k)})
    MetadataCatalog.get(names[1]).set(**{k: imeta.get(k) for k in keep if imeta.get(k)})
    return names


def track_clip(model, cfg, dataset_name: str) -> dict:
    """Track the first video of a clip dataset through the model's own online path
    (``QueryInstVIS.detect_frame`` then its tracker's ``update``, what ``track_frame`` does)
    and keep, beside the tracks, each frame's detections as the tracker received them.

    Returns:
        {"tracks": list[VideoTrack] (``finish_video``), "detections": T lists of
        (RLE mask, score) that pass the tracker's own filter (``DET_SCORE_THRESH`` and
        ``NMS_THRESH``), "video_id", "height", "width", "num_frames"}.
    """
    import torch
    from torchvision.ops import batched_nms

    from queryinst.video import build_vis_test_loader
    from queryinst.video.structures import encode_mask

    tracker = model.tracker
    video = next(iter(build_vis_test_loader(cfg, dataset_name)))[0]
    model.start_video()
    detections = []
    with torch.no_grad():
        for image in video["image"]:
            frame = model.detect_frame({"image": image, "height": video["height"],
                                        "width": video["width"]})
            keep = torch.nonzero(frame.scores >= tracker.det_score_thresh).flatten()
            if tracker.nms_thresh > 0 and len(keep):
                nms = batched_nms(frame.pred_boxes.tensor[keep].float(),
                                  frame.scores[keep].float(), frame.pred_classes[keep],
                                  tracker.nms_thresh)
                keep = keep[nms.sort().values]
            detections.append([(encode_mask(frame.pred_masks[i]), float(frame.scores[i]))
                               for i in keep.tolist()])
            tracker.update(frame)
    return {"tracks": model.finish_video(), "detections": detections,
            "video_id": video["video_id"], "height": video["height"],
            "width": video["width"], "num_frames": len(video["image"])}


def frame_ap(model, cfg, dataset_name: str, out_dir: str) -> dict:
    """COCO box and mask AP of an image model on a per-frame dataset (Detectron2's
    ``COCOEvaluator`` through ``build_image_evaluator``; frames read by
    ``QueryInstDatasetMapper``). Returns {"bbox": {...}, "segm": {...}} in percent."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from queryinst import QueryInstDatasetMapper
    from queryinst.evaluation import build_image_evaluator

    loader = build_detection_test_loader(cfg, dataset_name,
                                         mapper=QueryInstDatasetMapper(cfg, False))
    evaluator = build_image_evaluator(cfg, dataset_name, out_dir)
    return dict(inference_on_dataset(model, loader, evaluator))


def ytvis_scores(dataset_name: str, video_id: int, tracks) -> dict:
    """``YTVISEvaluator``'s {"AP", "AP50", ..., "ID switches", "GT track-frames"} of one
    video's tracks."""
    from queryinst.video import YTVISEvaluator

    evaluator = YTVISEvaluator(dataset_name, output_dir=None, distributed=False)
    evaluator.reset()
    evaluator.process([{"video_id": video_id}], [{"tracks": tracks}])
    return dict(evaluator.evaluate()["segm"])


def ours_labels(tracks, num_frames: int, score_threshold: float, height: int, width: int):
    """Label images (T = ``num_frames``) of our tracks (label = track id + 1), frames where a
    track scores at least ``score_threshold``; with the (t, label) -> identity and score maps."""
    T = num_frames
    frames: List[List[Detection]] = [[] for _ in range(T)]
    scores = {}
    for tr in tracks:
        for t, (m, s) in enumerate(zip(tr.masks, tr.frame_scores)):
            if m is not None and s >= score_threshold:
                frames[t].append(Detection(tr.track_id + 1, m, s))
                scores[(t, tr.track_id + 1)] = s
    labels = paint_labels(frames, height, width)
    identity = {(t, int(i)): int(i) for t in range(T) for i in np.unique(labels[t]) if i}
    return labels, identity, scores


def detection_labels(detections, score_threshold: float, height: int, width: int):
    """Label images of per-frame detections (label = index in the frame + 1), those scoring
    at least ``score_threshold``; with the (t, label) -> score map."""
    frames, scores = [], {}
    for t, dets in enumerate(detections):
        kept = [Detection(k + 1, m, s) for k, (m, s) in enumerate(dets) if s >= score_threshold]
        frames.append(kept)
        scores.update({(t, d.identity): d.score for d in kept})
    return paint_labels(frames, height, width), scores


def relabel(labels: np.ndarray, identity_of: Dict[Tuple[int, int], int]) -> np.ndarray:
    """Label images with each (t, label) replaced by its identity."""
    out = np.zeros(labels.shape, np.uint16)
    for (t, i), ident in identity_of.items():
        out[t][labels[t] == i] = ident
    return out
