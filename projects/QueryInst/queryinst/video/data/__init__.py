"""Video datasets (YouTube-VIS, the bundled ones), the video mapper and loaders."""
from .build import (
    build_vis_test_loader,
    build_vis_train_loader,
    check_video_model,
    is_video_dataset,
    key_frame_records,
)
from .builtin import (
    BUNDLED_VIDEO_DATASETS,
    prepare_bundled_video_datasets,
    register_bundled_video_datasets,
)
from .dataset_mapper import YTVISDatasetMapper, sample_frame_pair
from .ytvis import load_ytvis_json, register_all_ytvis, register_ytvis_instances

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
