"""QueryInst-VIS: video instance segmentation with QueryInst (docs/method.md §5).

The object queries are the instance identities: a track head embeds the last stage's query
for MaskTrack R-CNN style association, or, without training, queries are matched by cosine
similarity (MinVIS). Importing registers the meta-architecture ``QueryInstVIS``, the trackers
and the YouTube-VIS datasets.
"""
from .config import add_queryinst_vis_config
from .structures import VideoTrack
from .tracker import (
    TRACKER_REGISTRY,
    EmbeddingTracker,
    OnlineTracker,
    QueryCosineTracker,
    build_tracker,
)

__all__ = [
    "add_queryinst_vis_config",
    "VideoTrack",
    "TRACKER_REGISTRY",
    "build_tracker",
    "OnlineTracker",
    "EmbeddingTracker",
    "QueryCosineTracker",
]
