"""The stages of QueryInst (ROI_HEADS_REGISTRY): pooling, dynamic conv, box and mask heads."""
from .box_head import DIIHead
from .dynamic_conv import DynamicConv
from .mask_head import DynamicMaskHead
from .pooling import MatrixROIPooler
from .roi_heads import QueryInstROIHeads, StageOutput

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
