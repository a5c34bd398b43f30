"""Online trackers: link one frame's detections to the tracks of the frames before
(docs/method.md §6.2).

A tracker is a small state object, separate from the network: ``reset()`` at the start of a
video, ``update(frame)`` once per frame with that frame's detections, ``finish()`` for the
tracks. Two association rules are registered in ``TRACKER_REGISTRY``:

- ``EmbeddingTracker``: track-head embeddings scored as in MaskTrack R-CNN (Yang et al.,
  "Video Instance Segmentation", ICCV 2019): a softmax over a "new object" slot and the
  tracks.
- ``QueryCosineTracker``: cosine similarity of the last stage's object queries, which needs
  no training (MinVIS, Huang et al., "MinVIS: A Minimal Video Instance Segmentation
  Framework without Video-based Training", NeurIPS 2022).

Both add MaskTrack R-CNN's cues to the embedding match ``m`` of a detection and a track:

    total = m + SCORE_WEIGHT * log(score) + IOU_WEIGHT * IoU(track's last box, box)
              + LABEL_WEIGHT * [same class]

and assign detections to tracks one to one (Hungarian) among the allowed pairs only.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Instances
from detectron2.utils.registry import Registry
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from ..structures import VideoTrack, encode_mask

__all__ = [
    "TRACKER_REGISTRY",
    "build_tracker",
    "assign_allowed",
    "OnlineTracker",
    "EmbeddingTracker",
    "QueryCosineTracker",
]

TRACKER_REGISTRY = Registry("QUERYINST_TRACKER")
TRACKER_REGISTRY.__doc__ = """
Online trackers of QueryInst-VIS (docs/method.md §6.2), selected by
``cfg.MODEL.QUERYINST_VIS.TRACKER``. A registered class is an ``OnlineTracker`` subclass and is
called with the config: ``cls(cfg)``.
"""

# Floor of a detection score before its logarithm, so that a zero score (possible when
# DET_SCORE_THRESH is 0) gives a finite, very low score term (log(1e-6) = -13.8) rather than -inf.
_MIN_SCORE = 1e-6


def build_tracker(cfg) -> "OnlineTracker":
    """The tracker named by ``cfg.MODEL.QUERYINST_VIS.TRACKER``, built from ``cfg``.

    Raises:
        ValueError: the name is not in ``TRACKER_REGISTRY``; the message lists the
            registered names.
    """
    name = cfg.MODEL.QUERYINST_VIS.TRACKER
    if name not in TRACKER_REGISTRY:
        known = ", ".join(sorted(k for k, _ in TRACKER_REGISTRY))
        raise ValueError(
            f"MODEL.QUERYINST_VIS.TRACKER = {name!r} is not a registered tracker; "
            f"registered trackers: {known}"
        )
    return TRACKER_REGISTRY.get(name)(cfg)


def assign_allowed(scores: np.ndarray, allowed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment of rows to columns that uses allowed pairs only.

    Among the matchings made of allowed pairs, it returns one with the most pairs and, among
    those, the largest sum of ``scores``. (So a detection that may continue a track does so
    even when its total score is negative, as in MaskTrack R-CNN, where the best allowed
    track wins whatever its sign.) Solved by ``scipy.optimize.linear_sum_assignment`` on a
    cost matrix where a disallowed pair costs more than any set of allowed pairs could gain;
    disallowed pairs the solver is forced to use are dropped.

    Args:
        scores: float array of shape (D, N), the pairs' scores (higher is better); entries of
            disallowed pairs are ignored and may be anything, NaN included.
        allowed: bool array of shape (D, N). A pair whose score is not finite is treated as
            disallowed.

    Returns:
        (rows, cols): int64 arrays of the same length P <= min(D, N), the assigned pairs,
        rows ascending; every row and every column appears at most once.
    """
    scores = np.asarray(scores, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=bool) & np.isfinite(scores)
    empty = np.zeros(0, dtype=np.int64)
    if not allowed.any():
        return empty, empty
    cost = np.where(allowed, -scores, 0.0)
    real = cost[allowed]
    lo, hi = real.min(), real.max()
    # Any matching's allowed pairs sum to within k * (hi - lo) of any other's of the same size
    # (k = min(D, N) pairs at most), so a penalty above that makes one more allowed pair
    # always worth more than any change of the others.
    k = min(cost.shape)
    penalty = hi + (hi - lo + 1.0) * (k + 1)
    cost = np.where(allowed, cost, penalty)
    rows, cols = linear_sum_assignment(cost)
    keep = allowed[rows, cols]
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


class OnlineTracker:
    """Frame-by-frame tracker with MaskTrack R-CNN's association score (docs/method.md §6.2).

    Subclasses define the embedding match ``m`` (``match_scores``). For each frame:

    1. Tracks not matched for more than ``max_missed`` consecutive frames end: they are kept
       for ``finish()`` but can no longer be matched. A track missed for up to ``max_missed``
       frames (an occlusion) can still take a detection.
    2. Detections with score below ``det_score_thresh`` are ignored.
    3. The total score of every (detection, live track) pair is
       ``m + score_weight * log(score) + iou_weight * IoU(track's last box, box)
       + label_weight * [class == track's last class]``; detections are assigned to tracks
       one to one over the pairs the subclass allows (``assign_allowed``: most pairs, then
       highest total).
    4. Unassigned detections scoring at least ``init_score_thresh`` start new tracks; ids
       are 0, 1, 2, ... in order of birth, births of one frame in order of descending score
       (input order on ties). Other unassigned detections are dropped.
    5. A matched track takes the detection's embedding, box and class as its latest ones.

    All tensors of a video must be on one device (CPU or CUDA); the score matrix is moved to
    the CPU for scipy. Masks and boxes are stored, never modified.

    Attributes:
        uses_track_head: whether ``track_embeddings`` must be track-head embeddings (True)
            or the raw last-stage object queries (False); ``QueryInstVIS`` supplies them.
        keep_masks: whether ``finish()`` returns the masks (True, default), kept as
            compressed RLE (pycocotools) from the moment ``update`` returns: the history
            grows by the frame's RLE strings plus boxes, scores, classes and ids, never by
            dense masks or embeddings. Set it to False for endless streams (a webcam) whose
            tracks are only drawn frame by frame: then no mask is kept at all.
    """

    uses_track_head = True
    keep_masks = True

    @configurable
    def __init__(
        self,
        *,
        score_weight: float = 1.0,
        iou_weight: float = 2.0,
        label_weight: float = 10.0,
        det_score_thresh: float = 0.05,
        init_score_thresh: float = 0.3,
        max_missed: int = 5,
        min_iou: float = 0.0,
        nms_thresh: float = 0.0,
    ):
        """
        Args:
            score_weight: weight of log(detection score).
            iou_weight: weight of the IoU of the track's last box and the detection's box.
            label_weight: bonus added when the detection's class equals the track's last one.
            det_score_thresh: detections scoring below this are ignored.
            init_score_thresh: an unmatched detection starts a track only if it scores at
                least this.
            max_missed: K; a track ends once it has gone more than K consecutive frames
                without a detection.
            min_iou: a pair is allowed only if the IoU of the track's last box and the
                detection's box is at least this (a motion gate; 0 = off).
            nms_thresh: before association, a detection whose box has IoU above this with a
                higher-scoring detection of its class is ignored (torchvision's
                ``batched_nms``); 0 = off (QueryInst itself predicts without NMS).

        Raises:
            ValueError: ``max_missed`` is negative or not an integer.
        """
        if int(max_missed) != max_missed or max_missed < 0:
            raise ValueError(f"max_missed must be an integer >= 0, got {max_missed!r}")
        self.score_weight = float(score_weight)
        self.iou_weight = float(iou_weight)
        self.label_weight = float(label_weight)
        self.det_score_thresh = float(det_score_thresh)
        self.init_score_thresh = float(init_score_thresh)
        self.max_missed = int(max_missed)
        self.min_iou = float(min_iou)
        self.nms_thresh = float(nms_thresh)
        self.reset()

    @classmethod
    def from_config(cls, cfg) -> dict:
        """The arguments from ``MODEL.QUERYINST_VIS.TRACKING`` (queryinst/video/config.py)."""
        t = cfg.MODEL.QUERYINST_VIS.TRACKING
        return {
            "score_weight": t.SCORE_WEIGHT,
            "iou_weight": t.IOU_WEIGHT,
            "label_weight": t.LABEL_WEIGHT,
            "det_score_thresh": t.DET_SCORE_THRESH,
            "init_score_thresh": t.INIT_SCORE_THRESH,
            "max_missed": t.MAX_MISSED,
            "min_iou": t.MIN_IOU,
            "nms_thresh": t.NMS_THRESH,
        }

    # ----------------------------------------------------------------------------- subclass
    def match_scores(
        self, det_embeddings: Tensor, track_embeddings: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Embedding match of every detection with every live track.

        Args:
            det_embeddings: float tensor of shape (D, E).
            track_embeddings: float tensor of shape (N, E), N >= 1.

        Returns:
            (m, allowed): float tensor (D, N), the match term of the total score, and bool
            tensor (D, N), the pairs that may be assigned.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every track: start a new video."""
        self._num_frames = 0
        self._next_id = 0
        # Live tracks, one row each: ids (python ints), latest embedding (N, E), last box
        # (N, 4) xyxy px, last class (N,) int64, index of the last frame matched.
        self._ids: List[int] = []
        self._emb: Optional[Tensor] = None
        self._boxes: Optional[Tensor] = None
        self._labels: Optional[Tensor] = None
        self._last_seen: List[int] = []
        # Per frame: the tracked detections' boxes, scores, classes and track_ids, and (if
        # keep_masks and the frame has masks) their masks as compressed RLE, else None.
        self._history: List[Instances] = []
        self._history_rles: List[Optional[List[dict]]] = []

    @property
    def num_frames(self) -> int:
        """Number of frames given to ``update`` since ``reset()``."""
        return self._num_frames

    def association_scores(
        self, det_embeddings: Tensor, det_boxes: Tensor, det_scores: Tensor, det_classes: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Total association scores of detections with the current live tracks.

        Args:
            det_embeddings: float tensor (D, E).
            det_boxes: float tensor (D, 4), xyxy in original-frame pixels.
            det_scores: float tensor (D,), in (0, 1]; floored at 1e-6 before the logarithm.
            det_classes: int64 tensor (D,).

        Returns:
            (total, allowed): float tensor (D, N) and bool tensor (D, N), N >= 1 the number of
            tracks held (call after ``update`` has ended the stale ones, as ``update`` does).
            Needs at least one track (after the first ``update`` that started one).
        """
        m, allowed = self.match_scores(det_embeddings, self._emb)
        iou = box_iou(det_boxes.float(), self._boxes.float())
        total = (
            m
            + self.score_weight * det_scores.float().clamp(min=_MIN_SCORE).log()[:, None]
            + self.iou_weight * iou
            + self.label_weight * (det_classes[:, None] == self._labels[None, :]).float()
        )
        if self.min_iou > 0:
            allowed = allowed & (iou >= self.min_iou)
        return total, allowed

    def update(self, frame: Instances) -> Instances:
        """Track one frame's detections.

        Args:
            frame: the frame's detections (one per query), with fields ``pred_boxes`` (Boxes,
                xyxy in original-frame pixels), ``scores`` (float (R,)), ``pred_classes``
                (int64 (R,)), ``track_embeddings`` (float (R, E), what the association
                compares) and optionally ``pred_masks`` (bool (R, H, W)).

        Returns:
            Instances: the rows of ``frame`` that belong to a track this frame (continued or
            new), in input order, with every field of ``frame`` plus ``track_ids`` (int64
            (R',), on the frame's device).

        Raises:
            ValueError: a required field is missing, or the embedding width differs from
                that of the video's earlier frames.
        """
        for name in ("pred_boxes", "scores", "pred_classes", "track_embeddings"):
            if not frame.has(name):
                raise ValueError(
                    f"{type(self).__name__}.update: the frame's Instances lack {name!r} "
                    f"(has {sorted(frame.get_fields())})"
                )
        t = self._num_frames
        self._end_stale_tracks(t)

        scores = frame.scores.detach()
        device = scores.device
        det_idx = torch.nonzero(scores >= self.det_score_thresh).flatten()
        if self.nms_thresh > 0 and len(det_idx):
            keep = batched_nms(frame.pred_boxes.tensor.detach()[det_idx].float(),
                               scores[det_idx].float(), frame.pred_classes[det_idx],
                               self.nms_thresh)
            det_idx = det_idx[keep.sort().values]  # input order
        emb = frame.track_embeddings.detach()[det_idx]
        boxes = frame.pred_boxes.tensor.detach()[det_idx]
        classes = frame.pred_classes[det_idx]
        det_scores = scores[det_idx]
        if self._emb is not None and emb.shape[1] != self._emb.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.update: embeddings of width {emb.shape[1]} in frame {t}, "
                f"the video's tracks have width {self._emb.shape[1]}"
            )
        D, N = len(det_idx), len(self._ids)
        det_scores_cpu = det_scores.tolist()

        assigned: List[Tuple[int, int]] = []  # (detection index among the kept D, track row)
        if D and N:
            total, allowed = self.association_scores(emb, boxes, det_scores, classes)
            rows, cols = assign_allowed(total.cpu().numpy(), allowed.cpu().numpy())
            assigned = list(zip(rows.tolist(), cols.tolist()))

        matched = set(r for r, _ in assigned)
        newborn = [
            d for d in range(D) if d not in matched and det_scores_cpu[d] >= self.init_score_thresh
        ]
        newborn.sort(key=lambda d: -det_scores_cpu[d])  # stable: input order on ties

        # Update the live tracks (latest embedding, box, class) and add the newborn.
        ids_of = {}
        if assigned:
            r = torch.as_tensor([a for a, _ in assigned], device=device)
            c = torch.as_tensor([b for _, b in assigned], device=device)
            self._emb[c] = emb[r].to(self._emb.dtype)
            self._boxes[c] = boxes[r].to(self._boxes.dtype)
            self._labels[c] = classes[r]
            for d, row in assigned:
                self._last_seen[row] = t
                ids_of[d] = self._ids[row]
        if newborn:
            nb = torch.as_tensor(newborn, device=device)
            new = (emb[nb], boxes[nb], classes[nb])
            if self._emb is None:
                self._emb, self._boxes, self._labels = (x.clone() for x in new)
            else:
                self._emb = torch.cat([self._emb, new[0].to(self._emb.dtype)])
                self._boxes = torch.cat([self._boxes, new[1].to(self._boxes.dtype)])
                self._labels = torch.cat([self._labels, new[2]])
            for d in newborn:
                ids_of[d] = self._next_id
                self._ids.append(self._next_id)
                self._last_seen.append(t)
                self._next_id += 1

        kept = sorted(ids_of)  # input order (det_idx is ascending)
        out = frame[det_idx[torch.as_tensor(kept, dtype=torch.long, device=device)]]
        track_ids = [ids_of[d] for d in kept]
        out.track_ids = torch.as_tensor(track_ids, dtype=torch.int64, device=device)
        self._history.append(Instances(out.image_size, pred_boxes=out.pred_boxes,
                                       scores=out.scores, pred_classes=out.pred_classes,
                                       track_ids=out.track_ids))
        self._history_rles.append([encode_mask(m) for m in out.pred_masks]
                                  if self.keep_masks and out.has("pred_masks") else None)
        self._num_frames = t + 1
        return out

    def _end_stale_tracks(self, t: int) -> None:
        """Drop from the live rows the tracks missed for more than max_missed frames before t."""
        live = [i for i, s in enumerate(self._last_seen) if t - s - 1 <= self.max_missed]
        if len(live) == len(self._ids):
            return
        self._ids = [self._ids[i] for i in live]
        self._last_seen = [self._last_seen[i] for i in live]
        if live:
            idx = torch.as_tensor(live, device=self._emb.device)
            self._emb, self._boxes = self._emb[idx], self._boxes[idx]
            self._labels = self._labels[idx]
        else:
            self._emb = self._boxes = self._labels = None

    def finish(self) -> List[VideoTrack]:
        """Every track of the frames seen since ``reset()`` (ended ones too), by id.

        Each track has T = ``num_frames`` entries in ``boxes`` (float (4,) xyxy px),
        ``masks`` (compressed RLE dicts of the bool (H, W) masks, see
        :func:`~queryinst.video.structures.decode_mask`; None for every frame if the frames
        had no ``pred_masks`` or ``keep_masks`` is False) and ``frame_scores`` (float), None
        where it is absent. Boxes are rows of the Instances that ``update`` returned (same
        values as the input, same device); masks decode to exactly the returned masks.
        ``category`` is the class with the largest sum of the track's detection scores (the
        smaller class index on ties); ``score`` is the mean detection score over the frames
        where it is present. The tracker's state is left as it is.
        """
        T = self._num_frames
        tracks = [
            VideoTrack(track_id=i, category=-1, score=0.0, boxes=[None] * T,
                       masks=[None] * T, frame_scores=[None] * T)
            for i in range(self._next_id)
        ]
        votes = [dict() for _ in tracks]
        for t, (out, rles) in enumerate(zip(self._history, self._history_rles)):
            rows = zip(out.track_ids.tolist(), out.scores.tolist(), out.pred_classes.tolist())
            for row, (i, s, c) in enumerate(rows):
                tr = tracks[i]
                tr.boxes[t] = out.pred_boxes.tensor[row]
                if rles is not None:
                    tr.masks[t] = rles[row]
                tr.frame_scores[t] = s
                votes[i][c] = votes[i].get(c, 0.0) + s
        for tr, vote in zip(tracks, votes):
            present = [s for s in tr.frame_scores if s is not None]
            tr.score = math.fsum(present) / len(present)
            tr.category = int(max(vote.items(), key=lambda kv: (kv[1], -kv[0]))[0])
        return tracks


@TRACKER_REGISTRY.register()
class EmbeddingTracker(OnlineTracker):
    """MaskTrack R-CNN's association of track-head embeddings (Yang et al., ICCV 2019).

    For detection i with embedding d_i and live tracks j with embeddings t_j, the logits are
    ``[0, d_i . t_1, ..., d_i . t_N]`` (slot 0 is "new object", logit 0) and
    ``m[i, j] = log_softmax(logits)[1 + j]``. A pair is allowed only when its column beats
    the new-object slot, i.e. ``d_i . t_j > 0``.
    """

    def match_scores(
        self, det_embeddings: Tensor, track_embeddings: Tensor
    ) -> Tuple[Tensor, Tensor]:
        dots = det_embeddings.float() @ track_embeddings.float().T  # (D, N)
        logits = torch.cat([dots.new_zeros(dots.shape[0], 1), dots], dim=1)
        return logits.log_softmax(dim=1)[:, 1:], dots > 0


@TRACKER_REGISTRY.register()
class QueryCosineTracker(OnlineTracker):
    """Training-free association by the cosine similarity of object queries (MinVIS, Huang et
    al., NeurIPS 2022): ``m[i, j] = cos(q_i, q_j)``, allowed when ``m >= cosine_thresh``.
    """

    uses_track_head = False  # compares the raw object queries

    @configurable
    def __init__(self, *, cosine_thresh: float = 0.5, **kwargs):
        """
        Args:
            cosine_thresh: a pair is allowed only when the cosine similarity of the
                detection's query and the track's latest query is at least this (in [-1, 1]).
            kwargs: the arguments of ``OnlineTracker``.
        """
        self.cosine_thresh = float(cosine_thresh)
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """The base arguments plus ``MODEL.QUERYINST_VIS.TRACKING.COSINE_THRESH``."""
        ret = super().from_config(cfg)
        ret["cosine_thresh"] = cfg.MODEL.QUERYINST_VIS.TRACKING.COSINE_THRESH
        return ret

    def match_scores(
        self, det_embeddings: Tensor, track_embeddings: Tensor
    ) -> Tuple[Tensor, Tensor]:
        det = F.normalize(det_embeddings.float(), dim=1)
        cos = det @ F.normalize(track_embeddings.float(), dim=1).T  # (D, N)
        return cos, cos >= self.cosine_thresh
