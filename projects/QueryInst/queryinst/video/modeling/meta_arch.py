"""QueryInst-VIS: QueryInst plus a track head and an online tracker (docs/method.md §6).

Each frame is segmented by the unchanged image model; the tracker then links the frame's
detections to the tracks of earlier frames through an embedding of their object queries.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Instances
from torch import nn

from ...modeling.meta_arch.queryinst import QueryInst, queryinst_postprocess
from .track_head import TrackHead, track_match_loss, track_match_targets
from .tracker import OnlineTracker, build_tracker

__all__ = ["QueryInstVIS", "one_detection_per_query"]


def one_detection_per_query(results: Instances, score_thresh: float) -> Instances:
    """Keep each query's best-scoring detection, if it scores at least ``score_thresh``.

    QueryInst's top-k over (queries x classes) may list one query several times with
    different classes; a track follows one object, so the tracker sees one detection per
    query (docs/method.md §6.2).

    Args:
        results: one image's detections sorted by descending score, with ``query_indices``.
        score_thresh: minimum score (``MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH``).

    Returns:
        Instances: the kept rows, in the same (score) order.
    """
    queries = results.query_indices.tolist()
    seen, keep = set(), []
    for row, (query, score) in enumerate(zip(queries, results.scores.tolist())):
        if query not in seen and score >= score_thresh:
            keep.append(row)
        seen.add(query)
    return results[torch.as_tensor(keep, dtype=torch.int64, device=results.scores.device)]


@META_ARCH_REGISTRY.register()
class QueryInstVIS(QueryInst):
    """QueryInst for video instance segmentation, online (paper §4, YouTube-VIS; docs/method.md §6).

    Training input: ``list[dict]``, one per video, with "image" = [key frame, reference
    frame] (C, H, W) tensors and "instances" = their Instances with ``gt_ids``
    (``YTVISDatasetMapper``). Losses: QueryInst's image losses on both frames (on the key
    frame only if ``supervise_reference_frame`` is False) plus ``loss_track`` (the track
    head's matching cross-entropy, key -> reference).

    Inference input: one dict per video with "image" = the T frames, "height", "width"
    (original size). Output per video: {"tracks": list[VideoTrack], "image_size": (height,
    width), "num_frames": T}. A dict whose "image" is a single tensor is segmented as an image
    (QueryInst's output), so image datasets still evaluate. Frame by frame tracking is also
    available as :meth:`start_video`, :meth:`track_frame`, :meth:`finish_video` (the demo's
    streaming use).
    """

    @configurable
    def __init__(
        self,
        *,
        tracker: OnlineTracker,
        track_head: nn.Module | None = None,
        track_loss_weight: float = 1.0,
        det_score_thresh: float = 0.05,
        supervise_reference_frame: bool = True,
        **kwargs,
    ):
        """
        Args:
            tracker: the online tracker (``build_tracker``).
            track_head: the ``TrackHead``, or None (then the tracker must compare raw
                queries, as ``QueryCosineTracker`` does).
            track_loss_weight: weight of ``loss_track``.
            det_score_thresh: detections below this score are neither tracked nor pasted.
            supervise_reference_frame: whether the reference frame of each training pair
                takes the image losses (True) or only runs forward, under no_grad, for the
                track loss (False; ``MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME``).
            kwargs: ``QueryInst``'s arguments.

        Raises:
            ValueError: a tracker that compares track-head embeddings without a track head.
        """
        super().__init__(**kwargs)
        if track_head is None and tracker.uses_track_head:
            raise ValueError(
                f"MODEL.QUERYINST_VIS.TRACKER {type(tracker).__name__} compares track-head "
                "embeddings, but MODEL.QUERYINST_VIS.TRACK_HEAD.ON is False: turn the head on "
                "or use TRACKER QueryCosineTracker"
            )
        self.tracker = tracker
        self.track_head = track_head
        self.track_loss_weight = track_loss_weight
        self.det_score_thresh = det_score_thresh
        self.supervise_reference_frame = supervise_reference_frame

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        vis = cfg.MODEL.QUERYINST_VIS
        ret["tracker"] = build_tracker(cfg)
        if vis.TRACK_HEAD.ON:
            ret["track_head"] = TrackHead(
                cfg.MODEL.QUERYINST.HIDDEN_DIM, vis.TRACK_HEAD.EMBED_DIM, vis.TRACK_HEAD.NUM_FCS
            )
        ret["track_loss_weight"] = vis.TRACK_HEAD.LOSS_WEIGHT
        ret["det_score_thresh"] = vis.TRACKING.DET_SCORE_THRESH
        ret["supervise_reference_frame"] = vis.SUPERVISE_REFERENCE_FRAME
        return ret

    def _stages(self, batched_inputs):
        """Backbone, proposals and box stages of a list of frames: (images, features, stages)."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _ = self.proposal_generator(images, features, None)
        features = self.roi_heads.pooled_features(features)
        return images, features, self.roi_heads.forward_stages(features, proposals)

    def training_losses(self, batched_inputs) -> dict:
        """Losses of a batch of (key, reference) frame pairs (see the class); ``forward``
        (QueryInst's) runs this under ``MODEL.QUERYINST.TRAIN_DTYPE`` in training and
        :meth:`inference` otherwise. With ``supervise_reference_frame`` False only the key
        frames take the image losses (:meth:`_key_frame_losses`).

        Raises:
            ValueError: an input without exactly two images and two Instances.
        """
        frames = [
            {"image": image, "instances": instances}
            for video in batched_inputs
            for image, instances in zip(video["image"], video["instances"])
        ]
        if len(frames) != 2 * len(batched_inputs):
            raise ValueError("QueryInstVIS trains on (key, reference) frame pairs: each input "
                             "needs two images and two Instances (YTVISDatasetMapper)")
        targets = [f["instances"].to(self.device) for f in frames]
        if not self.supervise_reference_frame:
            return self._key_frame_losses(frames[0::2], frames[1::2], targets)
        losses, last_stage, last_matches = self._image_losses(frames, targets)
        if self.track_head is not None:
            embeds = self.track_head(last_stage.object_feats)  # (2B, N, E)
            losses["loss_track"] = self.track_loss(
                embeds[0::2], embeds[1::2], targets[0::2], targets[1::2],
                last_matches[0::2], last_matches[1::2],
            )
        return losses

    def _image_losses(self, frames: list[dict], targets: list[Instances]):
        """QueryInst's image losses of ``frames`` (docs/method.md §2), with the last stage
        and its Hungarian matches (one (query indices, GT indices) per frame) for the track
        loss."""
        _, features, stages = self._stages(frames)
        matches = self.roi_heads.match(stages, targets)
        losses = self.roi_heads.losses(stages, features, targets, matches)
        return losses, stages[-1], matches[-1]

    def _key_frame_losses(self, keys: list[dict], refs: list[dict], targets: list) -> dict:
        """Image losses of the key frames only; the reference frames run forward under
        no_grad, for the track loss's targets alone (``SUPERVISE_REFERENCE_FRAME`` False,
        docs/method.md §6.1).

        Args:
            keys, refs: B frame dicts each ("image", "instances").
            targets: the 2B frames' Instances on the model's device, key_0, ref_0, key_1, ...
        """
        losses, last_stage, last_matches = self._image_losses(keys, targets[0::2])
        if self.track_head is not None:
            with torch.no_grad():
                ref_stage = self._stages(refs)[2][-1]
                ref_matches = self.roi_heads.match([ref_stage], targets[1::2])[0]
                ref_embeds = self.track_head(ref_stage.object_feats)
            losses["loss_track"] = self.track_loss(
                self.track_head(last_stage.object_feats), ref_embeds, targets[0::2],
                targets[1::2], last_matches, ref_matches,
            )
        return losses

    def track_loss(
        self, key_embeds, ref_embeds, key_targets: list[Instances],
        ref_targets: list[Instances], key_indices: list, ref_indices: list,
    ) -> torch.Tensor:
        """The track head's loss over the (key, reference) pairs of a batch (docs/method.md §6.1).

        Args:
            key_embeds, ref_embeds: float (B, N, E) track-head embeddings of the last stage's
                object queries of the key frames and of the reference frames.
            key_targets, ref_targets: the B key and the B reference frames' Instances with
                ``gt_ids``.
            key_indices, ref_indices: the last stage's Hungarian matches of the B key and the
                B reference frames: per frame (query indices, GT indices).

        Returns:
            Tensor: scalar, weight x (summed cross-entropy / number of supervised key
            queries, at least 1).
        """
        total, count = key_embeds.new_zeros(()), 0
        pairs = zip(key_embeds, ref_embeds, key_targets, ref_targets, key_indices, ref_indices)
        for key_embed, ref_embed, key_target, ref_target, key, ref in pairs:
            match = track_match_targets(
                key_embeds.shape[1], key, key_target.gt_ids, ref, ref_target.gt_ids
            )
            loss, n = track_match_loss(key_embed, ref_embed[ref[0]], match)
            total, count = total + loss, count + n
        return self.track_loss_weight * total / max(count, 1)

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        """Tracks for video inputs ("image" a list of frames), QueryInst's output for images."""
        if not isinstance(batched_inputs[0]["image"], (list, tuple)):
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        return [self.inference_video(video) for video in batched_inputs]

    def inference_video(self, video: dict) -> dict:
        """Track one video online, frame after frame (docs/method.md §6.2-6.3).

        Args:
            video: "image" (T tensors (C, H, W) in ``INPUT.FORMAT``), "height", "width"
                (original frame size, pixels).

        Returns:
            dict: "tracks" (list[VideoTrack] in original-frame pixels), "image_size"
            (height, width), "num_frames" T.
        """
        self.start_video()
        height, width = video["height"], video["width"]
        for image in video["image"]:
            self.track_frame({"image": image, "height": height, "width": width})
        return {"tracks": self.finish_video(), "image_size": (height, width),
                "num_frames": len(video["image"])}

    def start_video(self) -> None:
        """Forget all tracks: the next :meth:`track_frame` is frame 0 of a new video."""
        self.tracker.reset()

    def frame_detections(self, frame: dict) -> Instances:
        """The image model's top-k detections of one frame, each with the track embedding
        of its query, in the resized input's pixels (no pasting, no score filter).

        What :meth:`detect_frame` filters and pastes, and what an exported QueryInstVIS
        graph computes (``queryinst.export``: its ``query_indices`` and
        ``track_embeddings`` outputs). Runs under the image model's inference speed-ups
        (``QueryInst.fast_inference``; nothing applies while tracing).

        Args:
            frame: "image" (C, H, W) tensor in ``INPUT.FORMAT``.

        Returns:
            Instances: of the input's size, k = ``MODEL.QUERYINST.TEST_TOPK`` rows by
            descending score: ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks``
            (float (k, 1, M, M) probabilities), ``query_indices`` and ``track_embeddings``
            (float32 (k, E): track-head embeddings of the row's query, or the raw last-stage
            query (k, D) for a tracker that compares queries).
        """
        with self.fast_inference(self.device):
            images, features, stages = self._stages([frame])
            results = self.roi_heads.inference(stages, features, images.image_sizes)[0]
            queries = stages[-1].object_feats[0][results.query_indices]
            embeddings = self.track_head(queries) if self.tracker.uses_track_head else queries
        results.track_embeddings = embeddings.float()
        return results

    @torch.no_grad()
    def detect_frame(self, frame: dict) -> Instances:
        """The image model's part of :meth:`track_frame`: one detection per query above
        ``det_score_thresh``, with ``track_embeddings`` for the tracker.

        Args:
            frame: "image" (C, H, W) tensor and optional "height", "width" (output size).

        Returns:
            Instances: ``pred_boxes``, ``scores``, ``pred_classes``, ``pred_masks`` (bool
            (R, H, W), the image model's masks), ``query_indices`` and ``track_embeddings``
            (float (R, E): track-head embeddings, or the raw last-stage queries (R, D) for a
            tracker that compares queries), in output pixels.
        """
        # Pasting stays outside the speed-ups, in fp32 (as QueryInst.inference).
        results = one_detection_per_query(self.frame_detections(frame), self.det_score_thresh)
        size = results.image_size
        return queryinst_postprocess(
            results, frame.get("height", size[0]), frame.get("width", size[1])
        )

    @torch.no_grad()
    def track_frame(self, frame: dict) -> Instances:
        """Segment one frame with the image model and extend the tracks.

        Args:
            frame: as :meth:`detect_frame`.

        Returns:
            Instances: the frame's tracked detections (:meth:`detect_frame`'s fields) with
            ``track_ids`` (int64).
        """
        return self.tracker.update(self.detect_frame(frame))

    def finish_video(self):
        """list[VideoTrack]: every track of the frames seen since :meth:`start_video`."""
        return self.tracker.finish()
