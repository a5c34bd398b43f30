"""MobileNetV2 + FPN with outputs P2-P5: a light backbone for CPU and edge use.

The bottom-up network is torchvision's ``MobileNetV2(...).features`` without its last block
(the 1x1 conv to 1280 channels, which only feeds the classifier). Its blocks are grouped into
stages by stride, so that ``MODEL.MOBILENET.FREEZE_AT`` means what Detectron2's
``MODEL.BACKBONE.FREEZE_AT`` means for ResNet (docs/method.md §1.1):

==========  ===========================  ======  ====================
stage       torchvision blocks           stride  channels (width 1.0)
==========  ===========================  ======  ====================
stem        features[0:2]                2       16
``stage2``  features[2:4]                4       24
``stage3``  features[4:7]                8       32
``stage4``  features[7:14]               16      96
``stage5``  features[14:18]              32      320
==========  ===========================  ======  ====================

ImageNet weights for it: ``queryinst.checkpoint.pretrained``
(``queryinst://ImageNetPretrained/MobileNetV2``).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from torch import nn
from torchvision.models import MobileNetV2 as TorchvisionMobileNetV2

__all__ = ["MobileNetV2", "build_mobilenetv2_backbone", "build_mobilenetv2_fpn_p2_p5_backbone"]

# (first block, end block, stride) of the stem and of stage2..stage5 in torchvision's features.
_STAGES = ((0, 2, 2), (2, 4, 4), (4, 7, 8), (7, 14, 16), (14, 18, 32))
STAGE_NAMES = ("stem", "stage2", "stage3", "stage4", "stage5")


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 feature extractor as a Detectron2 ``Backbone``.

    ``self.features`` is torchvision's ``features[:18]`` (same module names), so a
    torchvision state dict loads into it with the prefix ``features.`` unchanged.

    Args:
        width_mult (float): torchvision's width multiplier (ImageNet weights: 1.0 only).
        out_features (Sequence[str]): among "stage2".."stage5".
        norm (str): "FrozenBN", "BN" or "SyncBN" (Detectron2's ``get_norm``), used in every
            block; frozen stages use FrozenBN whatever this says, as in Detectron2's ResNet.
        freeze_at (int): 0 trains everything; k >= 1 freezes the stem (k = 1) and stages
            2..k (no gradient, FrozenBN), like ``MODEL.BACKBONE.FREEZE_AT`` for ResNet.

    Input: (B, 3, H, W) float32, normalised pixels. Output: dict name -> (B, C, H/s, W/s).

    Raises:
        ValueError: unknown out feature, or ``freeze_at`` outside 0..5.
    """

    def __init__(self, *, width_mult: float = 1.0, out_features: Sequence[str] = (
            "stage2", "stage3", "stage4", "stage5"), norm: str = "FrozenBN", freeze_at: int = 0):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES[1:]]
        if unknown or not out_features:
            raise ValueError(f"MODEL.MOBILENET.OUT_FEATURES {list(out_features)}: each must be "
                             f"one of {list(STAGE_NAMES[1:])}")
        if not 0 <= freeze_at <= len(_STAGES):
            raise ValueError(f"MODEL.MOBILENET.FREEZE_AT {freeze_at}: must be 0..{len(_STAGES)}")
        net = TorchvisionMobileNetV2(width_mult=width_mult,
                                     norm_layer=lambda channels: get_norm(norm, channels))
        last = _STAGES[max(STAGE_NAMES.index(f) for f in out_features)][1]
        self.features = net.features[:last]
        self._out_features = list(out_features)
        self._stage_ends = {name: end for name, (_, end, _) in zip(STAGE_NAMES, _STAGES)}
        self._out_feature_strides = {name: s for name, (_, _, s) in zip(STAGE_NAMES, _STAGES)}
        self._out_feature_channels = {
            name: self._last_conv_channels(end) for name, (_, end, _) in
            zip(STAGE_NAMES, _STAGES) if end <= last
        }
        self.freeze(freeze_at)

    def _last_conv_channels(self, end: int) -> int:
        convs = [m for m in self.features[:end].modules() if isinstance(m, nn.Conv2d)]
        return convs[-1].out_channels

    def freeze(self, freeze_at: int) -> "MobileNetV2":
        """Freeze the stem and stages 2..``freeze_at`` (see the class); returns self."""
        if freeze_at > 0:
            end = _STAGES[freeze_at - 1][1]
            for block in self.features[:end]:
                for p in block.parameters():
                    p.requires_grad_(False)
                # Replaces the BN modules inside the block (a block is never a BN itself).
                FrozenBatchNorm2d.convert_frozen_batchnorm(block)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        ends = {self._stage_ends[name]: name for name in self._out_features}
        for i, block in enumerate(self.features):
            x = block(x)
            if i + 1 in ends:
                outputs[ends[i + 1]] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2:
    """Build :class:`MobileNetV2` from ``MODEL.MOBILENET.*`` (see ``add_queryinst_config``).

    Raises:
        ValueError: ``input_shape.channels`` is not 3 (torchvision's stem takes RGB).
    """
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3-channel images, got {input_shape.channels} "
                         "(len(MODEL.PIXEL_MEAN))")
    m = cfg.MODEL.MOBILENET
    return MobileNetV2(width_mult=m.WIDTH_MULT, out_features=m.OUT_FEATURES, norm=m.NORM,
                       freeze_at=m.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_p2_p5_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build :class:`MobileNetV2` + Detectron2's ``FPN`` without a top block: "p2".."p5".

    ``MODEL.FPN.IN_FEATURES`` names the MobileNetV2 stages ("stage2".."stage5"). As with
    ``build_resnet_fpn_p2_p5_backbone``, there is no P6, so ``size_divisibility`` is 32.

    Returns:
        Backbone: FPN outputs at strides 4, 8, 16, 32 with ``MODEL.FPN.OUT_CHANNELS``
        channels.
    """
    return FPN(
        bottom_up=build_mobilenetv2_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

