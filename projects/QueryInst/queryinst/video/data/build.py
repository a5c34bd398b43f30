"""Data loaders of the video model: Detectron2's loaders on video records (docs/method.md §6.1).

A video record (``load_ytvis_json``) plays the role of an image record: the training loader
samples videos (or key frames, ``INPUT.KEY_FRAME_SAMPLING`` "frame") and
``YTVISDatasetMapper`` turns each into a (key, reference) frame pair; the test loader gives
one whole video per batch.
"""
from __future__ import annotations

import logging
from typing import List

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)

from .dataset_mapper import YTVISDatasetMapper

__all__ = ["build_vis_train_loader", "build_vis_test_loader", "check_video_model",
           "has_instances", "is_video_dataset", "key_frame_records", "KEY_FRAME_SAMPLINGS"]

# INPUT.KEY_FRAME_SAMPLING: a training record per video, or per key frame (docs/method.md §6.1)
KEY_FRAME_SAMPLINGS = ("video", "frame")

logger = logging.getLogger(__name__)


def has_instances(video: dict) -> bool:
    """True if some frame of the video record has a non-crowd object."""
    return any(not obj.get("iscrowd", 0) for frame in video["annotations"] for obj in frame)


def key_frame_records(video: dict, frame_range: int) -> List[dict]:
    """One training record per frame of a video record, that frame as the key frame.

    Record t holds the frames ``t - frame_range .. t + frame_range`` of the video (clipped to
    its ends), those a reference frame may come from, with ``key_frame`` (t's index in
    them) and ``frame_offset`` (the index of their first frame in the video). The video's
    other keys (``video_id``, ``height``, ``width``, ``length``...) are kept. Detectron2's
    ``TrainingSampler`` then shuffles key frames, so each frame is a key once an epoch
    (MaskTrack R-CNN indexes its training set by frame so), where a record per video draws
    the key anew each time and leaves some frames unseen in a short schedule.

    Args:
        video (dict): a video record of ``load_ytvis_json`` (``file_names`` and
            ``annotations``, one list entry per frame).
        frame_range (int): ``INPUT.SAMPLING_FRAME_RANGE`` (>= 0).

    Returns:
        list[dict]: T records, in frame order.

    Raises:
        ValueError: ``frame_range`` < 0.
    """
    if frame_range < 0:
        raise ValueError(f"INPUT.SAMPLING_FRAME_RANGE must be >= 0, got {frame_range}")
    length = len(video["file_names"])
    shared = {k: v for k, v in video.items() if k not in ("file_names", "annotations")}
    shared.setdefault("length", length)
    records = []
    for t in range(length):
        lo, hi = max(0, t - frame_range), min(length, t + frame_range + 1)
        records.append({**shared, "file_names": video["file_names"][lo:hi],
                        "annotations": video["annotations"][lo:hi],
                        "key_frame": t - lo, "frame_offset": lo})
    return records


def build_vis_train_loader(cfg):
    """Detectron2's training loader over the videos of ``DATASETS.TRAIN``.

    Videos without any non-crowd object are dropped (they give no pair to learn from), in
    place of Detectron2's image filter ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``, which reads
    image records. Batches hold ``SOLVER.IMS_PER_BATCH`` records, i.e. twice as many frames.
    With ``INPUT.KEY_FRAME_SAMPLING`` "frame" each video gives a record per frame
    (:func:`key_frame_records`), "video" one record.

    Raises:
        ValueError: no video of the training sets has an object; an unknown
            ``INPUT.KEY_FRAME_SAMPLING``.
    """
    sampling = cfg.INPUT.KEY_FRAME_SAMPLING
    if sampling not in KEY_FRAME_SAMPLINGS:
        raise ValueError(f"INPUT.KEY_FRAME_SAMPLING must be one of {KEY_FRAME_SAMPLINGS}, "
                         f"got {sampling!r}")
    videos = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
    kept = [v for v in videos if has_instances(v)]
    if len(kept) < len(videos):
        logger.info("Dropped %d of %d training videos without objects.",
                    len(videos) - len(kept), len(videos))
    if not kept:
        raise ValueError(f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: no video has an object "
                         "annotation to train on")
    if sampling == "frame":
        kept = [r for v in kept for r in key_frame_records(v, cfg.INPUT.SAMPLING_FRAME_RANGE)]
    return build_detection_train_loader(cfg, dataset=kept, mapper=YTVISDatasetMapper(cfg, True))


def build_vis_test_loader(cfg, dataset_name: str):
    """Detectron2's test loader, one whole video (all its frames) per batch."""
    return build_detection_test_loader(cfg, dataset_name, mapper=YTVISDatasetMapper(cfg, False))


def is_video_dataset(name: str) -> bool:
    """True for datasets registered by ``register_ytvis_instances`` (evaluator_type "ytvis")."""
    return MetadataCatalog.get(name).get("evaluator_type", None) == "ytvis"


def check_video_model(cfg) -> None:
    """Video datasets and the model must agree: ``QueryInstVIS`` trains and tests on videos.

    Raises:
        ValueError: a video dataset with an image meta-architecture (or the reverse in
            ``DATASETS.TRAIN``), naming the keys and the fix.
    """
    video_model = cfg.MODEL.META_ARCHITECTURE == "QueryInstVIS"
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if is_video_dataset(name) and not video_model:
                raise ValueError(
                    f"DATASETS.{key} names the video dataset '{name}', but "
                    f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}: set "
                    "MODEL.META_ARCHITECTURE QueryInstVIS (with an image checkpoint also "
                    "MODEL.QUERYINST_VIS.TRACK_HEAD.ON False MODEL.QUERYINST_VIS.TRACKER "
                    "QueryCosineTracker), or use a config of configs/youtube_vis/")
            if key == "TRAIN" and video_model and not is_video_dataset(name):
                raise ValueError(
                    f"DATASETS.TRAIN names the image dataset '{name}', but QueryInstVIS "
                    "trains on videos (datasets registered with register_ytvis_instances)")
