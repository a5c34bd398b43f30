"""Hungarian matching between one stage's predictions and the ground truth (docs/method.md §2)."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

# Replaces NaN/inf entries of a cost matrix before it reaches scipy, which rejects them.
# A degenerate prediction (NaN box) then costs far more than any real pair (real costs are
# at most a few tens), so it is matched only when nothing else is left, yet it is small enough
# that the float64 sums of real costs done by scipy keep their precision.
NON_FINITE_COST = 1e6


def focal_class_cost(
    logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
) -> Tensor:
    """
    Focal classification cost between every query and every GT label (docs/method.md §2).

    With p = sigmoid(logits), the cost of query i for GT j with class c_j is
    ``-alpha * (1 - p)^gamma * log(p + eps)  +  (1 - alpha) * p^gamma * log(1 - p + eps)``
    evaluated at [i, c_j]: the focal loss of calling the query positive for c_j minus that of
    calling it negative.

    Args:
        logits (Tensor): float tensor of shape (N, C), classification logits of N queries.
        labels (Tensor): int64 tensor of shape (G,), GT classes in [0, C).
        alpha, gamma (float): focal weighting; eps (float): added inside the logarithms.

    Returns:
        Tensor: float tensor of shape (N, G).
    """
    p = logits.sigmoid()
    pos = -alpha * (1 - p).pow(gamma) * (p + eps).log()
    neg = -(1 - alpha) * p.pow(gamma) * (1 - p + eps).log()
    return pos[:, labels] - neg[:, labels]


def match_cost_matrix(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    image_size_xyxy: Tensor,
    *,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    eps: float = 1e-12,
) -> Tensor:
    """
    Matching cost of one image (docs/method.md §2).

    ``cost_class * focal_class_cost + cost_bbox * L1(normalised xyxy) + cost_giou * (-GIoU)``.
    L1 is taken on boxes divided by the image's [w, h, w, h]; GIoU on absolute boxes.

    Args:
        pred_logits (Tensor): float tensor of shape (N, C), logits of the N queries.
        pred_boxes (Tensor): float tensor of shape (N, 4), absolute (x0, y0, x1, y1) pixels.
        gt_labels (Tensor): int64 tensor of shape (G,), classes in [0, C).
        gt_boxes (Tensor): float tensor of shape (G, 4), absolute (x0, y0, x1, y1) pixels.
        image_size_xyxy (Tensor): float tensor of shape (4,), [w, h, w, h] in pixels of the
            resized image before padding.

    Returns:
        Tensor: float tensor of shape (N, G). It may hold NaN for degenerate boxes; the
        matcher, not this function, makes it finite.
    """
    class_cost = focal_class_cost(
        pred_logits, gt_labels, alpha=focal_alpha, gamma=focal_gamma, eps=eps
    )
    l1_cost = torch.cdist(pred_boxes / image_size_xyxy, gt_boxes / image_size_xyxy, p=1)
    giou_cost = -generalized_box_iou(pred_boxes, gt_boxes)
    return cost_class * class_cost + cost_bbox * l1_cost + cost_giou * giou_cost


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of queries to GT instances per image (docs/method.md §2; the paper
    follows DETR / Sparse R-CNN set prediction). It holds no parameters.

    Each QueryInst stage is matched on its own detached outputs with the cost of
    :func:`match_cost_matrix` and ``scipy.optimize.linear_sum_assignment``.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eps: float = 1e-12,
    ):
        """
        Args:
            cost_class, cost_bbox, cost_giou (float): weights of the focal class cost, the L1
                cost on normalised boxes and the -GIoU cost.
            focal_alpha, focal_gamma, eps (float): parameters of the focal class cost.
        """
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.eps = eps

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            pred_logits (Tensor): float tensor of shape (B, N, C), one stage's logits.
            pred_boxes (Tensor): float tensor of shape (B, N, 4), that stage's boxes as
                absolute (x0, y0, x1, y1) pixels. Both inputs are used detached.
            targets (list[dict]): B dicts with "labels" (int64, (G_b,)), "boxes" (float,
                (G_b, 4), absolute xyxy pixels) and "image_size_xyxy" (float, (4,),
                [w, h, w, h] of the unpadded image), on the predictions' device.

        Returns:
            list[tuple[Tensor, Tensor]]: per image, (pred_indices, gt_indices), int64 tensors
            of length min(N, G_b) on pred_logits' device, sorted by pred_indices. Every query
            and every GT appears at most once. Images without GT give two empty tensors.

        Raises:
            ValueError: if len(targets) != B or pred_boxes is not (B, N, 4).
        """
        B, N, _ = pred_logits.shape
        if len(targets) != B or pred_boxes.shape != (B, N, 4):
            raise ValueError(
                f"Expected {B} targets and boxes of shape {(B, N, 4)}, got {len(targets)} "
                f"targets and boxes of shape {tuple(pred_boxes.shape)}."
            )
        device = pred_logits.device
        indices = []
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            if N == 0 or len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = match_cost_matrix(
                logits.float(),
                boxes.float(),
                target["labels"],
                target["boxes"].float(),
                target["image_size_xyxy"].float(),
                cost_class=self.cost_class,
                cost_bbox=self.cost_bbox,
                cost_giou=self.cost_giou,
                focal_alpha=self.focal_alpha,
                focal_gamma=self.focal_gamma,
                eps=self.eps,
            )
            cost = torch.nan_to_num(
                cost, nan=NON_FINITE_COST, posinf=NON_FINITE_COST, neginf=NON_FINITE_COST
            )
            rows, cols = linear_sum_assignment(cost.cpu().double().numpy())
            # scipy returns sorted rows today; sort anyway since callers rely on it.
            order = rows.argsort()
            indices.append(
                (
                    torch.as_tensor(rows[order], dtype=torch.int64, device=device),
                    torch.as_tensor(cols[order], dtype=torch.int64, device=device),
                )
            )
        return indices
