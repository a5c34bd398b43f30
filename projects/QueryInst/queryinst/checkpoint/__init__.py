"""Checkpoints: Detectron2 files and the official (MMDetection layout) ones, read without
unpickling; class-row remapping for fine-tuning; pretrained backbone weights (docs/method.md §4).
"""
from .checkpointer import (  # with the names it re-exports from errors and official_layout
    CheckpointError,
    CheckpointFormatError,
    QueryInstCheckpointer,
    WeightsUnavailableError,
    check_against_model,
    config_as_opts,
    convert_official_checkpoint,
    convert_official_state_dict,
    detect_official_config,
    fill_num_batches_tracked,
    format_config_summary,
    is_official_state_dict,
    load_checkpoint_file,
    load_official_state_dict,
    official_config_opts,
    unreadable_checkpoint_error,
)
from .class_init import ClassInit, ClassInitError, class_init_from_config, remap_class_rows
from .pretrained import PRETRAINED, prepare_pretrained, resolve_pretrained

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
