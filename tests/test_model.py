"""Tests of the assembled QueryInst model: backbone -> learnable proposals -> stages -> output.

The heads, matcher and losses have their own tests (test_heads.py, test_matcher.py,
test_losses.py); these tests check how they are put together. Truth comes from outside the
code under test:

- the parameter count of the R50-FPN model is added up by hand from the shapes
  (docs/method.md §1), with a torchvision ResNet-50 as a cross-check of the backbone part;
- the inference rule of docs/method.md §3 (top-k over queries x classes, masks of the same query and
  class) is re-applied by brute force to the stage outputs;
- invariances: a batch of two images gives what two batches of one give;
- the stop-gradients of docs/method.md §1 (detached RoIs, undetached queries) are read off autograd;
- hand-made masks and boxes give the expected mask targets and pasted masks.

Most tests use a reduced model (narrow ResNet-50, 32 channels, few queries and stages) from
``configs/Base-QueryInst.yaml`` with smaller sizes; only the parameter count builds the full
R50 model.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from torch import nn

from queryinst import add_queryinst_config, queryinst_postprocess
from queryinst.modeling.roi_heads.roi_heads import (
    float_masks_where_read,
    mask_targets_in_boxes,
    maskness,
    stage_mask_targets,
)

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "Base-QueryInst.yaml"

# Per-stage parameter counts derived by hand in tests/test_heads.py (docs/method.md §1 shapes,
# C = 80).
BOX_STAGE_PARAMS = 13_235_412
MASK_STAGE_PARAMS = 11_066_320

LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_giou", "loss_mask")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------- helpers


def small_cfg(
    *,
    num_classes: int = 3,
    num_proposals: int = 8,
    num_stages: int = 3,
    mask_on: bool = True,
    test_topk: int = 100,
):
    """The base config with a narrow ResNet-50 and small heads (hidden dim 32).

    The backbone keeps ResNet-50's depth and torchvision-style bottlenecks (the code path of
    the real model) at 1/8 of the width: stem 16, bottleneck widths 8-64, outputs 32-256.
    """
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    q = cfg.MODEL.QUERYINST
    q.NUM_CLASSES = num_classes
    q.NUM_PROPOSALS = num_proposals
    q.NUM_STAGES = num_stages
    q.HIDDEN_DIM = 32
    q.DIM_FEEDFORWARD = 64
    q.NUM_HEADS = 4
    q.DYNAMIC_DIM = 8
    q.MASK_CONV_DIM = 16
    q.TEST_TOPK = test_topk
    return cfg


def build_small(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(small_cfg(**kwargs))


def random_image(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 (3, h, w) image: smooth blobs plus noise, so features vary across the image."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=gen)
    smooth = nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    noise = torch.rand(1, 3, h, w, generator=gen)
    return ((0.8 * smooth + 0.2 * noise)[0] * 255).to(torch.uint8)


def gt_instances(
    h: int, w: int, boxes, classes, mask_format: str = "bitmask"
) -> Instances:
    """GT in resized-image pixels; each mask is the filled (pixel-rounded) box."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
    if mask_format == "bitmask":
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
    else:
        inst.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
        )
    return inst


def random_gt(h: int, w: int, num: int, num_classes: int, seed: int, mask_format="bitmask"):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(num, generator=gen) * w * 0.6
    y0 = torch.rand(num, generator=gen) * h * 0.6
    bw = 8 + torch.rand(num, generator=gen) * w * 0.35
    bh = 8 + torch.rand(num, generator=gen) * h * 0.35
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
    classes = torch.randint(num_classes, (num,), generator=gen)
    return gt_instances(h, w, boxes, classes, mask_format)


def train_input(h, w, seed, instances):
    return {"image": random_image(h, w, seed), "instances": instances}


def run_stages(model, inputs):
    """Preprocessing, backbone, proposals and all box stages, as the model runs them."""
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    return images, features, proposals, model.roi_heads.forward_stages(features, proposals)


def nonzero_grads(loss, model) -> set[str]:
    """Names of the trainable parameters that get a non-zero gradient from ``loss``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(named, grads) if g is not None and bool(g.abs().sum() > 0)}


@pytest.fixture(scope="module")
def eval_model():
    """Reduced model in eval mode: 3 classes, 8 queries, 3 stages, top-k 100 (> N * C)."""
    return build_small(seed=0).eval()


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("sizes", [[(96, 160)], [(96, 160), (130, 100)]])
def test_stage_shapes_and_dtypes(eval_model, sizes):
    model, (B, N, C, D) = eval_model, (len(sizes), 8, 3, 32)
    inputs = [{"image": random_image(h, w, seed=i)} for i, (h, w) in enumerate(sizes)]

    with torch.no_grad():
        images, features, proposals, stages = run_stages(model, inputs)

    assert images.image_sizes == [tuple(s) for s in sizes]
    # One canvas for the batch: the largest height and width, rounded up to a multiple of 32.
    canvas = [32 * math.ceil(max(size[k] for size in sizes) / 32) for k in (0, 1)]
    assert tuple(images.tensor.shape) == (B, 3, *canvas)
    for name, stride in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32)):
        assert tuple(features[name].shape) == (B, D, canvas[0] // stride, canvas[1] // stride)
    assert sorted(features) == ["p2", "p3", "p4", "p5"]  # no P6 (docs/method.md §1)
    for (h, w), p in zip(sizes, proposals):
        # docs/method.md §1: (0.5, 0.5, 1, 1) scaled by the unpadded size of *this* image.
        assert torch.equal(p.proposal_boxes.tensor, torch.tensor([[0.0, 0, w, h]] * N))
        assert p.proposal_features.shape == (N, D)
    assert len(stages) == 3
    for s in stages:
        assert s.cls_logits.shape == (B, N, C)
        assert s.pred_boxes.shape == (B, N, 4)
        assert s.object_feats.shape == (B, N, D)
        assert s.attn_feats.shape == (B, N, D)
        for t in (s.cls_logits, s.pred_boxes, s.object_feats, s.attn_feats):
            assert t.dtype == torch.float32
            assert torch.isfinite(t).all()
        x0, y0, x1, y1 = s.pred_boxes.unbind(-1)
        assert (x1 > x0).all() and (y1 > y0).all()  # exp(dw) * w > 0: never degenerate


def test_inference_fields_and_rescaling(eval_model):
    model, h, w = eval_model, 96, 160
    image = random_image(h, w, seed=3)
    out_h, out_w = 240, 200  # scale_y = 2.5, scale_x = 1.25: different on purpose

    with torch.no_grad():
        same = model([{"image": image, "height": h, "width": w}])[0]["instances"]
        scaled = model([{"image": image, "height": out_h, "width": out_w}])[0]["instances"]
        default = model([{"image": image}])[0]["instances"]  # no height/width: input size

    R = 8 * 3  # top-k with k = min(TEST_TOPK = 100, N * C = 24)
    for inst, (H, W) in ((same, (h, w)), (scaled, (out_h, out_w)), (default, (h, w))):
        assert inst.image_size == (H, W)
        assert set(inst.get_fields()) == {
            "pred_boxes", "scores", "pred_classes", "query_indices", "pred_masks"
        }
        assert isinstance(inst.pred_boxes, Boxes) and inst.pred_boxes.tensor.shape == (R, 4)
        assert inst.scores.shape == (R,) and inst.scores.dtype == torch.float32
        assert ((inst.scores > 0) & (inst.scores < 1)).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()  # sorted by score
        assert inst.pred_classes.dtype == torch.int64 and inst.pred_classes.shape == (R,)
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()
        assert ((inst.query_indices >= 0) & (inst.query_indices < 8)).all()
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape == (R, H, W)
        # Every detection is one (query, class) pair, each pair at most once.
        pairs = set(zip(inst.query_indices.tolist(), inst.pred_classes.tolist()))
        assert len(pairs) == R

    for field in ("scores", "pred_classes", "query_indices"):
        assert torch.equal(same.get(field), scaled.get(field))
        assert torch.equal(same.get(field), default.get(field))
    assert torch.equal(same.pred_boxes.tensor, default.pred_boxes.tensor)
    assert torch.equal(same.pred_masks, default.pred_masks)
    factors = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h])
    torch.testing.assert_close(scaled.pred_boxes.tensor, same.pred_boxes.tensor * factors)

    # A pasted mask lies inside its (rescaled) box, up to one pixel of bilinear spill.
    for inst in (same, scaled):
        H, W = inst.image_size
        ys, xs = torch.arange(H)[:, None] + 0.5, torch.arange(W)[None, :] + 0.5
        for box, mask in zip(inst.pred_boxes.tensor, inst.pred_masks):
            x0, y0, x1, y1 = box.tolist()
            inside = (xs > x0 - 1) & (xs < x1 + 1) & (ys > y0 - 1) & (ys < y1 + 1)
            assert not (mask & ~inside).any()


def test_inference_follows_topk_rule():
    """docs/method.md §3 by brute force: sort all (query, class) scores of the last stage,
    keep k."""
    model = build_small(seed=1, num_classes=4, num_proposals=6, test_topk=10).eval()
    # The plain modules, as run_stages runs them (the fast-inference keys are tested in
    # test_inference_speedups.py): the same stages to the last bit.
    model.fuse_bn_inference, model.inference_memory_format = False, "contiguous"
    N, C, k = 6, 4, 10
    inputs = [{"image": random_image(96, 128, seed=5)}, {"image": random_image(80, 120, seed=6)}]

    with torch.no_grad():
        _, features, _, stages = run_stages(model, inputs)
        results = model.inference(inputs, do_postprocess=False)
    last = stages[-1]

    for i, res in enumerate(results):
        probs = last.cls_logits[i].sigmoid()
        ranked = sorted(
            ((probs[q, c].item(), q, c) for q, c in itertools.product(range(N), range(C))),
            reverse=True,
        )[:k]
        assert res.scores.tolist() == pytest.approx([s for s, _, _ in ranked], abs=0, rel=1e-6)
        assert res.query_indices.tolist() == [q for _, q, _ in ranked]
        assert res.pred_classes.tolist() == [c for _, _, c in ranked]
        expected_boxes = last.pred_boxes[i, [q for _, q, _ in ranked]]
        assert torch.equal(res.pred_boxes.tensor, expected_boxes)
        assert res.pred_masks.shape == (k, 1, 28, 28)
        # Each mask is the last mask head run on that query alone, at that class.
        with torch.no_grad():
            for j, (_, q, c) in enumerate(ranked):
                single = {name: f[i : i + 1] for name, f in features.items()}
                logits = model.roi_heads.mask_logits(
                    -1, single, [last.pred_boxes[i, q : q + 1]], last.attn_feats[i, q : q + 1]
                )
                torch.testing.assert_close(
                    res.pred_masks[j, 0], logits[0, c].sigmoid(), rtol=1e-5, atol=1e-5
                )


def _detect(cfg, state_dict, inputs):
    model = build_model(cfg).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


def test_score_thresh_and_detections_per_image_are_honoured():
    """Issue 10 item 12: MODEL.ROI_HEADS.SCORE_THRESH_TEST and TEST.DETECTIONS_PER_IMAGE.

    Same weights, three configs: the default keeps all top-k (threshold 0, as the official
    model); a threshold gives exactly the default's detections with score >= t (same boxes,
    classes, masks); a smaller DETECTIONS_PER_IMAGE gives the default's top-scoring ones.
    """
    cfg = small_cfg(num_classes=4, num_proposals=6, test_topk=20)
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0  # not Detectron2's 0.05
    torch.manual_seed(3)
    weights = build_model(cfg).state_dict()
    inputs = [{"image": random_image(96, 128, seed=9)}, {"image": random_image(80, 120, seed=10)}]
    default = _detect(cfg, weights, inputs)
    assert [len(r) for r in default] == [20, 20]

    thresh = float(default[0].scores.median())  # a threshold inside the score range
    cfg_t = cfg.clone()
    cfg_t.MODEL.ROI_HEADS.SCORE_THRESH_TEST = thresh
    cfg_cap = cfg.clone()
    cfg_cap.TEST.DETECTIONS_PER_IMAGE = 7
    cuts = _detect(cfg_t, weights, inputs)
    assert 0 < len(cuts[0]) < 20
    for full, cut, capped in zip(default, cuts, _detect(cfg_cap, weights, inputs)):
        keep = full.scores >= thresh
        assert len(cut) == int(keep.sum()) and len(capped) == 7
        for name in ("scores", "pred_classes", "query_indices", "pred_masks"):
            assert torch.equal(cut.get(name), full.get(name)[keep])
            assert torch.equal(capped.get(name), full.get(name)[:7])
        assert torch.equal(cut.pred_boxes.tensor, full.pred_boxes.tensor[keep])
        assert torch.equal(capped.pred_boxes.tensor, full.pred_boxes.tensor[:7])


def test_maskness_by_hand():
    """Mean probability over the pixels above 0.5; 0 for a mask with none (docs/method.md §3)."""
    masks = torch.zeros(3, 2, 2)
    masks[0] = torch.tensor([[0.9, 0.7], [0.5, 0.1]])  # 0.5 is not foreground: (0.9 + 0.7) / 2
    masks[1] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    masks[2] = torch.tensor([[0.2, 0.4], [0.5, 0.0]])  # no foreground pixel
    assert maskness(masks).tolist() == pytest.approx([0.8, 1.0, 0.0], abs=1e-7)
    assert maskness(masks.view(1, 3, 2, 2)).shape == (1, 3)


def test_mask_scoring_rescales_and_resorts_the_same_detections():
    """MODEL.QUERYINST.TEST_MASK_SCORING: the same k (box, class, mask) triples as without
    it; each score times its own mask's maskness, computed here from the plain run's
    masks by hand; sorted by the new score."""
    cfg = small_cfg(num_classes=4, num_proposals=6, test_topk=10)
    torch.manual_seed(11)
    weights = build_model(cfg).state_dict()
    inputs = [{"image": random_image(96, 128, seed=12)}, {"image": random_image(80, 120, seed=13)}]
    cfg_m = cfg.clone()
    cfg_m.MODEL.QUERYINST.TEST_MASK_SCORING = True

    def raw(c):
        model = build_model(c).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            return model.inference(inputs, do_postprocess=False)

    moved = 0
    for plain, scored in zip(raw(cfg), raw(cfg_m)):
        assert len(plain) == len(scored) == 10
        expected = []
        for j in range(10):
            p = plain.pred_masks[j, 0]
            fg = p[p > 0.5]
            m = fg.mean().item() if fg.numel() else 0.0
            expected.append((plain.scores[j].item() * m, j))
        expected.sort(key=lambda t: -t[0])
        order = [j for _, j in expected]
        moved += order != list(range(10))
        assert scored.scores.tolist() == pytest.approx([v for v, _ in expected], rel=1e-5)
        assert scored.scores.tolist() == sorted(scored.scores.tolist(), reverse=True)
        assert scored.query_indices.tolist() == plain.query_indices[order].tolist()
        assert scored.pred_classes.tolist() == plain.pred_classes[order].tolist()
        assert torch.equal(scored.pred_boxes.tensor, plain.pred_boxes.tensor[order])
        assert torch.equal(scored.pred_masks, plain.pred_masks[order])
    assert moved > 0  # the rescoring changed some ranking: the test can see a wrong sort


def test_mask_scoring_without_masks_is_refused():
    cfg = small_cfg(mask_on=False)
    cfg.MODEL.QUERYINST.TEST_MASK_SCORING = True
    with pytest.raises(ValueError, match="TEST_MASK_SCORING needs the mask heads"):
        build_model(cfg)


def test_inference_runs_mask_head_once_per_distinct_query():
    """Speed rule of the inference: the last mask head sees each selected query once."""
    model = build_small(seed=2, num_classes=4, num_proposals=6, test_topk=10).eval()
    inputs = [{"image": random_image(96, 128, seed=7)}, {"image": random_image(80, 120, seed=8)}]
    rows_seen = []
    hook = model.roi_heads.mask_heads[-1].register_forward_hook(
        lambda mod, args, out: rows_seen.append(out.shape[0])
    )
    with torch.no_grad():
        results = model.inference(inputs, do_postprocess=False)
    hook.remove()
    distinct = [len(set(r.query_indices.tolist())) for r in results]
    # k = 10 detections from 6 queries: some query holds two classes, so fewer rows than k.
    assert all(d < 10 for d in distinct)
    assert rows_seen == [sum(distinct)]


def test_channels_last_option_gives_the_same_detections():
    """MODEL.QUERYINST.CHANNELS_LAST changes the backbone's memory layout only, not the results."""
    reference = build_small(seed=3, num_proposals=6, test_topk=10).eval()
    reference.inference_memory_format = "contiguous"  # NCHW throughout, also at inference
    cfg = small_cfg(num_proposals=6, test_topk=10)
    cfg.defrost()
    cfg.MODEL.QUERYINST.CHANNELS_LAST = True
    cfg.MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT = "channels_last"  # not "auto": all of it
    model = build_model(cfg).eval()
    model.load_state_dict(reference.state_dict())
    def convs(module):
        return [m for m in module.modules() if isinstance(m, nn.Conv2d)]

    channels_last = torch.channels_last
    assert all(c.weight.is_contiguous(memory_format=channels_last) for c in convs(model.backbone))
    # 1x1 kernels have the same strides in both layouts; 3x3 ones show the change, which
    # only the backbone gets.
    assert all(not c.weight.is_contiguous() for c in convs(model.backbone) if c.kernel_size[0] == 3)
    assert all(c.weight.is_contiguous() for c in convs(model.roi_heads))
    inputs = [{"image": random_image(96, 128, seed=9)}]
    with torch.no_grad():
        (want,), (got,) = reference(inputs), model(inputs)
    want, got = want["instances"], got["instances"]
    assert torch.equal(want.query_indices, got.query_indices)
    assert torch.equal(want.pred_classes, got.pred_classes)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    # Binarised masks may flip only at pixels whose probability sits at the threshold.
    assert (got.pred_masks != want.pred_masks).float().mean() < 1e-3


# ---------------------------------------------------------------- parameter count


def test_r50_parameter_count_from_spec_shapes():
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)

    # ResNet-50: Detectron2 convs followed by a norm have no bias, and FrozenBN keeps its
    # weight/bias (and statistics) as buffers, so only conv weights are parameters.
    def bottleneck(c_in, c_mid, c_out, projection):
        # conv1 1x1, conv2 3x3 (stride here: STRIDE_IN_1X1 False), conv3 1x1, shortcut 1x1
        return c_in * c_mid + c_mid * c_mid * 3 * 3 + c_mid * c_out + projection * c_in * c_out

    stem = 3 * 64 * 7 * 7  # 9,408
    res2 = bottleneck(64, 64, 256, 1) + 2 * bottleneck(256, 64, 256, 0)  # 73,728 + 2 * 69,632
    res3 = bottleneck(256, 128, 512, 1) + 3 * bottleneck(512, 128, 512, 0)
    res4 = bottleneck(512, 256, 1024, 1) + 5 * bottleneck(1024, 256, 1024, 0)
    res5 = bottleneck(1024, 512, 2048, 1) + 2 * bottleneck(2048, 512, 2048, 0)
    assert (stem, res2, res3, res4, res5) == (9_408, 212_992, 1_212_416, 7_077_888, 14_942_208)
    resnet = stem + res2 + res3 + res4 + res5
    assert resnet == 23_454_912
    # Cross-check: torchvision's ResNet-50 (25,557,032) = these convs + BN affine
    # (2 x 26,560 channels) + fc (2048 x 1000 + 1000).
    tv_resnet50 = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert tv_resnet50 == resnet + 2 * 26_560 + (2048 * 1000 + 1000)

    # FPN: 1x1 lateral and 3x3 output convs with bias (MODEL.FPN.NORM is ""), P2-P5, no P6.
    lateral = sum(c * 256 + 256 for c in (256, 512, 1024, 2048))  # 984,064
    output = 4 * (256 * 256 * 3 * 3 + 256)  # 2,360,320
    backbone = resnet + lateral + output
    assert backbone == 26_799_296

    proposals = 100 * 4 + 100 * 256  # boxes (N, 4) and features (N, D)
    heads = 6 * BOX_STAGE_PARAMS + 6 * MASK_STAGE_PARAMS  # 79,412,472 + 66,397,920
    total = backbone + proposals + heads
    assert total == 172_635_688

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.backbone) == backbone
    assert count(model.backbone.bottom_up) == resnet
    assert count(model.proposal_generator) == proposals
    assert [count(h) for h in model.roi_heads.box_heads] == [BOX_STAGE_PARAMS] * 6
    assert [count(h) for h in model.roi_heads.mask_heads] == [MASK_STAGE_PARAMS] * 6
    assert count(model) == total
    # FREEZE_AT = 2: stem and res2 are parameters but not trained.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == total - stem - res2

    frozen_bns = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen_bns) == 53  # one per conv: 1 + 4 shortcuts + 3 x 16 blocks
    for m in frozen_bns:
        assert not list(m.parameters(recurse=False))
        assert {"weight", "bias", "running_mean", "running_var"} <= dict(m.named_buffers()).keys()


# ---------------------------------------------------------------- gradient flow

_ATTN = ("self_attn.", "self_attn_norm.")
_TRUNK = _ATTN + ("instance_interaction.", "instance_interaction_norm.", "ffn.", "ffn_norm.")
_CLS = ("cls_fcs.", "cls_score.")
_REG = ("reg_fcs.", "bbox_pred.")


def _expected_grads(model, stage_parts: dict[int, tuple[str, ...]], mask_stage=None):
    """Trainable parameter names of the ROI heads that should get a gradient.

    stage_parts[t] lists the name prefixes (within box_heads[t]) on the loss's path.
    """
    names = set()
    for n, _ in model.roi_heads.named_parameters():
        if n.startswith("box_heads."):
            t, rest = n.split(".", 2)[1:]
            if rest.startswith(stage_parts.get(int(t), ())):
                names.add("roi_heads." + n)
        elif n.startswith(f"mask_heads.{mask_stage}."):
            names.add("roi_heads." + n)
    return names


@pytest.fixture(scope="module")
def training_losses():
    """Losses of one training forward of a 3-stage model on 2 images with 3 GT each."""
    model = build_small(seed=2, num_stages=3).train()
    # Small deltas keep every stage's boxes near the whole image, where they overlap the GT.
    # (Random-init deltas can move boxes off the image within a few stages; the mask targets
    # are then empty and the Dice loss is the constant 1, with zero gradient everywhere.)
    with torch.no_grad():
        for head in model.roi_heads.box_heads:
            head.bbox_pred.weight.mul_(0.05)
            head.bbox_pred.bias.mul_(0.05)
    inputs = [
        train_input(128, 160, 10, random_gt(128, 160, 3, 3, seed=11)),
        train_input(112, 150, 12, random_gt(112, 150, 3, 3, seed=13)),
    ]
    return model, model(inputs)


def _split(names):
    """(ROI-head names, other names) of a set of parameter names."""
    heads = {n for n in names if n.startswith("roi_heads.")}
    return heads, names - heads


@pytest.mark.parametrize("t", [0, 1, 2])
def test_mask_loss_gradient_flow(training_losses, t):
    model, losses = training_losses
    got = nonzero_grads(losses[f"s{t}_loss_mask"], model)
    heads, others = _split(got)

    # Mask head t is parametrised by stage t's post-attention query (not detached): the loss
    # reaches stage t's self-attention and, through the queries, the trunk of every earlier
    # stage and the proposal features; nothing of later stages, nor any box prediction.
    parts = {s: _TRUNK for s in range(t)}
    parts[t] = _ATTN
    assert heads == _expected_grads(model, parts, mask_stage=t)
    assert "proposal_generator.init_proposal_features.weight" in others
    assert "proposal_generator.init_proposal_boxes.weight" not in others  # RoIs detached
    # The backbone through the RoI features (res5 feeds every FPN level).
    assert any(n.startswith("backbone.bottom_up.res5.") for n in others)
    assert any(n.startswith("backbone.fpn_output") for n in others)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_box_loss_gradient_flow(training_losses, t):
    model, losses = training_losses
    got = nonzero_grads(losses[f"s{t}_loss_bbox"] + losses[f"s{t}_loss_giou"], model)
    heads, others = _split(got)

    # The boxes of stage t are deltas applied to stage t-1's boxes, which are detached: no
    # gradient to any earlier regression branch; the query path reaches earlier trunks.
    parts = {s: _TRUNK for s in range(t)}
    parts[t] = _TRUNK + _REG
    assert heads == _expected_grads(model, parts)
    assert "proposal_generator.init_proposal_features.weight" in others
    # The learnable proposal boxes are stage 0's input boxes: only stage 0's box losses
    # reach them (RoIAlign itself passes no gradient to the boxes).
    assert ("proposal_generator.init_proposal_boxes.weight" in others) == (t == 0)
    assert any(n.startswith("backbone.bottom_up.res5.") for n in others)


@pytest.mark.parametrize("t", [0, 1, 2])
def test_class_loss_gradient_flow(training_losses, t):
    model, losses = training_losses
    got = nonzero_grads(losses[f"s{t}_loss_cls"], model)
    heads, others = _split(got)

    parts = {s: _TRUNK for s in range(t)}
    parts[t] = _TRUNK + _CLS
    assert heads == _expected_grads(model, parts)
    assert "proposal_generator.init_proposal_features.weight" in others
    assert "proposal_generator.init_proposal_boxes.weight" not in others


def test_stage_rois_are_detached(training_losses):
    """Directly on the graph: stage t+1's decoded boxes do not depend on stage t's deltas."""
    model, _ = training_losses
    inputs = [train_input(128, 160, 10, random_gt(128, 160, 3, 3, seed=11))]
    _, _, _, stages = run_stages(model, inputs)
    for t in range(len(stages) - 1):
        bbox_pred = model.roi_heads.box_heads[t].bbox_pred.weight
        (grad,) = torch.autograd.grad(
            stages[t + 1].pred_boxes.sum(), [bbox_pred], retain_graph=True, allow_unused=True
        )
        assert grad is None
        (grad,) = torch.autograd.grad(stages[t].pred_boxes.sum(), [bbox_pred], retain_graph=True)
        assert grad.abs().sum() > 0


# ---------------------------------------------------------------- batch invariance


def _assert_same_instances(a: Instances, b: Instances, tol: float):
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.query_indices, b.query_indices)
    torch.testing.assert_close(a.scores, b.scores, rtol=tol, atol=tol)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=tol, atol=tol)
    if a.pred_masks.dtype == torch.bool:
        assert torch.equal(a.pred_masks, b.pred_masks)
    else:
        torch.testing.assert_close(a.pred_masks, b.pred_masks, rtol=tol, atol=tol)


def test_batched_inference_equals_single_images():
    """200x300 and 210x310 both pad to 224x320, so the backbone sees the same canvas.

    (Images that pad to different canvases get different conv features near the border,
    because the zero padding is farther away; the ROI-head test below covers sizes that
    differ more.) float64 keeps near-ties in the top-k from flipping.
    """
    model = build_small(seed=4).double().eval()
    inputs = [
        {"image": random_image(200, 300, seed=20), "height": 400, "width": 450},
        {"image": random_image(210, 310, seed=21), "height": 105, "width": 155},
    ]
    with torch.no_grad():
        canvases = [model.preprocess_image([x]).tensor.shape[-2:] for x in inputs]
        assert canvases == [torch.Size([224, 320])] * 2
        assert model.preprocess_image(inputs).tensor.shape[-2:] == (224, 320)
        batched = model(inputs)
        singles = [model([x])[0] for x in inputs]

    assert [r["instances"].image_size for r in batched] == [(400, 450), (105, 155)]
    for b, s in zip(batched, singles):
        _assert_same_instances(b["instances"], s["instances"], tol=1e-5)
    # The two images give different detections (a mix-up between them would show).
    assert not torch.equal(batched[0]["instances"].scores, batched[1]["instances"].scores)


def test_roi_heads_batch_invariance_with_different_image_sizes():
    """ROI heads alone, per-image features identical in both runs, very different sizes.

    The image sizes scale the proposals differently and each image has its own top-k; the
    second image's features are zero outside its 64x100 area, as padding would leave them.
    """
    model = build_small(seed=5, num_classes=4, num_proposals=6, test_topk=10).double().eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # Proposals that are not the whole image, so scaling by the image size matters.
        cxcy = 0.2 + 0.6 * torch.rand(6, 2, generator=gen)
        wh = 0.1 + 0.5 * torch.rand(6, 2, generator=gen)
        model.proposal_generator.init_proposal_boxes.weight.copy_(torch.cat([cxcy, wh], 1))
    sizes = [(96, 128), (64, 100)]
    canvas = (96, 128)
    features = {}
    for name, stride in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32)):
        f = torch.randn(2, 32, canvas[0] // stride, canvas[1] // stride, generator=gen).double()
        h1, w1 = math.ceil(sizes[1][0] / stride), math.ceil(sizes[1][1] / stride)
        f[1, :, h1:] = 0
        f[1, :, :, w1:] = 0
        features[name] = f
    tensor = torch.zeros(2, 3, *canvas, dtype=torch.float64)

    def run(idx):
        images = ImageList(tensor[idx], [sizes[i] for i in idx])
        feats = {k: v[idx] for k, v in features.items()}
        with torch.no_grad():
            proposals, _ = model.proposal_generator(images, feats, None)
            stages = model.roi_heads.forward_stages(feats, proposals)
            results, _ = model.roi_heads(images, feats, proposals)
        return proposals, stages, results

    batched = run([0, 1])
    for i in (0, 1):
        single = run([i])
        (h, w) = sizes[i]
        box = model.proposal_generator.init_proposal_boxes.weight
        expected = torch.cat([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], 1)
        # Detectron2's Boxes are always float32.
        torch.testing.assert_close(
            single[0][0].proposal_boxes.tensor, (expected * torch.tensor([w, h, w, h])).float()
        )
        torch.testing.assert_close(
            batched[0][i].proposal_boxes.tensor, single[0][0].proposal_boxes.tensor
        )
        for sb, ss in zip(batched[1], single[1]):
            for field in ("cls_logits", "pred_boxes", "object_feats", "attn_feats"):
                torch.testing.assert_close(
                    getattr(sb, field)[i], getattr(ss, field)[0], rtol=1e-5, atol=1e-5
                )
        assert batched[2][i].image_size == (h, w)
        _assert_same_instances(batched[2][i], single[2][0], tol=1e-5)
    assert not torch.equal(batched[2][0].query_indices, batched[2][1].query_indices)


# ---------------------------------------------------------------- losses and edge cases


@pytest.mark.parametrize("num_stages", [1, 6])
def test_loss_keys(num_stages):
    model = build_small(seed=6, num_stages=num_stages).train()
    inputs = [train_input(96, 128, 30, random_gt(96, 128, 2, 3, seed=31))]
    losses = model(inputs)
    expected = {f"s{t}_{name}" for t in range(num_stages) for name in LOSS_NAMES}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value > 0, name  # 2 GT, all matched: every loss is positive at init


def test_image_without_instances():
    model = build_small(seed=7).train()
    empty = gt_instances(96, 128, torch.zeros(0, 4), torch.zeros(0))
    losses = model([train_input(96, 128, 40, empty)])

    assert len(losses) == 3 * 4
    for name, value in losses.items():
        assert torch.isfinite(value), name
        if name.endswith("loss_cls"):
            assert value > 0, name  # every query is background
        else:
            assert value == 0, name
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    # Mixed batch: one empty image, one with instances.
    model.zero_grad()
    full = random_gt(96, 128, 2, 3, seed=41)
    losses = model([train_input(96, 128, 40, empty), train_input(96, 128, 42, full)])
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_more_gt_than_queries():
    model = build_small(seed=8, num_proposals=8).train()
    matched = []
    hook = model.roi_heads.criterion.matcher.register_forward_hook(
        lambda mod, args, out: matched.append(out)
    )
    inputs = [train_input(128, 160, 50, random_gt(128, 160, 12, 3, seed=51))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.roi_heads.box_heads[0].bbox_pred.weight.detach().clone()

    losses = model(inputs)
    sum(losses.values()).backward()
    optimizer.step()
    hook.remove()

    assert len(matched) == 3  # one matching per stage
    for indices in matched:
        ((query_idx, gt_idx),) = indices
        assert len(query_idx) == len(gt_idx) == 8
        assert len(set(query_idx.tolist())) == 8 and len(set(gt_idx.tolist())) == 8
        assert all(0 <= g < 12 for g in gt_idx.tolist())
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(model.roi_heads.box_heads[0].bbox_pred.weight, before)


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_degenerate_gt_boxes(mask_format):
    model = build_small(seed=9).train()
    h, w = 96, 128
    boxes = [
        [10.0, 10.0, 10.0, 40.0],  # zero width
        [50.0, 60.0, 90.0, 60.0],  # zero height
        [0.0, 0.0, 0.0, 0.0],  # a point at the corner
        [30.0, 20.0, 70.0, 50.0],  # a normal box
    ]
    inst = gt_instances(h, w, boxes, [0, 1, 2, 0], mask_format)
    if mask_format == "bitmask":
        assert inst.gt_masks.tensor[:3].sum() == 0  # zero-area boxes fill no pixel
    else:
        # Collinear (zero-area) polygons on the degenerate boxes.
        inst.gt_masks = PolygonMasks(
            [[[10, 10, 10, 25, 10, 40]], [[50, 60, 70, 60, 90, 60]], [[0, 0, 0, 0, 0, 0]]]
            + [inst.gt_masks.polygons[3]]
        )
    losses = model([train_input(h, w, 60, inst)])
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("num_classes", [1, 3, 80])
def test_any_number_of_classes(num_classes):
    model = build_small(seed=10, num_classes=num_classes, num_proposals=8, num_stages=2)
    assert model.roi_heads.box_heads[0].cls_score.out_features == num_classes
    assert model.roi_heads.mask_heads[0].predictor.out_channels == num_classes
    classes = [num_classes - 1, 0]  # the last class index is valid
    inst = gt_instances(96, 128, [[10, 10, 60, 50], [40, 30, 120, 90]], classes)

    losses = model.train()([train_input(96, 128, 70, inst)])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        _, _, _, stages = run_stages(model, [{"image": random_image(96, 128, 71)}])
        (result,) = model([{"image": random_image(96, 128, 71)}])
    assert stages[-1].cls_logits.shape == (1, 8, num_classes)
    inst = result["instances"]
    R = min(100, 8 * num_classes)
    assert len(inst) == R and inst.pred_masks.shape == (R, 96, 128)
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()


def test_detection_only_when_mask_off():
    model = build_small(seed=11, mask_on=False)
    assert model.roi_heads.mask_heads is None and model.roi_heads.mask_pooler is None
    assert not any("mask" in n for n, _ in model.named_parameters())
    with_masks = build_small(seed=11, mask_on=True)
    masked_params = sum(p.numel() for p in with_masks.roi_heads.mask_heads.parameters())
    assert sum(p.numel() for p in with_masks.parameters()) == masked_params + sum(
        p.numel() for p in model.parameters()
    )

    inst = gt_instances(96, 128, [[10, 10, 60, 50]], [1])
    losses = model.train()([train_input(96, 128, 80, inst)])
    expected = {f"s{t}_{n}" for t in range(3) for n in ("loss_cls", "loss_bbox", "loss_giou")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())

    image = random_image(96, 128, 81)
    with torch.no_grad():
        (result,) = model.eval()([{"image": image, "height": 192, "width": 256}])
    inst = result["instances"]
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "query_indices"}
    assert len(inst) == 24 and inst.image_size == (192, 256)


# ---------------------------------------------------------------- mask targets


def _rect_mask(fmt: str, image_size, x0: int, y0: int, x1: int, y1: int):
    """One mask, the rectangle [x0, x1) x [y0, y1), as BitMasks or PolygonMasks."""
    if fmt == "polygon":
        return PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]]])
    m = torch.zeros(1, *image_size, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return BitMasks(m)


@pytest.mark.parametrize("fmt", ["bitmask", "polygon"])
def test_mask_target_box_equal_to_mask(fmt):
    masks = _rect_mask(fmt, (40, 60), 20, 10, 50, 30)
    target = mask_targets_in_boxes(masks, torch.tensor([[20.0, 10.0, 50.0, 30.0]]), (40, 60), 28)
    assert target.shape == (1, 28, 28) and target.dtype == torch.float32
    assert torch.equal(target, torch.ones(1, 28, 28))


@pytest.mark.parametrize("fmt", ["bitmask", "polygon"])
def test_mask_target_box_twice_as_wide(fmt):
    """The box [20, 80] x [10, 30] holds the mask [20, 50] x [10, 30] in its left half."""
    masks = _rect_mask(fmt, (40, 100), 20, 10, 50, 30)
    target = mask_targets_in_boxes(masks, torch.tensor([[20.0, 10.0, 80.0, 30.0]]), (40, 100), 28)
    expected = torch.zeros(1, 28, 28)
    expected[:, :, :14] = 1
    assert torch.equal(target, expected)
    # A box inside the mask (its left half) sees only mask: all ones.
    inner = mask_targets_in_boxes(masks, torch.tensor([[20.0, 10.0, 35.0, 30.0]]), (40, 100), 28)
    assert torch.equal(inner, torch.ones(1, 28, 28))


@pytest.mark.parametrize("fmt", ["bitmask", "polygon"])
def test_mask_target_box_clipped_to_image_first(fmt):
    """Image 40x60, mask = its right third; the box sticks out of the image on the right.

    Clipped, the box is the mask (all ones); unclipped, the mask would fill only its left
    half (the pixels beyond the image are not mask).
    """
    masks = _rect_mask(fmt, (40, 60), 40, 0, 60, 40)
    box = torch.tensor([[40.0, 0.0, 80.0, 40.0]], requires_grad=True)
    target = mask_targets_in_boxes(masks, box, (40, 60), 28)
    assert torch.equal(target, torch.ones(1, 28, 28))
    # The caller's boxes are neither clipped in place nor part of the graph.
    assert torch.equal(box.detach(), torch.tensor([[40.0, 0.0, 80.0, 40.0]]))
    assert not target.requires_grad

    # Out on the top-left as well.
    masks = _rect_mask(fmt, (40, 60), 0, 0, 30, 20)
    target = mask_targets_in_boxes(masks, torch.tensor([[-20.0, -10.0, 30.0, 20.0]]), (40, 60), 28)
    assert torch.equal(target, torch.ones(1, 28, 28))


def test_mask_targets_pair_masks_with_boxes():
    masks = torch.zeros(2, 40, 60, dtype=torch.bool)
    masks[0, 10:30, 20:50] = True
    masks[1, 0:20, 0:10] = True
    boxes = torch.tensor([[20.0, 10.0, 80.0, 30.0], [0.0, 0.0, 10.0, 20.0]])
    target = mask_targets_in_boxes(BitMasks(masks), boxes, (40, 60), 28)
    # Row 0: box clipped to [20, 60] x [10, 30]: mask in the first 30 of 40 columns (21 of 28).
    expected0 = torch.zeros(28, 28)
    expected0[:, :21] = 1
    assert torch.equal(target[0], expected0)
    assert torch.equal(target[1], torch.ones(28, 28))


def _random_gt_masks(fmt: str, image_size, num: int, gen: torch.Generator):
    """``num`` random rectangles as BitMasks or PolygonMasks."""
    h, w = image_size
    rects = []
    for _ in range(num):
        x0 = torch.randint(0, w - 8, (1,), generator=gen).item()
        y0 = torch.randint(0, h - 8, (1,), generator=gen).item()
        x1 = x0 + torch.randint(4, w - x0, (1,), generator=gen).item()
        y1 = y0 + torch.randint(4, h - y0, (1,), generator=gen).item()
        rects.append((x0, y0, x1, y1))
    if fmt == "polygon":
        return PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in rects])
    m = torch.zeros(num, h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        m[i, y0:y1, x0:x1] = True
    return BitMasks(m)


@pytest.mark.parametrize("fmt", ["bitmask", "polygon"])
def test_mask_targets_by_gt_index_equal_detectron2_crop_and_resize(fmt):
    """With ``gt_indices`` (repeated, out of order, boxes partly outside the image) the targets
    are Detectron2's own ``crop_and_resize`` of the indexed masks, value for value."""
    gen = torch.Generator().manual_seed(0)
    size = (50, 70)
    masks = _random_gt_masks(fmt, size, 5, gen)
    gt_idx = torch.tensor([3, 0, 3, 4, 1, 1, 2])
    boxes = torch.rand(7, 2, generator=gen) * torch.tensor([70.0, 50.0]) - 5
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(7, 2, generator=gen) * 30], dim=1)
    got = mask_targets_in_boxes(masks, boxes, size, 28, gt_indices=gt_idx)
    clipped = Boxes(boxes.clone())
    clipped.clip(size)
    want = masks[gt_idx].crop_and_resize(clipped.tensor, 28).float()
    assert got.shape == (7, 28, 28) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert 0 < got.mean() < 1  # the boxes see mask and background


def _edge_case_rois(num_masks: int, size, gen: torch.Generator) -> torch.Tensor:
    """RoIs (gt index, x0, y0, x1, y1) clipped to ``size``: random fractional boxes from under a
    pixel to most of the image, boxes on every border, a zero-width and a zero-area one."""
    h, w = size
    xy = torch.rand(60, 2, generator=gen) * torch.tensor([w + 10.0, h + 10.0]) - 5
    wh = torch.rand(60, 2, generator=gen) ** 3 * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes = torch.cat([boxes, torch.tensor([
        [0.0, 0.0, 3.5, 2.25], [w - 2.75, h - 1.5, w, h], [0.0, h - 4.0, w, h],
        [7.0, 3.0, 7.0, 9.0], [5.5, 5.5, 5.5, 5.5], [w - 0.25, 0.0, w, h],
    ])])
    clipped = Boxes(boxes)
    clipped.clip(size)
    index = torch.randint(0, num_masks - 1, (len(boxes), 1), generator=gen).float()
    return torch.cat([index, clipped.tensor], dim=1)  # the last mask gets no RoI


def test_float_masks_where_read_give_the_whole_copys_roi_align_bit_for_bit():
    """Random-noise masks (any pixel read outside a mask's window would change a value): the
    windowed copy gives aligned RoIAlign the values of the whole float copy, sample for
    sample, and a mask without RoIs is not copied at all."""
    from detectron2.layers import ROIAlign
    gen = torch.Generator().manual_seed(3)
    size = (47, 66)
    masks = torch.rand(5, *size, generator=gen) < 0.5
    rois = _edge_case_rois(len(masks), size, gen)
    windowed = float_masks_where_read(masks, rois)
    whole = masks[:, None].float()
    assert windowed.shape == whole.shape and windowed.dtype == torch.float32
    for sampling_ratio in (0, 2):
        align = ROIAlign((28, 28), 1.0, sampling_ratio, aligned=True)
        assert torch.equal(align(windowed, rois), align(whole, rois))
    assert not windowed[-1].any() and whole[-1].any()
    assert 0 < windowed.sum() < whole[:-1].sum()  # windows, not the whole frames


def test_float_masks_where_read_copy_everything_for_a_non_finite_roi():
    masks = torch.rand(2, 10, 12) < 0.5
    rois = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0], [1.0, float("nan"), 0.0, 5.0, 5.0]])
    assert torch.equal(float_masks_where_read(masks, rois), masks[:, None].float())


def test_mask_targets_of_noise_masks_equal_detectron2_crop_and_resize():
    """The targets of the training loss, by gt index, against Detectron2's own
    ``BitMasks.crop_and_resize`` of each box's mask, on noise masks and the edge-case boxes."""
    gen = torch.Generator().manual_seed(4)
    size = (47, 66)
    masks = BitMasks(torch.rand(5, *size, generator=gen) < 0.5)
    rois = _edge_case_rois(len(masks), size, gen)
    gt_idx = rois[:, 0].long()
    got = mask_targets_in_boxes(masks, rois[:, 1:], size, 28, gt_indices=gt_idx)
    want = masks[gt_idx].crop_and_resize(rois[:, 1:], 28).float()
    assert torch.equal(got, want)
    assert 0.2 < got.mean() < 0.8


@pytest.mark.parametrize("fmt", ["bitmask", "polygon"])
def test_stage_mask_targets_equal_one_call_per_stage(fmt):
    """All stages at once (one call per image) give the rows of one call per stage and image,
    in the same order; an image without matches gives no rows."""
    gen = torch.Generator().manual_seed(1)
    size = (40, 60)
    targets = []
    for num in (4, 0, 3):
        inst = Instances(size)
        if num:
            inst.gt_masks = _random_gt_masks(fmt, size, num, gen)
        elif fmt == "polygon":
            inst.gt_masks = PolygonMasks([])
        else:
            inst.gt_masks = BitMasks(torch.zeros(0, *size, dtype=torch.bool))
        inst.gt_classes = torch.zeros(num, dtype=torch.int64)
        targets.append(inst)
    matches, boxes = [], []
    for _ in range(3):  # stages
        stage_matches, stage_boxes = [], []
        for tg in targets:
            g = torch.randperm(len(tg), generator=gen)
            q = torch.randperm(10, generator=gen)[: len(g)]
            xy = torch.rand(len(g), 2, generator=gen) * 40
            stage_matches.append((q, g))
            wh = 5 + torch.rand(len(g), 2, generator=gen) * 20
            stage_boxes.append(torch.cat([xy, xy + wh], 1))
        matches.append(stage_matches)
        boxes.append(stage_boxes)
    got = stage_mask_targets(targets, boxes, matches, 28)
    assert len(got) == 3
    for t in range(3):
        want = torch.cat([
            mask_targets_in_boxes(tg.gt_masks[g], b, size, 28)
            for tg, b, (_, g) in zip(targets, boxes[t], matches[t]) if len(g)
        ])
        assert torch.equal(got[t], want)
    assert got[0].shape == (7, 28, 28)


# ---------------------------------------------------------------- postprocess


def test_postprocess_scales_boxes_exactly_without_clipping():
    r = Instances((100, 200))  # (h, w) of the resized input
    r.pred_boxes = Boxes(torch.tensor([[-10.0, -5.0, 250.0, 120.0], [20.0, 10.0, 60.0, 50.0]]))
    r.scores = torch.tensor([0.9, 0.8])
    r.pred_classes = torch.tensor([2, 0])

    out = queryinst_postprocess(r, 300, 500)  # scale_y = 3, scale_x = 2.5

    assert out.image_size == (300, 500)
    expected = torch.tensor([[-25.0, -15.0, 625.0, 360.0], [50.0, 30.0, 150.0, 150.0]])
    assert torch.equal(out.pred_boxes.tensor, expected)
    assert torch.equal(out.scores, r.scores) and torch.equal(out.pred_classes, r.pred_classes)
    assert not out.has("pred_masks")
    assert torch.equal(r.pred_boxes.tensor[0], torch.tensor([-10.0, -5.0, 250.0, 120.0]))


def test_postprocess_masks_including_boxes_outside_image():
    r = Instances((100, 200))
    r.pred_boxes = Boxes(
        torch.tensor(
            [
                [-10.0, -5.0, 250.0, 120.0],  # covers the whole image and more
                [20.0, 10.0, 60.0, 50.0],  # inside
                [300.0, 150.0, 350.0, 180.0],  # wholly outside (right, below)
                [-50.0, 20.0, -10.0, 60.0],  # wholly outside (left)
            ]
        )
    )
    r.scores = torch.rand(4)
    r.pred_masks = torch.ones(4, 1, 28, 28)  # probability 1 everywhere in the box

    out = queryinst_postprocess(r, 300, 500)

    assert out.pred_masks.shape == (4, 300, 500) and out.pred_masks.dtype == torch.bool
    assert out.pred_masks[0].all()
    # Box [50, 150) x [30, 150) after scaling: the pixels whose centre is inside the box,
    # but for the four corners. The paste samples the 28x28 mask bilinearly with zeros
    # outside it: a pixel on an edge of the box gets weight 0.64 (columns) or 0.62 (rows) of
    # the mask and stays >= 0.5, a corner pixel gets 0.64 * 0.62 < 0.5.
    expected = torch.zeros(300, 500, dtype=torch.bool)
    expected[30:150, 50:150] = True
    expected[[30, 30, 149, 149], [50, 149, 50, 149]] = False
    assert torch.equal(out.pred_masks[1], expected)
    assert not out.pred_masks[2].any() and not out.pred_masks[3].any()

    # Only boxes outside the image, and no detections at all.
    outside = r[[2, 3]]
    assert not queryinst_postprocess(outside, 300, 500).pred_masks.any()
    none = queryinst_postprocess(r[[]], 300, 500)
    assert none.pred_masks.shape == (0, 300, 500) and len(none.pred_boxes) == 0
