"""What the video model returns: tracks (docs/method.md §5.3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor

__all__ = ["VideoTrack"]


@dataclass
class VideoTrack:
    """One tracked instance over a video of T frames.

    Attributes:
        track_id: int, unique within the video (0, 1, ... in order of birth).
        category: contiguous class index (0..C-1), the score-weighted vote of its detections.
        score: mean detection score over the frames where the track is present.
        boxes: T entries, float (4,) absolute xyxy in original-frame pixels, or None where
            the track is absent.
        masks: T entries, bool (H, W) in original-frame pixels, or None where absent (all
            None for box-only models).
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
