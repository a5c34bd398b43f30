"""The video model ``QueryInstVIS`` (META_ARCH_REGISTRY), its track head and the trackers
(TRACKER_REGISTRY)."""
from .meta_arch import QueryInstVIS
from .track_head import TrackHead
from .tracker import TRACKER_REGISTRY, EmbeddingTracker, OnlineTracker, QueryCosineTracker, build_tracker

__all__ = ["EmbeddingTracker", "OnlineTracker", "QueryCosineTracker", "QueryInstVIS",
           "TRACKER_REGISTRY", "TrackHead", "build_tracker"]
