"""Backbones with P2-P5 FPN outputs, registered in Detectron2's BACKBONE_REGISTRY."""
from .mobilenet import MobileNetV2, build_mobilenetv2_backbone, build_mobilenetv2_fpn_p2_p5_backbone
from .resnet_fpn import build_resnet_fpn_p2_p5_backbone

__all__ = [k for k in globals() if not k.startswith("_")]  # as Detectron2's modeling/
