"""Slow: a short CPU training run of a reduced QueryInst on a real image lowers the loss.

Data: the first image of ``nuclei_dsb_train`` (a 256x256 tile of the 2018 Data Science Bowl
nuclei image, bundled by ``queryinst.data``; one class, 35 nuclei), read through
Detectron2's ``DatasetMapper`` with bitmask masks and no augmentation but a fixed resize.
The model is trained from random weights on that one image, so this checks that the pieces
learn together (matching, losses, gradients, optimiser), not accuracy.

120 iterations: about 40 s on one idle CPU core, more on a busy machine, and the first run
may download the bundled data. Run with ``pytest -m slow``.
"""
from __future__ import annotations

from pathlib import Path

import detectron2.data.transforms as T
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, pairwise_iou

from queryinst import add_queryinst_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # conftest.py

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "Base-QueryInst.yaml"
DATASET = "nuclei_dsb_train"
ITERS = 120


def _first_training_input() -> dict:
    pytest.importorskip("queryinst.data")  # registers the bundled datasets
    if DATASET not in DatasetCatalog.list():
        pytest.skip(f"{DATASET} is not registered")
    record = DatasetCatalog.get(DATASET)[0]
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.Resize((256, 256))],
        image_format="RGB",
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    return mapper(record)


def _reduced_cfg():
    """Narrow ResNet-50 (1/8 width), 32 channels, 3 stages, 50 queries, 1 class."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    q = cfg.MODEL.QUERYINST
    q.NUM_CLASSES = 1
    q.NUM_PROPOSALS = 50
    q.NUM_STAGES = 3
    q.HIDDEN_DIM = 32
    q.DIM_FEEDFORWARD = 128
    q.NUM_HEADS = 4
    q.DYNAMIC_DIM = 8
    q.MASK_CONV_DIM = 32
    q.TEST_TOPK = 50
    return cfg


def test_short_training_on_nuclei_lowers_loss():
    data = _first_training_input()
    gt = data["instances"]
    assert data["image"].shape == (3, 256, 256) and data["image"].dtype == torch.uint8
    assert isinstance(gt.gt_masks, BitMasks) and len(gt) == 35
    assert (gt.gt_classes == 0).all()

    torch.manual_seed(0)
    model = build_model(_reduced_cfg()).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )
    history = []
    for _ in range(ITERS):
        losses = model([data])
        loss = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())

    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.6 * first, (first, last)

    # Held-in predictions overlap the nuclei they were trained on.
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": data["image"]}])
    pred = out["instances"]
    assert len(pred) == 50 and pred.pred_masks.shape == (50, 256, 256)
    iou = pairwise_iou(pred.pred_boxes, gt.gt_boxes)  # (50 predictions, 35 GT)
    assert iou.max() > 0.5
    covered = (iou.max(dim=0).values > 0.5).float().mean().item()
    # When written: max IoU 0.93, 71% of the nuclei covered, best mask IoU 0.80; loss ratio 0.21.
    assert covered >= 0.4, covered
    # The mask of the best box overlaps that nucleus' mask.
    p, g = divmod(int(iou.argmax()), iou.shape[1])
    pm, gm = pred.pred_masks[p], gt.gt_masks.tensor[g]
    mask_iou = (pm & gm).sum().item() / max((pm | gm).sum().item(), 1)
    assert mask_iou > 0.5, mask_iou
