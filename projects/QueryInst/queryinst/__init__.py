"""QueryInst (Fang et al., "Instances as Queries", ICCV 2021) on Detectron2.

Importing the package registers the meta-architecture ``QueryInst``, the proposal generator
``LearnableProposals``, the ROI heads ``QueryInstROIHeads``, the backbones
``build_resnet_fpn_p2_p5_backbone`` and ``build_mobilenetv2_fpn_p2_p5_backbone``, the
bundled datasets, and the video model ``QueryInstVIS`` with its datasets (``queryinst.video``).
"""
# First: imports Detectron2 without its torch.jit.script warnings (see the module).
from . import _quiet_imports  # noqa: F401  (isort: skip)
from .config import add_queryinst_config
from .data.dataset_mapper import QueryInstDatasetMapper, RandomSelect, build_train_augmentation
from .modeling import (  # importing registers the model parts and backbones
    DIIHead,
    DynamicConv,
    DynamicMaskHead,
    HungarianMatcher,
    LearnableProposals,
    QueryInst,
    QueryInstCriterion,
    QueryInstROIHeads,
    StageOutput,
    queryinst_postprocess,
)
from . import data  # noqa: F401  (registers the bundled datasets; no IO)
from . import video  # noqa: F401  (QueryInstVIS, trackers, video datasets; no IO)

__all__ = [
    "add_queryinst_config",
    "build_train_augmentation",
    "DIIHead",
    "DynamicConv",
    "DynamicMaskHead",
    "HungarianMatcher",
    "LearnableProposals",
    "QueryInst",
    "QueryInstCriterion",
    "QueryInstDatasetMapper",
    "QueryInstROIHeads",
    "RandomSelect",
    "StageOutput",
    "queryinst_postprocess",
]
