"""Learnable proposal boxes and proposal features (the initial object queries).

docs/method.md §1.2 (MMDetection calls this module ``EmbeddingRPNHead``); paper
section 3.1, following Sparse R-CNN. Registered as a Detectron2 proposal generator, so the
meta-architecture hands its output to the ROI heads like any other proposals.
"""
from __future__ import annotations

import math

import torch
from detectron2.config import configurable
from detectron2.layers.wrappers import shapes_to_tensor
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["LearnableProposals", "PROPOSAL_BOX_INITS"]


def _whole_image(num_proposals: int) -> Tensor:
    """Every box the whole image, (0.5, 0.5, 1, 1): Sparse R-CNN's and QueryInst's default."""
    return torch.tensor([0.5, 0.5, 1.0, 1.0]).repeat(num_proposals, 1)


def _grid(num_proposals: int) -> Tensor:
    """Boxes tiling the whole image: rows of g = ceil(sqrt(N)) boxes, the last row of the rest.

    r = ceil(N / g) rows, each 1 / r high; a full row has g boxes 1 / g wide, the last row
    its N - (r - 1) g boxes spread over the whole width. So every point of the image starts
    inside exactly one box for any N (a g x g grid filled row by row, the version before
    2026-12-06 22:20 UTC, left the bottom rows without a query when N < g * g: 19 of 169
    cells for N = 150). N = g * g gives the same g x g grid as before. Sparse R-CNN's "grid"
    initialisation (its ablation of proposal boxes): on COCO about equal to the whole-image
    init; it starts every query near the small, dense objects of a microscopy frame
    (docs/method.md §1.2).
    """
    g = math.ceil(math.sqrt(num_proposals))
    rows = math.ceil(num_proposals / g)
    idx = torch.arange(num_proposals)
    row = torch.div(idx, g, rounding_mode="floor")
    col = idx % g
    per_row = torch.where(row == rows - 1, num_proposals - (rows - 1) * g, g).float()
    cx = (col + 0.5) / per_row
    cy = (row + 0.5) / rows
    return torch.stack([cx, cy, 1.0 / per_row, torch.full_like(cx, 1.0 / rows)], dim=1)


# MODEL.QUERYINST.PROPOSAL_BOX_INIT -> N -> (N, 4) float32 normalised (cx, cy, w, h)
PROPOSAL_BOX_INITS = {"image": _whole_image, "grid": _grid}


@PROPOSAL_GENERATOR_REGISTRY.register()
class LearnableProposals(nn.Module):
    """N learnable boxes and N learnable D-dim features, the same for every image.

    Attributes:
        init_proposal_boxes (nn.Embedding): weight (N, 4), normalised (cx, cy, w, h),
            initialised by ``PROPOSAL_BOX_INITS[box_init]``: by default (0.5, 0.5, 1, 1),
            the whole image.
        init_proposal_features (nn.Embedding): weight (N, D), PyTorch's default N(0, 1) init.
    """

    @configurable
    def __init__(self, *, num_proposals: int = 100, hidden_dim: int = 256,
                 box_init: str = "image"):
        """
        Args:
            num_proposals: N, object queries per image (100 or 300 in the paper).
            hidden_dim: D, channels of the proposal features.
            box_init: a key of ``PROPOSAL_BOX_INITS``: "image" (the paper's) or "grid".

        Raises:
            ValueError: ``box_init`` is not a key of ``PROPOSAL_BOX_INITS``.
        """
        super().__init__()
        if box_init not in PROPOSAL_BOX_INITS:
            raise ValueError(f"MODEL.QUERYINST.PROPOSAL_BOX_INIT = {box_init!r}: use one of "
                             f"{sorted(PROPOSAL_BOX_INITS)}")
        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)
        self.init_proposal_features = nn.Embedding(num_proposals, hidden_dim)
        with torch.no_grad():
            self.init_proposal_boxes.weight.copy_(PROPOSAL_BOX_INITS[box_init](num_proposals))

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        return {
            "num_proposals": cfg.MODEL.QUERYINST.NUM_PROPOSALS,
            "hidden_dim": cfg.MODEL.QUERYINST.HIDDEN_DIM,
            "box_init": cfg.MODEL.QUERYINST.PROPOSAL_BOX_INIT,
        }

    def forward(
        self, images: ImageList, features: dict[str, Tensor], gt_instances=None
    ) -> tuple[list[Instances], dict]:
        """Turn the learnt boxes into absolute boxes for each image.

        Args:
            images: the batch; ``images.image_sizes`` are the (h, w) before padding, which
                scale the normalised boxes (docs/method.md §1: scaled before padding).
            features: unused (the proposals do not depend on the image).
            gt_instances: unused.

        Returns:
            list[Instances]: per image, ``proposal_boxes`` (Boxes, (N, 4) absolute xyxy
            pixels of the resized, unpadded image) and ``proposal_features`` (float (N, D)).
            dict: empty (no proposal losses).
        """
        boxes = box_convert(self.init_proposal_boxes.weight, "cxcywh", "xyxy")
        proposals = []
        for h, w in images.image_sizes:
            inst = Instances((h, w))
            # shapes_to_tensor: h, w are ints, or scalar tensors in a traced graph
            # (queryinst/export/exporter.py), where this keeps the scale a function of the input.
            scale = shapes_to_tensor([w, h, w, h], device=boxes.device).to(boxes.dtype)
            inst.proposal_boxes = Boxes(boxes * scale)
            inst.proposal_features = self.init_proposal_features.weight
            proposals.append(inst)
        return proposals, {}
