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
    # g = ceil(sqrt(7)) = 3: cells of 1/3, filled row by row, the last row holding one box
    boxes = _absolute_boxes(_generator("grid", 7), 30, 60)  # cells of 20 x 10 pixels
    expected = torch.tensor([[0, 0, 20, 10], [20, 0, 40, 10], [40, 0, 60, 10],
                             [0, 10, 20, 20], [20, 10, 40, 20], [40, 10, 60, 20],
                             [0, 20, 20, 30]], dtype=torch.float32)
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-4)


def test_grid_init_of_100_queries_tiles_the_image():
    h, w = 320, 418
    boxes = _absolute_boxes(_generator("grid", 100), h, w)
    iou = box_iou(boxes, boxes)
    off_diagonal = iou[~torch.eye(100, dtype=torch.bool)]
    assert off_diagonal.max() < 1e-4  # no two boxes overlap
    assert abs(box_area(boxes).sum().item() - h * w) < 1e-2 * h * w / 100  # together: the image
    assert boxes[:, :2].min() > -1e-4 and (boxes[:, 2] <= w + 1e-3).all()
    assert (boxes[:, 3] <= h + 1e-3).all()


def test_unknown_init_is_refused_with_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"PROPOSAL_BOX_INIT = 'random'.*\['grid', 'image'\]"):
        _generator("random", 4)
