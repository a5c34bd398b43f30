"""The QueryInst model (docs/method.md §1, §3): meta-architecture, backbones, learnable
proposals, the ROI heads of dynamic stages, matcher, criterion and inference speed-ups.

Importing registers ``QueryInst`` (META_ARCH_REGISTRY), ``LearnableProposals``
(PROPOSAL_GENERATOR_REGISTRY), ``QueryInstROIHeads`` (ROI_HEADS_REGISTRY) and the backbones
``build_resnet_fpn_p2_p5_backbone`` and ``build_mobilenetv2_fpn_p2_p5_backbone``
(BACKBONE_REGISTRY).
"""
from .backbone import (
    MobileNetV2,
    build_mobilenetv2_fpn_p2_p5_backbone,
    build_resnet_fpn_p2_p5_backbone,
)
from .criterion import QueryInstCriterion
from .matcher import HungarianMatcher
from .meta_arch import QueryInst, queryinst_postprocess
from .proposal_generator import LearnableProposals
from .roi_heads import DIIHead, DynamicConv, DynamicMaskHead, QueryInstROIHeads, StageOutput

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
