"""QueryInst-VIS: video instance segmentation with QueryInst (docs/method.md §6).

The object queries are the instance identities: a track head embeds the last stage's query
for MaskTrack R-CNN style association, or, without training, queries are matched by cosine
similarity (MinVIS). Importing registers the meta-architecture ``QueryInstVIS``, the trackers
and the YouTube-VIS datasets.
"""
from .config import add_queryinst_vis_config
from .dataset_mapper import YTVISDatasetMapper, sample_frame_pair
from .structures import VideoTrack
from .ytvis import (
    PREDEFINED_YTVIS_SPLITS,
    YTVIS_2019_CATEGORIES,
    YTVIS_2021_CATEGORIES,
    load_ytvis_json,
    register_all_ytvis,
    register_ytvis_instances,
    ytvis_metadata,
)

register_all_ytvis()  # the predefined YouTube-VIS splits under $DETECTRON2_DATASETS; no IO

__all__ = [
    "PREDEFINED_YTVIS_SPLITS",
    "YTVIS_2019_CATEGORIES",
    "YTVIS_2021_CATEGORIES",
    "YTVISDatasetMapper",
    "VideoTrack",
    "add_queryinst_vis_config",
    "load_ytvis_json",
    "register_all_ytvis",
    "register_ytvis_instances",
    "sample_frame_pair",
    "ytvis_metadata",
]
