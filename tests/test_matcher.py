"""HungarianMatcher against brute force over all assignments, with a cost written by hand."""

import itertools
import math

import pytest
import torch

from queryinst.modeling.matcher import HungarianMatcher, match_cost_matrix


def _giou(a, b):
    """GIoU of two xyxy boxes from its definition: IoU - (enclosing - union) / enclosing."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (enclosing - union) / enclosing


def _hand_cost(logits, boxes, labels, gt_boxes, size, alpha=0.25, gamma=2.0, eps=1e-12):
    """docs/method.md §2 cost, element by element: 2 focal + 5 L1(normalised) - 2 GIoU(absolute)."""
    labels, size = labels.tolist(), size.tolist()
    n, g = len(boxes), len(gt_boxes)
    cost = [[0.0] * g for _ in range(n)]
    for i in range(n):
        for j in range(g):
            p = 1 / (1 + math.exp(-float(logits[i][labels[j]])))
            pos = -alpha * (1 - p) ** gamma * math.log(p + eps)
            neg = -(1 - alpha) * p**gamma * math.log(1 - p + eps)
            l1 = sum(abs(float(boxes[i][k]) - float(gt_boxes[j][k])) / size[k] for k in range(4))
            giou = _giou([float(x) for x in boxes[i]], [float(x) for x in gt_boxes[j]])
            cost[i][j] = 2 * (pos - neg) + 5 * l1 - 2 * giou
    return cost


def _brute_force_min(cost):
    """Minimum total cost over all one-to-one assignments of min(N, G) pairs."""
    n, g = len(cost), len(cost[0])
    if n >= g:  # each GT j gets a distinct query qs[j]
        return min(
            sum(cost[q][j] for j, q in enumerate(qs)) for qs in itertools.permutations(range(n), g)
        )
    return min(  # each query i gets a distinct GT gs[i]
        sum(cost[i][j] for i, j in enumerate(gs)) for gs in itertools.permutations(range(g), n)
    )


def _random_boxes(generator, num, w, h):
    x0 = torch.rand(num, generator=generator) * w * 0.6
    y0 = torch.rand(num, generator=generator) * h * 0.6
    bw = 1 + torch.rand(num, generator=generator) * w * 0.4
    bh = 1 + torch.rand(num, generator=generator) * h * 0.4
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def _random_case(seed, n, gts, num_classes=3, w=64.0, h=48.0):
    gen = torch.Generator().manual_seed(seed)
    batch = len(gts)
    logits = torch.randn(batch, n, num_classes, generator=gen) * 2
    boxes = torch.stack([_random_boxes(gen, n, w, h) for _ in range(batch)])
    size = torch.tensor([w, h, w, h])
    targets = [
        {
            "labels": torch.randint(num_classes, (g,), generator=gen),
            "boxes": _random_boxes(gen, g, w, h),
            "image_size_xyxy": size,
        }
        for g in gts
    ]
    return logits, boxes, targets


def _check_indices(pred_idx, gt_idx, n, g):
    assert pred_idx.dtype == gt_idx.dtype == torch.int64
    assert len(pred_idx) == len(gt_idx) == min(n, g)
    assert len(set(pred_idx.tolist())) == len(pred_idx)
    assert len(set(gt_idx.tolist())) == len(gt_idx)
    assert all(0 <= q < n for q in pred_idx.tolist())
    assert all(0 <= j < g for j in gt_idx.tolist())
    assert pred_idx.tolist() == sorted(pred_idx.tolist())


@pytest.mark.parametrize("n,g", [(3, 2), (4, 4), (5, 3), (2, 4), (1, 1), (6, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(n, g, seed):
    logits, boxes, targets = _random_case(seed, n, [g, max(g - 1, 1)])
    indices = HungarianMatcher()(logits, boxes, targets)
    assert len(indices) == 2
    for b, (pred_idx, gt_idx) in enumerate(indices):
        t = targets[b]
        cost = _hand_cost(logits[b], boxes[b], t["labels"], t["boxes"], t["image_size_xyxy"])
        _check_indices(pred_idx, gt_idx, n, len(t["labels"]))
        total = sum(cost[q][j] for q, j in zip(pred_idx.tolist(), gt_idx.tolist()))
        assert total == pytest.approx(_brute_force_min(cost), rel=1e-5, abs=1e-5)


def test_cost_matrix_equals_hand_cost():
    logits, boxes, targets = _random_case(7, 5, [3])
    t = targets[0]
    cost = match_cost_matrix(logits[0], boxes[0], t["labels"], t["boxes"], t["image_size_xyxy"])
    expected = _hand_cost(logits[0], boxes[0], t["labels"], t["boxes"], t["image_size_xyxy"])
    torch.testing.assert_close(cost, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_more_gt_than_queries_matches_every_query_once():
    logits, boxes, targets = _random_case(3, 3, [7])
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    _check_indices(pred_idx, gt_idx, 3, 7)
    assert pred_idx.tolist() == [0, 1, 2]


def test_zero_gt_gives_empty_indices():
    logits, boxes, targets = _random_case(0, 4, [0, 2])
    (p0, g0), (p1, g1) = HungarianMatcher()(logits, boxes, targets)
    assert p0.numel() == g0.numel() == 0 and p0.dtype == g0.dtype == torch.int64
    _check_indices(p1, g1, 4, 2)


def test_runs_without_building_a_graph():
    logits, boxes, targets = _random_case(1, 4, [2])
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    assert not pred_idx.requires_grad and pred_idx.grad_fn is None


def test_nan_boxes_do_not_crash_and_are_avoided():
    logits, boxes, targets = _random_case(2, 4, [2])
    boxes[0, 1] = float("nan")
    boxes[0, 3, 2] = float("inf")
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    _check_indices(pred_idx, gt_idx, 4, 2)
    # Enough healthy queries exist, so the degenerate ones stay unmatched.
    assert set(pred_idx.tolist()) == {0, 2}


def test_all_nan_predictions_still_match():
    logits, boxes, targets = _random_case(2, 3, [2])
    boxes.fill_(float("nan"))
    logits.fill_(float("nan"))
    (pred_idx, gt_idx), = HungarianMatcher()(logits, boxes, targets)
    _check_indices(pred_idx, gt_idx, 3, 2)


def test_wrong_number_of_targets_raises():
    logits, boxes, targets = _random_case(0, 4, [1, 1])
    with pytest.raises(ValueError):
        HungarianMatcher()(logits, boxes, targets[:1])
