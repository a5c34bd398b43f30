"""What the video model returns: tracks (docs/method.md §6.3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor

__all__ = ["VideoTrack", "decode_mask", "encode_mask", "tracks_to_json"]


@dataclass
class VideoTrack:
    """One tracked instance over a video of T frames.

    Attributes:
        track_id: int, unique within the video (0, 1, ... in order of birth).
        category: contiguous class index (0..C-1), the score-weighted vote of its detections.
        score: mean detection score over the frames where the track is present.
        boxes: T entries, float (4,) absolute xyxy in original-frame pixels, or None where
            the track is absent.
        masks: T entries, the frame's (H, W) mask in original-frame pixels as a compressed
            RLE dict (pycocotools; ``counts`` str, see :func:`encode_mask`, and
            :func:`decode_mask`), or None where absent (all None for box-only models). RLE
            keeps long videos in bounded memory: a track of T frames holds T small strings,
            not T dense masks.
        frame_scores: T entries, the detection score of the frame, or None where absent.
    """

    track_id: int
    category: int
    score: float
    boxes: List[Optional[Tensor]] = field(default_factory=list)
    masks: List[Optional[Tensor]] = field(default_factory=list)
    frame_scores: List[Optional[float]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """T, the length of the video."""
        return len(self.boxes)

    def present(self) -> List[int]:
        """Indices of the frames where the track has a detection."""
        return [t for t, b in enumerate(self.boxes) if b is not None]


def encode_mask(mask) -> dict:
    """A bool (H, W) mask (tensor or array) as a COCO compressed RLE with ``counts`` as str
    (json-ready), by pycocotools. An RLE dict (``size``, ``counts``) is returned as it is.

    Raises:
        ValueError: the mask is not 2-D.
    """
    import numpy as np
    from pycocotools import mask as mask_util

    if isinstance(mask, dict):
        return mask
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a frame mask must have shape (H, W), got {tuple(mask.shape)}")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(rle: dict):
    """The bool (H, W) tensor of a compressed RLE dict (:func:`encode_mask`'s output)."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_util

    counts = rle["counts"]
    rle = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str)
           else counts}
    return torch.from_numpy(mask_util.decode(rle).astype(bool))


def tracks_to_json(tracks: List[VideoTrack], metadata=None, video: Optional[str] = None) -> dict:
    """The tracks of one video as a json-ready dict (``demo/demo.py --save-json``).

    Args:
        tracks: a video's tracks.
        metadata: Detectron2 metadata whose ``thing_classes`` name the categories, or None.
        video: a name recorded in the output (e.g. the video file).

    Returns:
        dict: {"video", "num_frames", "tracks": [{"id", "category_id" (contiguous index),
        "category" (name or None), "score", "boxes" (per frame [x0, y0, x1, y1] pixels or
        None), "segmentations" (per frame compressed RLE or None)}]}.
    """
    names = list(metadata.get("thing_classes", None) or []) if metadata is not None else []
    return {
        "video": video,
        "num_frames": tracks[0].num_frames if tracks else 0,
        "tracks": [
            {
                "id": k.track_id,
                "category_id": k.category,
                "category": names[k.category] if k.category < len(names) else None,
                "score": k.score,
                "boxes": [None if b is None else [round(float(v), 2) for v in b]
                          for b in k.boxes],
                "segmentations": [None if m is None else encode_mask(m) for m in k.masks],
            }
            for k in tracks
        ],
    }
