"""Losses of one QueryInst stage: focal class, L1 and GIoU box, Dice mask (docs/method.md §2)."""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .matcher import HungarianMatcher


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """
    Sigmoid focal loss (Lin et al. 2017; docs/method.md §2.2 ``loss_cls``), summed.

    Per element, with p = sigmoid(logit) and target t in {0, 1}:
    ``-alpha * t * (1 - p)^gamma * log(p) - (1 - alpha) * (1 - t) * p^gamma * log(1 - p)``.

    Args:
        logits (Tensor): float tensor of shape (R, C), R queries over C classes.
        targets (Tensor): float tensor of shape (R, C), one-hot (all zeros for background).

    Returns:
        Tensor: scalar, the sum over all R * C elements.
    """
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")


def l1_box_loss(pred_boxes: Tensor, target_boxes: Tensor, image_size_xyxy: Tensor) -> Tensor:
    """
    L1 loss on boxes normalised by their image size (docs/method.md §2.2 ``loss_bbox``), summed.

    Args:
        pred_boxes, target_boxes (Tensor): float tensors of shape (M, 4), absolute
            (x0, y0, x1, y1) pixels.
        image_size_xyxy (Tensor): float tensor of shape (M, 4) or (4,), [w, h, w, h] in pixels
            of each box's unpadded image.

    Returns:
        Tensor: scalar, sum over the M boxes and 4 coordinates of |pred - target| / size.
    """
    return ((pred_boxes - target_boxes) / image_size_xyxy).abs().sum()


def giou_box_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """
    GIoU loss ``1 - GIoU`` (Rezatofighi et al. 2019; docs/method.md §2.2 ``loss_giou``), summed.

    Args:
        pred_boxes, target_boxes (Tensor): float tensors of shape (M, 4), absolute
            (x0, y0, x1, y1) pixels, compared pairwise (row i with row i).

    Returns:
        Tensor: scalar, sum over the M pairs (torchvision adds eps 1e-7 to denominators).
    """
    return generalized_box_iou_loss(pred_boxes, target_boxes, reduction="sum")


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """
    Dice loss (docs/method.md §2.2 ``loss_mask``), summed over masks.

    Per mask: ``1 - 2 * sum(p * t) / (sum(p^2) + sum(t^2) + eps)``, sums over pixels.

    Args:
        probs (Tensor): float tensor of shape (M, H, W), probabilities: the caller has applied
            the sigmoid (exactly once).
        targets (Tensor): float tensor of shape (M, H, W) with values in {0, 1}.

    Returns:
        Tensor: scalar, the sum of the M per-mask losses.
    """
    probs = probs.flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(1)
    denominator = (probs * probs).sum(1) + (targets * targets).sum(1) + eps
    return (1 - numerator / denominator).sum()


def num_matched_across_processes(indices: list[tuple[Tensor, Tensor]], device) -> float:
    """
    Normaliser of every loss: matched pairs of the batch averaged over processes, >= 1
    (docs/method.md §2: "a sum divided by the number of matched queries, averaged over all GPUs,
    clamped to >= 1").

    Args:
        indices (list[tuple[Tensor, Tensor]]): :class:`HungarianMatcher` output.
        device (torch.device): where the all_reduce runs (a CUDA device under NCCL).

    Returns:
        float: mean over processes of the matched count; the local count without an
        initialised process group. Never below 1.
    """
    count = torch.tensor(
        float(sum(len(pred_idx) for pred_idx, _ in indices)), dtype=torch.float32, device=device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(count.item(), 1.0)


class QueryInstCriterion(nn.Module):
    """
    Weighted losses of one stage given its matching (docs/method.md §2; every stage has weight
    1, so the caller sums stages). It holds no parameters; use :meth:`box_losses` and
    :meth:`mask_loss` (there is no ``forward``).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_eps: float = 1e-5,
    ):
        """
        Args:
            num_classes (int): C, foreground classes (no background logit).
            matcher (HungarianMatcher): kept here so callers build matcher and losses together.
            class_weight, l1_weight, giou_weight, mask_weight (float): loss weights.
            focal_alpha, focal_gamma (float): focal loss parameters; dice_eps (float): Dice eps.
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.mask_weight = mask_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.dice_eps = dice_eps

    def box_losses(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_matched: float,
    ) -> dict[str, Tensor]:
        """
        Args:
            pred_logits (Tensor): float tensor of shape (B, N, C).
            pred_boxes (Tensor): float tensor of shape (B, N, 4), absolute (x0, y0, x1, y1)
                pixels, not detached.
            targets (list[dict]): as for :class:`HungarianMatcher`, on the predictions' device.
            indices (list[tuple[Tensor, Tensor]]): the matcher's output for these predictions.
            num_matched (float): normaliser from :func:`num_matched_across_processes`.

        Returns:
            dict[str, Tensor]: scalars "loss_cls" (all B * N queries x C classes),
            "loss_bbox" and "loss_giou" (matched queries only), each weighted and divided by
            num_matched. Without any matched query the box losses are zeros that stay in the
            graph, so every parameter gets a (zero) gradient under DDP.

        Raises:
            ValueError: if C != num_classes.
        """
        if pred_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"Expected {self.num_classes} classes, "
                f"got logits of shape {tuple(pred_logits.shape)}."
            )
        batch_idx = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(indices)])
        query_idx = torch.cat([p for p, _ in indices])
        gt_labels = torch.cat([t["labels"][g] for t, (_, g) in zip(targets, indices)])

        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx, query_idx, gt_labels] = 1
        loss_cls = focal_loss(pred_logits, onehot, self.focal_alpha, self.focal_gamma)
        losses = {"loss_cls": loss_cls * self.class_weight / num_matched}

        if len(query_idx) == 0:
            zero = pred_boxes.sum() * 0
            losses.update(loss_bbox=zero, loss_giou=zero.clone())
            return losses
        matched = pred_boxes[batch_idx, query_idx]
        gt_boxes = torch.cat([t["boxes"][g] for t, (_, g) in zip(targets, indices)])
        sizes = torch.cat(
            [t["image_size_xyxy"].expand(len(g), 4) for t, (_, g) in zip(targets, indices)]
        )
        gt_boxes, sizes = gt_boxes.to(matched.dtype), sizes.to(matched.dtype)
        loss_bbox = l1_box_loss(matched, gt_boxes, sizes)
        loss_giou = giou_box_loss(matched, gt_boxes)
        losses["loss_bbox"] = loss_bbox * self.l1_weight / num_matched
        losses["loss_giou"] = loss_giou * self.giou_weight / num_matched
        return losses

    def mask_loss(
        self, mask_logits: Tensor, gt_classes: Tensor, mask_targets: Tensor, num_matched: float
    ) -> dict[str, Tensor]:
        """
        Args:
            mask_logits (Tensor): float tensor of shape (M, C, H, W) (H = W = 28), class-specific
                mask logits of the M matched queries, concatenated in the order of the
                matcher's indices (image by image).
            gt_classes (Tensor): int64 tensor of shape (M,), the matched GT classes.
            mask_targets (Tensor): float tensor of shape (M, H, W) in {0, 1}.
            num_matched (float): normaliser from :func:`num_matched_across_processes`.

        Returns:
            dict[str, Tensor]: {"loss_mask": scalar}, the Dice loss of the sigmoid of each GT
            class channel, summed, times mask_weight, divided by num_matched. A graph-connected
            zero when M == 0.

        Raises:
            ValueError: if mask_targets' shape is not (M, H, W).
        """
        M, _, H, W = mask_logits.shape
        if mask_targets.shape != (M, H, W):
            raise ValueError(
                f"Expected mask targets of shape {(M, H, W)}, got {tuple(mask_targets.shape)}."
            )
        if M == 0:
            return {"loss_mask": mask_logits.sum() * 0}
        selected = mask_logits[torch.arange(M, device=mask_logits.device), gt_classes]
        loss = dice_loss(selected.sigmoid(), mask_targets.to(selected), self.dice_eps)
        return {"loss_mask": loss * self.mask_weight / num_matched}
