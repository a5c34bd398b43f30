"""QueryInst's ROI heads: six box stages, each with a dynamic mask head that shares its query.

Paper section 3 ("Instances as Queries"): stage t refines the object queries and boxes of
stage t-1 (a Sparse R-CNN "DIIHead"), and its mask head reads the same stage's
post-attention query; all stages are supervised in parallel. Shapes and rules follow
``docs/method.md`` §1-3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import ROIAlign, ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import BitMasks, Boxes, Instances
from torch import Tensor, nn

from .box_head import DIIHead
from ..criterion import QueryInstCriterion, num_matched_across_processes
from .mask_head import DynamicMaskHead
from ..matcher import HungarianMatcher
from .pooling import MatrixROIPooler, PooledFeatures

__all__ = [
    "StageOutput",
    "QueryInstROIHeads",
    "clamp_size_deltas",
    "float_masks_where_read",
    "mask_targets_in_boxes",
    "maskness",
    "stage_mask_targets",
    "pool_stage_boxes",
]


@dataclass
class StageOutput:
    """What box stage t computed for a batch of B images with N queries each (docs/method.md §1).

    Attributes:
        cls_logits: float (B, N, C), classification logits (sigmoid, no background).
        pred_boxes: float (B, N, 4), decoded boxes, absolute xyxy pixels of the resized
            image, not detached (the box losses use them; the next stage gets them detached).
        object_feats: float (B, N, D), the stage's output query, input of stage t+1.
        attn_feats: float (B, N, D), the post-self-attention query that parametrises
            mask head t (the paper's q*_{t-1}).
    """

    cls_logits: Tensor
    pred_boxes: Tensor
    object_feats: Tensor
    attn_feats: Tensor


def clamp_size_deltas(deltas: Tensor, transform: Box2BoxTransform) -> Tensor:
    """Clamp dw, dh from below as well: |dw|, |dh| <= log(1000/16) (docs/method.md §1.3, step 8).

    Detectron2's ``Box2BoxTransform.apply_deltas`` clamps dw, dh only from above; the
    official decoder (mmdet ``delta2bbox``) clamps both sides, so a box never shrinks by more
    than the same factor it may grow by.

    Args:
        deltas: float (R, 4) raw (dx, dy, dw, dh), in ``transform``'s weighted units.
        transform: the box coder; its ``scale_clamp`` and weights give the bound.

    Returns:
        Tensor: (R, 4), dw and dh raised to at least ``-scale_clamp * weight``.
    """
    ww, wh = transform.weights[2], transform.weights[3]
    low = deltas.new_tensor([-transform.scale_clamp * ww, -transform.scale_clamp * wh])
    return torch.cat([deltas[:, :2], deltas[:, 2:].clamp(min=low)], dim=1)


def mask_targets_in_boxes(
    gt_masks,
    boxes: Tensor,
    image_size: tuple[int, int],
    mask_size: int,
    gt_indices: Tensor | None = None,
):
    """Crop GT masks by predicted boxes and resize them: the mask head's targets (docs/method.md
    §2).

    Args:
        gt_masks (PolygonMasks or BitMasks): the GT masks of one image.
        boxes: float (M, 4), absolute xyxy pixels; clipped to the image before cropping.
        image_size: (h, w) of the resized, unpadded image.
        mask_size: side of the target (28).
        gt_indices: int64 (M,), the GT mask of each box (indices may repeat, e.g. the
            matches of several stages); None means row i of ``gt_masks`` for box i.

    Returns:
        Tensor: float (M, mask_size, mask_size) in {0, 1}; bitmasks are resampled with
        aligned RoIAlign and thresholded at 0.5, polygons rasterised inside the box
        (Detectron2's ``crop_and_resize``, whose values these are).
    """
    clipped = Boxes(boxes.detach().clone())
    clipped.clip(image_size)
    if gt_indices is None:
        return gt_masks.crop_and_resize(clipped.tensor, mask_size).to(boxes.dtype)
    if not isinstance(gt_masks, BitMasks):
        return gt_masks[gt_indices].crop_and_resize(clipped.tensor, mask_size).to(boxes.dtype)
    # BitMasks.crop_and_resize converts every full-image mask it holds to float per call:
    # on 536x700 frames with ~70 cells that took ~13% of a training iteration when called
    # once per stage on an indexed copy. The same aligned RoIAlign, but each box reads its
    # mask through the RoI's batch index, from a float copy made once and only where read.
    rois = torch.cat([gt_indices[:, None].to(clipped.tensor), clipped.tensor], dim=1)
    float_masks = float_masks_where_read(gt_masks.tensor, rois)
    crops = ROIAlign((mask_size, mask_size), 1.0, 0, aligned=True)(float_masks, rois)
    return (crops.squeeze(1) >= 0.5).to(boxes.dtype)


# Aligned RoIAlign at scale 1 samples a box (x0, y0, x1, y1) at x in [x0 - 0.5, x1 - 0.5]
# and interpolates pixels floor(x) and floor(x) + 1: it reads nothing outside
# [floor(x0) - 1, floor(x1) + 1]. One more pixel each side covers rounding of the samples.
_READ_MARGIN = 2


def _lazy_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    # On the CPU, NumPy's zeros come from calloc, whose large blocks are fresh pages that the
    # kernel zero-fills only when first touched: the frame's untouched bulk costs nothing,
    # where torch.zeros writes it all (~50 ms for 65 x 536 x 700 float32 on one core).
    if device.type == "cpu" and dtype == torch.float32:
        return torch.from_numpy(np.zeros(shape, dtype=np.float32))
    return torch.zeros(shape, dtype=dtype, device=device)


def float_masks_where_read(masks: Tensor, rois: Tensor) -> Tensor:
    """A float copy of bool masks that is exact wherever aligned RoIAlign of ``rois`` reads.

    Converting every whole-frame GT mask to float was most of the mask targets' time (a
    536x700 training frame with 65 cells: 57 ms against 19 ms now on 2 threads of an AMD
    EPYC Zen 3), while the boxes of a cell read only the few hundred pixels around it. Each mask is copied inside the window that
    holds all of its RoIs (plus ``_READ_MARGIN`` pixels) and left 0 elsewhere, where no RoI
    of it reads, so ``ROIAlign(..., aligned=True)`` at ``spatial_scale`` 1 gives the targets
    of the full copy bit for bit (the sampling coordinates are unchanged).

    Args:
        masks: bool (G, H, W), the GT masks of one image.
        rois: float (R, 5), rows (gt index, x0, y0, x1, y1), absolute xyxy pixels clipped to
            the image; the gt index selects the row of ``masks``.

    Returns:
        Tensor: ``rois.dtype`` (G, 1, H, W); the whole masks if a RoI is not finite.
    """
    g, h, w = masks.shape
    if not bool(torch.isfinite(rois).all()):
        return masks[:, None].to(rois.dtype)
    out = _lazy_zeros((g, 1, h, w), rois.dtype, masks.device)
    index = rois[:, :1].long().expand(-1, 2)
    low = rois.new_full((g, 2), float("inf")).scatter_reduce(0, index, rois[:, 1:3], "amin")
    high = rois.new_full((g, 2), float("-inf")).scatter_reduce(0, index, rois[:, 3:5], "amax")
    used = torch.isfinite(low[:, 0]).tolist()
    low = (low.nan_to_num(0.0, 0.0, 0.0).floor() - _READ_MARGIN).clamp(min=0).long().tolist()
    high = (high.nan_to_num(0.0, 0.0, 0.0).floor() + _READ_MARGIN + 1).long().tolist()
    for i in (i for i in range(g) if used[i]):
        (x0, y0), (x1, y1) = low[i], high[i]
        out[i, 0, y0:y1, x0:x1] = masks[i, y0:y1, x0:x1]
    return out


def stage_mask_targets(
    targets: list[Instances],
    boxes: list[list[Tensor]],
    matches: list[list[tuple[Tensor, Tensor]]],
    mask_size: int,
) -> list[Tensor]:
    """Mask targets of every stage's matched boxes with one :func:`mask_targets_in_boxes`
    call per image (the GT masks are read once, not once per stage).

    Args:
        targets: per image, the GT ``Instances`` with ``gt_masks``.
        boxes: per stage, per image, float (M_ti, 4) absolute xyxy boxes of the matched queries.
        matches: per stage, per image, the matcher's (query indices, GT indices), int64 (M_ti,).
        mask_size: side of the targets (28).

    Returns:
        list[Tensor]: per stage t, float (sum_i M_ti, mask_size, mask_size) in {0, 1}, image
        by image, row by row as ``boxes[t]``.
    """
    gt_indices = _stages_per_image([[g for _, g in stage] for stage in matches])
    per_image = [
        mask_targets_in_boxes(tg.gt_masks, b, tg.image_size, mask_size, gt_indices=g)
        if len(g) else b.new_zeros((0, mask_size, mask_size))
        for tg, b, g in zip(targets, _stages_per_image(boxes), gt_indices)
    ]
    return _regroup_by_stage(torch.cat(per_image), boxes)


def _stages_per_image(rows: list[list[Tensor]]) -> list[Tensor]:
    """Per stage, per image tensors -> per image, the stages' rows concatenated in order."""
    return [torch.cat([stage[i] for stage in rows]) for i in range(len(rows[0]))]


def _regroup_by_stage(rows: Tensor, boxes: list[list[Tensor]]) -> list[Tensor]:
    """Rows ordered image by image, then stage by stage (as :func:`_stages_per_image` puts
    ``boxes``) -> per stage, image by image; ``boxes[t][i]`` gives the row counts."""
    num_images, num_stages = len(boxes[0]), len(boxes)
    blocks = rows.split([len(stage[i]) for i in range(num_images) for stage in boxes])
    return [
        torch.cat([blocks[i * num_stages + t] for i in range(num_images)])
        for t in range(num_stages)
    ]


def pool_stage_boxes(pooler: nn.Module, x, boxes: list[list[Tensor]]) -> list[Tensor]:
    """RoI features of several stages' boxes with one pooler call (one RoIAlign per level).

    Per image, the boxes of all stages are concatenated stage by stage and pooled together;
    the result is split back. RoIAlign pools each box on its own, so this equals one call
    per stage.

    Args:
        pooler: a ``MatrixROIPooler`` or ``ROIPooler``.
        x: what ``pooler`` reads: the FPN maps, or ``pooler.prepare(maps)``.
        boxes: per stage, per image, float (M_ti, 4) absolute xyxy boxes.

    Returns:
        list[Tensor]: per stage t, (sum_i M_ti, C, S, S), image by image.
    """
    pooled = pooler(x, [Boxes(b) for b in _stages_per_image(boxes)])
    return _regroup_by_stage(pooled, boxes)


def maskness(masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Mean foreground probability of each predicted mask: how sure the mask head is of the
    pixels it calls foreground (docs/method.md §3, "Mask scoring").

    Args:
        masks: float (..., M, M) mask probabilities in [0, 1], e.g. (B, k, 1, 28, 28).
        threshold: a pixel is foreground where its probability exceeds this (0.5, the
            threshold the masks are pasted with).

    Returns:
        Tensor: float (...) in [0, 1]: the mean probability over the foreground pixels of each
        mask, 0 for a mask without any.
    """
    foreground = (masks > threshold).to(masks.dtype)
    total = (masks * foreground).flatten(-2).sum(-1)
    return total / foreground.flatten(-2).sum(-1).clamp(min=1.0)


def _detections_per_image(test_topk: int, detections_per_image: int) -> int:
    """k of the top-k: ``TEST_TOPK`` capped by Detectron2's ``TEST.DETECTIONS_PER_IMAGE``
    (a negative cap means none, as in Detectron2's ``fast_rcnn_inference``)."""
    return test_topk if detections_per_image < 0 else min(test_topk, detections_per_image)


@ROI_HEADS_REGISTRY.register()
class QueryInstROIHeads(nn.Module):
    """The box stages and dynamic mask heads of QueryInst (paper section 3, docs/method.md §1-3).

    ``forward_stages`` runs the box stages and returns every stage's queries, which is the
    hook for extensions (for example, video models that associate queries across frames).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: list[str],
        box_pooler: ROIPooler,
        box_heads: list[nn.Module],
        box2box_transform: Box2BoxTransform,
        criterion: QueryInstCriterion,
        mask_pooler: ROIPooler | None = None,
        mask_heads: list[nn.Module] | None = None,
        test_topk: int = 100,
        test_score_thresh: float = 0.0,
        test_mask_scoring: bool = False,
    ):
        """
        Args:
            in_features: names of the feature maps pooled by RoIAlign ("p2".."p5").
            box_pooler: RoIAlign for the box stages (7x7): a :class:`MatrixROIPooler` or
                Detectron2's ``ROIPooler`` (same values; called as ``pooler(maps, box_lists)``).
            box_heads: one ``DIIHead`` per stage.
            box2box_transform: decodes (dx, dy, dw, dh) deltas against the stage's input boxes.
            criterion: matcher and per-stage losses.
            mask_pooler: RoIAlign for the mask heads (14x14); None with ``mask_heads``
                None for detection only (Sparse R-CNN).
            mask_heads: one ``DynamicMaskHead`` per stage, or None.
            test_topk: k of the inference top-k over (queries x classes) (docs/method.md,
                section 3); from a config, min(``MODEL.QUERYINST.TEST_TOPK``,
                ``TEST.DETECTIONS_PER_IMAGE``).
            test_score_thresh: after the top-k, detections scoring below this are dropped
                (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``; 0 keeps all k, as the official model).
            test_mask_scoring: multiply each detection's class score by its mask's
                :func:`maskness` and sort again (``MODEL.QUERYINST.TEST_MASK_SCORING``; off in
                the official model).

        Raises:
            ValueError: if the number of mask heads differs from the number of box stages,
                only one of mask_pooler and mask_heads is given, or test_mask_scoring is
                asked for without mask heads.
        """
        super().__init__()
        if (mask_pooler is None) != (mask_heads is None):
            raise ValueError("mask_pooler and mask_heads must be given together")
        if mask_heads is not None and len(mask_heads) != len(box_heads):
            raise ValueError(f"{len(mask_heads)} mask heads for {len(box_heads)} box stages")
        self.in_features = in_features
        self.box_pooler = box_pooler
        self.box_heads = nn.ModuleList(box_heads)
        self.box2box_transform = box2box_transform
        self.criterion = criterion
        self.mask_pooler = mask_pooler
        self.mask_heads = nn.ModuleList(mask_heads) if mask_heads is not None else None
        self.test_topk = test_topk
        self.test_score_thresh = test_score_thresh
        self.test_mask_scoring = test_mask_scoring
        if test_mask_scoring and mask_heads is None:
            raise ValueError("MODEL.QUERYINST.TEST_MASK_SCORING needs the mask heads "
                             "(MODEL.MASK_ON True)")

    @property
    def mask_on(self) -> bool:
        return self.mask_heads is not None

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        q = cfg.MODEL.QUERYINST
        for name in q.IN_FEATURES:
            if input_shape[name].channels != q.HIDDEN_DIM:
                raise ValueError(
                    f"feature {name} has {input_shape[name].channels} channels, "
                    f"MODEL.QUERYINST.HIDDEN_DIM is {q.HIDDEN_DIM}"
                )
        scales = tuple(1.0 / input_shape[name].stride for name in q.IN_FEATURES)

        def pooler(resolution):
            if q.POOLER_TYPE in ("ROIAlignV2", "ROIAlign") and q.POOLER_SAMPLING_RATIO > 0:
                return MatrixROIPooler(
                    resolution, scales, q.POOLER_SAMPLING_RATIO, q.POOLER_TYPE
                )
            return ROIPooler(
                output_size=resolution,
                scales=scales,
                sampling_ratio=q.POOLER_SAMPLING_RATIO,
                pooler_type=q.POOLER_TYPE,
            )

        box_heads = [
            DIIHead(
                num_classes=q.NUM_CLASSES,
                hidden_dim=q.HIDDEN_DIM,
                dim_feedforward=q.DIM_FEEDFORWARD,
                num_heads=q.NUM_HEADS,
                dropout=q.DROPOUT,
                dynamic_dim=q.DYNAMIC_DIM,
                pooler_resolution=q.BOX_POOLER_RESOLUTION,
                num_cls_fcs=q.NUM_CLS_FCS,
                num_reg_fcs=q.NUM_REG_FCS,
                prior_prob=q.PRIOR_PROB,
            )
            for _ in range(q.NUM_STAGES)
        ]
        ret = {
            "in_features": list(q.IN_FEATURES),
            "box_pooler": pooler(q.BOX_POOLER_RESOLUTION),
            "box_heads": box_heads,
            "box2box_transform": Box2BoxTransform(
                weights=tuple(q.BBOX_REG_WEIGHTS), scale_clamp=q.SCALE_CLAMP
            ),
            "criterion": QueryInstCriterion(
                num_classes=q.NUM_CLASSES,
                matcher=HungarianMatcher(
                    cost_class=q.MATCHER.COST_CLASS,
                    cost_bbox=q.MATCHER.COST_BBOX,
                    cost_giou=q.MATCHER.COST_GIOU,
                    focal_alpha=q.FOCAL_ALPHA,
                    focal_gamma=q.FOCAL_GAMMA,
                ),
                class_weight=q.CLASS_WEIGHT,
                l1_weight=q.L1_WEIGHT,
                giou_weight=q.GIOU_WEIGHT,
                mask_weight=q.MASK_WEIGHT,
                focal_alpha=q.FOCAL_ALPHA,
                focal_gamma=q.FOCAL_GAMMA,
                dice_eps=q.DICE_EPS,
            ),
            "test_topk": _detections_per_image(q.TEST_TOPK, cfg.TEST.DETECTIONS_PER_IMAGE),
            "test_score_thresh": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "test_mask_scoring": q.TEST_MASK_SCORING,
        }
        if cfg.MODEL.MASK_ON:
            ret["mask_pooler"] = pooler(q.MASK_POOLER_RESOLUTION)
            ret["mask_heads"] = [
                DynamicMaskHead(
                    num_classes=q.NUM_CLASSES,
                    hidden_dim=q.HIDDEN_DIM,
                    dynamic_dim=q.DYNAMIC_DIM,
                    pooler_resolution=q.MASK_POOLER_RESOLUTION,
                    num_convs=q.NUM_MASK_CONVS,
                    conv_dim=q.MASK_CONV_DIM,
                    norm=q.MASK_NORM,
                )
                for _ in range(q.NUM_STAGES)
            ]
        return ret

    def forward_stages(
        self, features: dict[str, Tensor], proposals: list[Instances]
    ) -> list[StageOutput]:
        """Run all box stages (docs/method.md §1.3).

        Args:
            features: FPN maps by name, each (B, D, H_l, W_l).
            proposals: B Instances with ``proposal_boxes`` (N absolute xyxy boxes) and
                ``proposal_features`` (float (N, D)), the same N for every image.

        Returns:
            list[StageOutput]: one per stage. Stage t+1 pools at stage t's boxes, detached.
        """
        x = self._pooler_input(self.box_pooler, features)
        boxes = [p.proposal_boxes.tensor for p in proposals]
        query = torch.stack([p.proposal_features for p in proposals])
        B, N = query.shape[:2]
        stages = []
        for head in self.box_heads:
            roi_features = self.box_pooler(x, [Boxes(b) for b in boxes])
            cls_logits, deltas, query, attn_feats = head(roi_features, query)
            # Decoded in fp32 (also under autocast, whose linear layers give bf16 deltas).
            pred_boxes = self.box2box_transform.apply_deltas(
                clamp_size_deltas(deltas.reshape(B * N, 4).float(), self.box2box_transform),
                torch.cat(boxes),
            ).view(B, N, 4)
            stages.append(StageOutput(cls_logits, pred_boxes, query, attn_feats))
            boxes = list(pred_boxes.detach().unbind(0))
        return stages

    def mask_logits(
        self, stage: int, features: dict[str, Tensor], boxes: list[Tensor], attn_feats: Tensor
    ) -> Tensor:
        """Run mask head ``stage`` (docs/method.md §1.4).

        Args:
            stage: index of the box stage whose query and boxes are used (-1: the last).
            features: FPN maps by name.
            boxes: per image, float (M_i, 4) absolute xyxy boxes (detached).
            attn_feats: float (sum M_i, D), the matching post-attention queries, in the same
                image-by-image order.

        Returns:
            Tensor: float (sum M_i, C, 28, 28) class-specific mask logits.
        """
        x = self._pooler_input(self.mask_pooler, features)
        roi_features = self.mask_pooler(x, [Boxes(b) for b in boxes])
        return self.mask_heads[stage](roi_features, attn_feats)

    def _pooler_input(self, pooler: nn.Module, features: dict[str, Tensor]):
        """The maps ``in_features`` in the form ``pooler`` reads: made once per forward pass
        from :meth:`pooled_features`' result, or for this call from a plain dict of maps."""
        if not isinstance(features, PooledFeatures):
            features = PooledFeatures(features)
        return features.pooler_input(pooler, self.in_features)

    def pooled_features(self, features: dict[str, Tensor]) -> PooledFeatures:
        """The maps the poolers read (``in_features``), for the RoI poolings of one forward
        pass to share (:class:`~queryinst.modeling.roi_heads.pooling.PooledFeatures`: on the
        CPU the maps are flattened once, in any memory format; elsewhere made NCHW-contiguous once).
        Pass the result to :meth:`forward_stages` and :meth:`mask_logits`."""
        return PooledFeatures({name: features[name] for name in self.in_features})

    def forward(self, images, features, proposals, targets=None):
        """Detectron2's ROI-heads interface.

        Args:
            images (ImageList): the padded batch (only its image sizes are used).
            features (dict[str, Tensor]): FPN maps.
            proposals (list[Instances]): from ``LearnableProposals``.
            targets (list[Instances] or None): in training, per image ``gt_boxes``,
                ``gt_classes`` and (with masks) ``gt_masks``, in resized-image pixels.

        Returns:
            In training: ([], dict of losses ``s{t}_loss_{cls,bbox,giou,mask}``, t = 0..5).
            In inference: (list[Instances] in resized-image coordinates, {}).

        Raises:
            ValueError: in training without targets.
        """
        features = self.pooled_features(features)
        stages = self.forward_stages(features, proposals)
        if self.training:
            if targets is None:
                raise ValueError("QueryInst needs 'instances' in every training input")
            return [], self.losses(stages, features, targets)
        image_sizes = [p.image_size for p in proposals]
        return self.inference(stages, features, image_sizes), {}

    def match(self, stages: list[StageOutput], targets: list[Instances]) -> list:
        """Hungarian matching of every stage's queries to the GT (docs/method.md §2.1).

        Returns:
            list: per stage, per image, (query indices, GT indices), int64 (M,) each.
        """
        match_targets = self.match_targets(targets, stages[0].cls_logits.device)
        return [self.criterion.matcher(stage.cls_logits, stage.pred_boxes, match_targets)
                for stage in stages]

    def losses(
        self, stages: list[StageOutput], features: dict[str, Tensor], targets: list[Instances],
        matches: list | None = None,
    ) -> dict[str, Tensor]:
        """Losses at every stage ("parallel supervision", docs/method.md §2).

        Args:
            matches: :meth:`match`'s result for these stages and targets, if the caller has
                it already (the video model reuses it); None: matched here.

        Returns:
            dict[str, Tensor]: ``s{t}_loss_cls``, ``s{t}_loss_bbox``, ``s{t}_loss_giou`` and,
            with masks, ``s{t}_loss_mask`` for each stage t, already weighted.
        """
        device = stages[0].cls_logits.device
        match_targets = self.match_targets(targets, device)
        if matches is None:
            matches = self.match(stages, targets)
        # min(N, G_b) per image: the same at every stage
        num_matched = num_matched_across_processes(matches[0], device)
        if self.mask_on:
            mask_losses = self._mask_losses(stages, features, targets, matches, num_matched)
        losses = {}
        for t, (stage, indices) in enumerate(zip(stages, matches)):
            stage_losses = self.criterion.box_losses(
                stage.cls_logits, stage.pred_boxes, match_targets, indices, num_matched
            )
            if self.mask_on:
                stage_losses.update(mask_losses[t])
            losses.update({f"s{t}_{name}": value for name, value in stage_losses.items()})
        return losses

    @staticmethod
    def match_targets(targets: list[Instances], device) -> list[dict[str, Tensor]]:
        """The matcher's and box losses' view of the GT: per image "labels" (int64 (G,)),
        "boxes" (float (G, 4) absolute xyxy pixels) and "image_size_xyxy" ([w, h, w, h])."""
        return [
            {
                "labels": t.gt_classes,
                "boxes": t.gt_boxes.tensor,
                "image_size_xyxy": torch.tensor(
                    [t.image_size[1], t.image_size[0]] * 2, dtype=torch.float32, device=device
                ),
            }
            for t in targets
        ]

    def _mask_losses(self, stages, features, targets, matches, num_matched) -> list[dict]:
        """Mask head t on stage t's matched queries only, with their detached stage-t boxes,
        for every t; one RoI pooling serves all stages (:func:`pool_stage_boxes`).

        Returns:
            list[dict[str, Tensor]]: per stage, the criterion's ``{"loss_mask": ...}``.
        """
        boxes = [
            [b[q] for b, (q, _) in zip(stage.pred_boxes.detach(), indices)]
            for stage, indices in zip(stages, matches)
        ]
        x = self._pooler_input(self.mask_pooler, features)
        roi_features = pool_stage_boxes(self.mask_pooler, x, boxes)
        logits = [
            self.mask_heads[t](
                roi_features[t], torch.cat([a[q] for a, (q, _) in zip(stage.attn_feats, indices)])
            )
            for t, (stage, indices) in enumerate(zip(stages, matches))
        ]
        mask_targets = stage_mask_targets(targets, boxes, matches, logits[0].shape[-1])
        losses = []
        for t, indices in enumerate(matches):
            gt_classes = torch.cat([tg.gt_classes[g] for tg, (_, g) in zip(targets, indices)])
            losses.append(
                self.criterion.mask_loss(logits[t], gt_classes, mask_targets[t], num_matched)
            )
        return losses

    @torch.no_grad()
    def inference(
        self,
        stages: list[StageOutput],
        features: dict[str, Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[Instances]:
        """Top-k over (queries x classes) of the last stage, masks from the last head
        (docs/method.md §3).

        One query may give several detections with different classes. Each image uses its
        own top-k indices (the mmdet 2.x bug of reusing the last image's is avoided). With
        ``test_mask_scoring`` each score is then multiplied by its mask's :func:`maskness` and
        the k detections sorted again. Then detections with score < ``test_score_thresh`` are
        dropped (none at the default 0).

        Returns:
            list[Instances]: per image, up to k detections sorted by score with ``pred_boxes``
            (absolute xyxy in the resized image, unclipped), ``scores``, ``pred_classes``,
            ``query_indices`` (int64, which query), and with masks ``pred_masks``
            (float (k, 1, 28, 28) probabilities); boxes, scores and masks are float32 also
            when the stages ran under autocast.
        """
        last = stages[-1]
        B, N, C = last.cls_logits.shape
        # Scores and top-k in fp32, also under autocast (INFERENCE_DTYPE).
        scores, flat_idx = last.cls_logits.float().sigmoid().flatten(1).topk(
            min(self.test_topk, N * C))
        labels, queries = flat_idx % C, flat_idx // C
        boxes = torch.gather(last.pred_boxes, 1, queries.unsqueeze(-1).expand(-1, -1, 4))
        if self.mask_on:
            masks = self._top_k_masks(last, features, queries, labels)
        results = []
        for i, image_size in enumerate(image_sizes):
            inst = Instances(image_size)
            inst.pred_boxes = Boxes(boxes[i])
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            inst.query_indices = queries[i]
            if self.mask_on:
                inst.pred_masks = masks[i]
            if self.test_mask_scoring:
                # Instances indexing permutes every field alike.
                inst.scores = inst.scores * maskness(inst.pred_masks[:, 0])
                inst = inst[inst.scores.sort(descending=True).indices]
            if self.test_score_thresh > 0:
                inst = inst[inst.scores >= self.test_score_thresh]
            results.append(inst)
        return results

    def _top_k_masks(
        self, last: StageOutput, features: dict[str, Tensor], queries: Tensor, labels: Tensor
    ) -> Tensor:
        """Mask probabilities of the top-k detections from the last mask head (docs/method.md §3).

        A query can hold several of the k detections (with different classes), and its
        mask logits do not depend on the class. So the head runs once per distinct selected
        query, neither once per detection (as the reference does) nor on all N queries, and
        each detection then takes its class channel: the same values for fewer RoIs.

        Args:
            last: the last stage's output.
            features: FPN maps by name.
            queries, labels: int64 (B, k), the query and class of each detection.

        Returns:
            Tensor: float (B, k, 1, M, M) probabilities, M = 2 x the mask pooler resolution.
        """
        B, N = last.attn_feats.shape[:2]
        rows = (queries + N * torch.arange(B, device=queries.device)[:, None]).flatten()
        if torch.jit.is_tracing():
            # A traced graph (queryinst/export/exporter.py) cannot hold the data-dependent count of
            # distinct queries (it would be frozen as a constant): one RoI per detection,
            # as the reference runs it, gives the same values.
            distinct = rows
            inverse = torch.arange(rows.shape[0], device=rows.device)
            per_image = [queries.shape[1]] * B
        else:
            distinct, inverse = torch.unique(rows, sorted=True, return_inverse=True)
            # Sorted rows are grouped image by image, the order the pooler expects.
            per_image = torch.bincount(distinct // N, minlength=B).tolist()
        boxes = last.pred_boxes.flatten(0, 1)[distinct].split(per_image)
        logits = self.mask_logits(
            -1, features, list(boxes), last.attn_feats.flatten(0, 1)[distinct]
        )
        masks = logits[inverse, labels.flatten()].float().sigmoid()
        return masks.view(B, -1, 1, *masks.shape[-2:])
