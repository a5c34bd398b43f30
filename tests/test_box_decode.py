"""Box decoding of the stages (docs/method.md §1.3, step 8): the official clamp |dw|, |dh| <=
log(1000/16).

Truth is the formula of the official decoder written out (mmdet ``delta2bbox`` with stds
(0.5, 0.5, 1, 1)): centre shift by delta * std * size, size times exp(clamp(delta * std)).
"""
import math

import torch
from detectron2.modeling.box_regression import Box2BoxTransform

from queryinst.modeling.roi_heads.roi_heads import clamp_size_deltas

CLAMP = math.log(1000.0 / 16)


def _official_decode(deltas, boxes):
    d = deltas * torch.tensor([0.5, 0.5, 1.0, 1.0])
    ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    ctr = ctr + size * d[:, :2]
    size = size * d[:, 2:].clamp(-CLAMP, CLAMP).exp()
    return torch.cat([ctr - size / 2, ctr + size / 2], 1)


def test_decode_clamps_shrinking_and_growing_like_the_official_decoder():
    transform = Box2BoxTransform(weights=(2.0, 2.0, 1.0, 1.0), scale_clamp=CLAMP)
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0]] * 4)
    deltas = torch.tensor(
        [[0.2, -0.4, -10.0, 10.0], [0.0, 0.0, -4.0, 4.0], [1.0, 1.0, 0.0, -30.0], [0, 0, 5.0, -5.0]]
    )
    ours = transform.apply_deltas(clamp_size_deltas(deltas, transform), boxes)
    torch.testing.assert_close(ours, _official_decode(deltas, boxes), rtol=1e-5, atol=1e-4)
    widths = ours[:, 2] - ours[:, 0]
    assert torch.isclose(widths[0], torch.tensor(100.0 * math.exp(-CLAMP)))


def test_clamp_keeps_centre_deltas_and_gradient_inside_the_range():
    transform = Box2BoxTransform(weights=(2.0, 2.0, 1.0, 1.0), scale_clamp=CLAMP)
    deltas = torch.tensor([[3.0, -3.0, -1.0, -9.0]], requires_grad=True)
    out = clamp_size_deltas(deltas, transform)
    assert out.tolist()[0][:3] == [3.0, -3.0, -1.0]
    assert math.isclose(out[0, 3].item(), -CLAMP, rel_tol=1e-6)
    out.sum().backward()
    assert deltas.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]
