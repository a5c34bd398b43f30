"""The video model ``QueryInstVIS`` (META_ARCH_REGISTRY), its track head and the trackers
(TRACKER_REGISTRY)."""
from .meta_arch import QueryInstVIS
from .track_head import TrackHead
from .tracker import (
    TRACKER_REGISTRY,
    EmbeddingTracker,
    OnlineTracker,
    QueryCosineTracker,
    build_tracker,
)

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
