"""Loss functions and QueryInstCriterion against values worked out by hand (docs/method.md §2)."""

import math

import pytest
import torch
import torch.distributed as dist

from queryinst.modeling.criterion import (
    QueryInstCriterion,
    dice_loss,
    focal_loss,
    giou_box_loss,
    l1_box_loss,
    num_matched_across_processes,
)
from queryinst.modeling.matcher import HungarianMatcher


def _criterion(num_classes=3):
    return QueryInstCriterion(num_classes=num_classes, matcher=HungarianMatcher())


def test_focal_single_logits():
    # p = 0.5: positive = alpha * 0.5^2 * log 2, negative = (1 - alpha) * 0.5^2 * log 2.
    zero = torch.zeros(1, 1)
    assert focal_loss(zero, torch.ones(1, 1)).item() == pytest.approx(0.25 * 0.25 * math.log(2))
    assert focal_loss(zero, torch.zeros(1, 1)).item() == pytest.approx(0.75 * 0.25 * math.log(2))


def test_focal_equals_formula_elementwise():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen) * 3
    targets = torch.zeros(5, 4)
    targets[0, 1] = targets[2, 3] = targets[4, 0] = 1
    expected = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        expected += -0.25 * t * (1 - p) ** 2 * math.log(p)
        expected += -0.75 * (1 - t) * p**2 * math.log(1 - p)
    assert focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_l1_normalised_by_image_size():
    pred = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    gt = torch.tensor([[0.0, 0.0, 30.0, 40.0]])
    size = torch.tensor([100.0, 50.0, 100.0, 50.0])  # w = 100, h = 50
    assert l1_box_loss(pred, gt, size).item() == pytest.approx(10 / 100 + 20 / 50)


def test_giou_of_known_boxes():
    # Intersection 1, union 4 + 4 - 1 = 7, enclosing 3 x 3 = 9: GIoU = 1/7 - 2/9 = -5/63.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert giou_box_loss(a, b).item() == pytest.approx(1 + 5 / 63, rel=1e-5)
    assert giou_box_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_identical_masks_is_zero():
    t = torch.zeros(2, 4, 4)
    t[0, :2] = 1
    t[1, 1:3, 1:3] = 1
    assert dice_loss(t, t).item() == pytest.approx(0.0, abs=1e-5)


def test_dice_half_probability_against_half_ones():
    # 16 pixels, 8 ones: sum(p t) = 4, sum(p^2) = 4, sum(t^2) = 8 -> 1 - 8 / (12 + eps).
    p = torch.full((1, 4, 4), 0.5)
    t = torch.zeros(1, 4, 4)
    t[0, :2] = 1
    assert dice_loss(p, t).item() == pytest.approx(1 - 8 / (12 + 1e-5), rel=1e-6)


def _two_image_case():
    """Image 0 (w=100, h=50) has two GT, image 1 (w=80, h=60) none; 3 queries, 3 classes."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, generator=gen, requires_grad=True)
    boxes = torch.tensor(
        [
            [[10.0, 10.0, 40.0, 30.0], [0.0, 0.0, 20.0, 20.0], [50.0, 5.0, 90.0, 45.0]],
            [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 80.0, 60.0]],
        ],
        requires_grad=True,
    )
    targets = [
        {
            "labels": torch.tensor([2, 0]),
            "boxes": torch.tensor([[12.0, 8.0, 40.0, 30.0], [50.0, 0.0, 100.0, 50.0]]),
            "image_size_xyxy": torch.tensor([100.0, 50.0, 100.0, 50.0]),
        },
        {
            "labels": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros(0, 4),
            "image_size_xyxy": torch.tensor([80.0, 60.0, 80.0, 60.0]),
        },
    ]
    # Query 0 <-> GT 0, query 2 <-> GT 1; nothing in image 1.
    indices = [
        (torch.tensor([0, 2]), torch.tensor([0, 1])),
        (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
    ]
    return logits, boxes, targets, indices


def test_box_losses_weights_and_normalisation():
    logits, boxes, targets, indices = _two_image_case()
    losses = _criterion().box_losses(logits, boxes, targets, indices, num_matched=4.0)
    onehot = torch.zeros(2, 3, 3)
    onehot[0, 0, 2] = onehot[0, 2, 0] = 1
    expected_cls = 2.0 * focal_loss(logits, onehot) / 4
    # |[-2, 2, 0, 0]| / [100, 50, 100, 50] and |[0, 5, -10, -5]| / [100, 50, 100, 50].
    expected_l1 = 5.0 * (0.02 + 0.04 + 0.1 + 0.1 + 0.1) / 4
    expected_giou = 2.0 * giou_box_loss(boxes[0, [0, 2]], targets[0]["boxes"]) / 4
    assert losses.keys() == {"loss_cls", "loss_bbox", "loss_giou"}
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(expected_l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(expected_giou.item(), rel=1e-6)
    halved = _criterion().box_losses(logits, boxes, targets, indices, num_matched=8.0)
    for name in losses:
        assert halved[name].item() == pytest.approx(losses[name].item() / 2, rel=1e-6)


def test_bbox_gradient_reaches_matched_boxes_only():
    logits, boxes, targets, indices = _two_image_case()
    losses = _criterion().box_losses(logits, boxes, targets, indices, num_matched=2.0)
    losses["loss_bbox"].backward()
    # d/dx of 5 * |x - x_gt| / size / 2 is 5 * sign / size / 2.
    expected = torch.zeros(2, 3, 4)
    expected[0, 0] = torch.tensor([-1.0, 1.0, 0.0, 0.0]) * 5 / torch.tensor([100, 50, 100, 50]) / 2
    expected[0, 2] = torch.tensor([0.0, 1.0, -1.0, -1.0]) * 5 / torch.tensor([100, 50, 100, 50]) / 2
    torch.testing.assert_close(boxes.grad, expected)


def test_no_gt_gives_only_classification_and_stays_in_graph():
    logits, boxes, targets, indices = _two_image_case()
    targets, indices = targets[1:], indices[1:]
    logits, boxes = logits[1:], boxes[1:]
    losses = _criterion().box_losses(logits, boxes, targets, indices, num_matched=1.0)
    expected_cls = 2.0 * focal_loss(logits, torch.zeros(1, 3, 3))
    assert losses["loss_cls"].item() == pytest.approx(expected_cls.item(), rel=1e-6)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_bbox"].grad_fn is not None and losses["loss_giou"].grad_fn is not None
    sum(losses.values()).backward()


def test_mask_loss_uses_gt_class_channel_and_sigmoid_once():
    # Two masks, 3 classes, 4x4. The GT-class channel is +inf-like on the target's ones and
    # 0 (p = 0.5) elsewhere; other channels are noise that must be ignored.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=gen) * 5
    targets = torch.zeros(2, 4, 4)
    targets[0, :2] = 1
    targets[1, :, :1] = 1
    gt_classes = torch.tensor([1, 2])
    logits[0, 1] = torch.where(targets[0] > 0, 50.0, 0.0)
    logits[1, 2] = 0.0
    logits.requires_grad_(True)
    loss = _criterion().mask_loss(logits, gt_classes, targets, num_matched=4.0)["loss_mask"]
    # Mask 0: sum(pt) = 8, sum(p^2) = 8 + 8 * 0.25 = 10, sum(t^2) = 8 -> 1 - 16 / 18.
    # Mask 1: p = 0.5 everywhere, 4 ones: sum(pt) = 2, sum(p^2) = 4, sum(t^2) = 4 -> 1 - 4 / 8.
    expected = 8.0 * ((1 - 16 / (18 + 1e-5)) + (1 - 4 / (8 + 1e-5))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[1, 2].abs().sum() > 0


def test_mask_loss_without_masks_is_graph_connected_zero():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    no_classes = torch.zeros(0, dtype=torch.int64)
    loss = _criterion().mask_loss(logits, no_classes, torch.zeros(0, 28, 28), 1.0)
    assert loss["loss_mask"].item() == 0 and loss["loss_mask"].grad_fn is not None


def test_mask_loss_shape_mismatch_raises():
    with pytest.raises(ValueError):
        _criterion().mask_loss(
            torch.zeros(2, 3, 28, 28), torch.tensor([0, 1]), torch.zeros(2, 14, 14), 1.0
        )


def test_wrong_num_classes_raises():
    logits, boxes, targets, indices = _two_image_case()
    with pytest.raises(ValueError):
        _criterion(num_classes=5).box_losses(logits, boxes, targets, indices, 1.0)


def test_num_matched_without_distributed():
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    assert num_matched_across_processes(indices, "cpu") == 3.0
    empty = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))]
    assert num_matched_across_processes(empty, "cpu") == 1.0


def test_num_matched_with_single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        indices = [(torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))]
        assert num_matched_across_processes(indices, "cpu") == 3.0
    finally:
        dist.destroy_process_group()
