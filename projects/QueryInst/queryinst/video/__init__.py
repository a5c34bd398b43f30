"""QueryInst-VIS: video instance segmentation with QueryInst (docs/method.md §6).

The object queries are the instance identities: a track head embeds the last stage's query
for MaskTrack R-CNN style association, or, without training, queries are matched by cosine
similarity (MinVIS). Importing registers the meta-architecture ``QueryInstVIS``, the trackers
(``TRACKER_REGISTRY``), the predefined YouTube-VIS splits and the bundled video datasets
(no IO).
"""
from .config import add_queryinst_vis_config, use_query_tracker
from .structures import VideoTrack, decode_mask, encode_mask, tracks_to_json
from .modeling import (
    TRACKER_REGISTRY,
    EmbeddingTracker,
    OnlineTracker,
    QueryCosineTracker,
    QueryInstVIS,
    TrackHead,
    build_tracker,
)
from .data.dataset_mapper import YTVISDatasetMapper, sample_frame_pair
from .data.build import (
    build_vis_test_loader,
    build_vis_train_loader,
    check_video_model,
    is_video_dataset,
)
from .data.ytvis import (
    PREDEFINED_YTVIS_SPLITS,
    YTVIS_2019_CATEGORIES,
    YTVIS_2021_CATEGORIES,
    load_ytvis_json,
    register_all_ytvis,
    register_ytvis_instances,
    ytvis_metadata,
)
from .data.builtin import (
    BUNDLED_VIDEO_DATASETS,
    prepare_bundled_video_datasets,
    register_bundled_video_datasets,
)
from .evaluation import (
    YTVISEvaluator,
    evaluate_ytvis,
    identity_switches,
    results_from_tracks,
    track_dataset,
    write_submission,
)
from .visualization import draw_tracked_frame, frame_instances, save_gif, save_mp4, track_color

register_all_ytvis()  # the predefined YouTube-VIS splits under $DETECTRON2_DATASETS; no IO

__all__ = [
    "BUNDLED_VIDEO_DATASETS",
    "EmbeddingTracker",
    "OnlineTracker",
    "PREDEFINED_YTVIS_SPLITS",
    "QueryCosineTracker",
    "QueryInstVIS",
    "TRACKER_REGISTRY",
    "TrackHead",
    "VideoTrack",
    "YTVIS_2019_CATEGORIES",
    "YTVIS_2021_CATEGORIES",
    "YTVISDatasetMapper",
    "YTVISEvaluator",
    "add_queryinst_vis_config",
    "build_tracker",
    "build_vis_test_loader",
    "build_vis_train_loader",
    "check_video_model",
    "draw_tracked_frame",
    "decode_mask",
    "encode_mask",
    "evaluate_ytvis",
    "frame_instances",
    "identity_switches",
    "is_video_dataset",
    "load_ytvis_json",
    "prepare_bundled_video_datasets",
    "register_all_ytvis",
    "register_bundled_video_datasets",
    "register_ytvis_instances",
    "results_from_tracks",
    "sample_frame_pair",
    "save_gif",
    "save_mp4",
    "track_color",
    "track_dataset",
    "tracks_to_json",
    "use_query_tracker",
    "write_submission",
    "ytvis_metadata",
]
