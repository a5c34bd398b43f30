"""The learnable proposals' initial boxes (MODEL.QUERYINST.PROPOSAL_BOX_INIT), checked against
hand-computed boxes and geometric invariants (a grid tiles the image: no overlap, full cover)."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import ImageList
from torchvision.ops import box_area, box_iou

from queryinst import add_queryinst_config
from queryinst.modeling.proposal_generator.learnable_proposals import LearnableProposals


def _generator(box_init, num_proposals):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.MODEL.QUERYINST.NUM_PROPOSALS = num_proposals
    cfg.MODEL.QUERYINST.HIDDEN_DIM = 8
    cfg.MODEL.QUERYINST.PROPOSAL_BOX_INIT = box_init
    return LearnableProposals(cfg)


def _absolute_boxes(generator, h, w):
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    proposals, losses = generator(images, {})
    assert losses == {}
    return proposals[0].proposal_boxes.tensor


def test_image_init_is_the_whole_image():
    boxes = _absolute_boxes(_generator("image", 5), 30, 40)
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 40.0, 30.0]] * 5))


def test_grid_init_of_seven_queries_by_hand():
    # g = ceil(sqrt(7)) = 3 boxes a row, ceil(7 / 3) = 3 rows of 10 pixels; the last row's
    # one box spans the whole width (a 3 x 3 grid filled row by row would leave 2/3 of it bare)
    boxes = _absolute_boxes(_generator("grid", 7), 30, 60)  # full-row cells of 20 x 10 pixels
    expected = torch.tensor([[0, 0, 20, 10], [20, 0, 40, 10], [40, 0, 60, 10],
                             [0, 10, 20, 20], [20, 10, 40, 20], [40, 10, 60, 20],
                             [0, 20, 60, 30]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_proposals", [2, 3, 100, 150, 500])
def test_grid_init_tiles_the_whole_image(num_proposals):
    h, w = 536, 700
    boxes = _absolute_boxes(_generator("grid", num_proposals), h, w)
    iou = box_iou(boxes, boxes)
    off_diagonal = iou[~torch.eye(num_proposals, dtype=torch.bool)]
    assert off_diagonal.max() < 1e-4  # no two boxes overlap
    assert abs(box_area(boxes).sum().item() - h * w) < 1e-4 * h * w  # together: the image
    assert boxes[:, :2].min() > -1e-3 and (boxes[:, 2] <= w + 1e-3).all()
    assert (boxes[:, 3] <= h + 1e-3).all()
    # every third pixel centre, brute force: in exactly one box (none left without a query)
    ys, xs = torch.meshgrid(torch.arange(0, h, 3) + 0.5, torch.arange(0, w, 3) + 0.5,
                            indexing="ij")
    inside = ((xs[..., None] > boxes[:, 0]) & (xs[..., None] < boxes[:, 2])
              & (ys[..., None] > boxes[:, 1]) & (ys[..., None] < boxes[:, 3]))
    assert torch.equal(inside.sum(-1), torch.ones_like(xs, dtype=torch.long))


def test_grid_init_of_a_square_count_is_the_square_grid():
    boxes = _absolute_boxes(_generator("grid", 100), 100, 200)  # cells of 20 x 10 pixels
    x0, y0 = boxes[:, 0], boxes[:, 1]
    torch.testing.assert_close(x0, (torch.arange(100) % 10 * 20).float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(y0, (torch.arange(100) // 10 * 10).float(), rtol=0, atol=1e-3)
    torch.testing.assert_close(boxes[:, 2] - x0, torch.full((100,), 20.0), rtol=0, atol=1e-3)


def test_unknown_init_is_refused_with_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"PROPOSAL_BOX_INIT = 'random'.*\['grid', 'image'\]"):
        _generator("random", 4)
