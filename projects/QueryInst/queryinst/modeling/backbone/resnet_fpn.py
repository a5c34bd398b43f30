"""ResNet + FPN with outputs P2-P5 only.

docs/method.md §1.1: QueryInst pools from P2-P5 and has no P6. Detectron2's
``build_resnet_fpn_backbone`` always adds P6 (a max-pool), which would also raise the padding
multiple from 32 to 64 and so change the features near the image border.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_resnet_fpn_p2_p5_backbone"]


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_p2_p5_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Build Detectron2's ResNet + FPN without the top block: outputs "p2".."p5".

    Args:
        cfg: config with ``MODEL.RESNETS.*`` and ``MODEL.FPN.*``.
        input_shape: the input image's shape (channels).

    Returns:
        Backbone: an ``FPN`` whose outputs are strides 4, 8, 16, 32 with
        ``MODEL.FPN.OUT_CHANNELS`` channels and ``size_divisibility`` 32.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
