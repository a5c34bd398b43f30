"""Inference speed-ups (queryinst/modeling/fast_inference.py): folded BatchNorm, channels-last
convolution weights (INFERENCE_MEMORY_FORMAT) and INFERENCE_DTYPE.

Truth comes from outside the code under test:

- folding and channels-last: the same weights run by the plain model
  (``MODEL.QUERYINST.FUSE_BN_INFERENCE False`` and ``INFERENCE_MEMORY_FORMAT contiguous``:
  the plain Detectron2 / torchvision modules), and one folded layer recomputed by hand in
  float64 from the definition of BatchNorm (y = (x - mean) / sqrt(var + eps) * g + b);
- state: ``state_dict()`` and losses of a model that never ran the folded inference;
- bf16: the fp32 model (``INFERENCE_DTYPE float32``) with the same weights.

Models: the MobileNetV2 nuclei config (torchvision blocks: conv + BN in Sequentials) and a
narrow R50 (Detectron2's Conv2d with a FrozenBN ``.norm``), random weights with random
norm statistics and affine parameters (identity norms would make folding trivial), box
regressions scaled by 0.1 as in tests/test_export.py (keeps random boxes at the image's
scale). Parity tolerances (issue 13): scores 1e-4 relative, boxes 1e-4 of the image's longer
side, labels equal, mask IoU >= 0.999.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from queryinst import add_queryinst_config
from queryinst.modeling import fast_inference
from queryinst.export import ExportError, check_exportable
from queryinst.modeling.fast_inference import (
    InferenceWeights,
    bf16_supported,
    conv_bn_pairs,
    resolve_memory_format,
)
from queryinst.modeling.roi_heads.pooling import FlatMaps

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MNV2 = os.path.join(ROOT, "configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
BASE = os.path.join(ROOT, "configs", "Base-QueryInst.yaml")
SCORE_RTOL, BOX_TOL, MASK_IOU = 1e-4, 1e-4, 0.999
SIZE = (192, 256)  # (H, W) of the test image
# The plain model: no folding, each conv weight in its own (NCHW) layout.
PLAIN = ("MODEL.QUERYINST.FUSE_BN_INFERENCE", "False",
         "MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT", "contiguous")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

needs_bf16 = pytest.mark.skipif(
    not bf16_supported("cpu"),
    reason="this CPU has no native bf16 (AVX512-BF16 / AMX): INFERENCE_DTYPE bfloat16 falls "
    "back to float32 here",
)


def make_cfg(kind: str, *opts):
    """The MobileNetV2 nuclei config ("mnv2") or a narrow R50 ("r50"), 20 queries, 10
    classes, CPU, random weights, with ``opts`` merged last."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(MNV2 if kind == "mnv2" else BASE)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
                         "MODEL.QUERYINST.NUM_PROPOSALS", "20", "MODEL.QUERYINST.TEST_TOPK",
                         "20", "MODEL.QUERYINST.NUM_CLASSES", "10"])
    if kind == "r50":
        cfg.merge_from_list([
            "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
            "MODEL.RESNETS.WIDTH_PER_GROUP", "8", "MODEL.FPN.OUT_CHANNELS", "32",
            "MODEL.QUERYINST.HIDDEN_DIM", "32", "MODEL.QUERYINST.DIM_FEEDFORWARD", "64",
            "MODEL.QUERYINST.NUM_HEADS", "4", "MODEL.QUERYINST.DYNAMIC_DIM", "8",
            "MODEL.QUERYINST.MASK_CONV_DIM", "16", "MODEL.QUERYINST.NUM_STAGES", "3"])
    cfg.merge_from_list(list(opts))
    return cfg


def randomise_norms(model: nn.Module, seed: int) -> None:
    """Random statistics and affine parameters in every BatchNorm / FrozenBN, box
    regressions x 0.1; in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.running_var.numel()
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        for head in model.roi_heads.box_heads:
            head.bbox_pred.weight.mul_(0.1)
            head.bbox_pred.bias.mul_(0.1)


def build(kind: str, *opts, state=None, seed: int = 0) -> nn.Module:
    """A model in eval mode with ``state`` loaded, or random weights (:func:`randomise_norms`)."""
    torch.manual_seed(seed)
    model = build_model(make_cfg(kind, *opts))
    if state is None:
        randomise_norms(model, seed)
    else:
        model.load_state_dict(state)
    return model.eval()


def image(seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W): smooth blobs plus noise."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, SIZE[0] // 16, SIZE[1] // 16, generator=gen)
    smooth = nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    noise = torch.rand(1, 3, *SIZE, generator=gen)
    return ((0.8 * smooth + 0.2 * noise)[0] * 255).to(torch.uint8)


def detect(model, seed: int = 0):
    with torch.no_grad():
        return model([{"image": image(seed)}])[0]["instances"]


def mask_iou(a, b):
    a, b = a.flatten(1), b.flatten(1)
    union = (a | b).sum(1)
    return torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), 1.0)


def assert_parity(got, want):
    """The issue's parity tolerances, detection by detection (same order)."""
    assert len(got) == len(want) > 0
    torch.testing.assert_close(got.scores, want.scores, rtol=SCORE_RTOL, atol=0)
    box_err = (got.pred_boxes.tensor - want.pred_boxes.tensor).abs().max().item()
    assert box_err <= BOX_TOL * max(SIZE), box_err
    assert torch.equal(got.pred_classes, want.pred_classes)
    assert mask_iou(got.pred_masks, want.pred_masks).min().item() >= MASK_IOU


@pytest.fixture(scope="module", params=["mnv2", "r50"])
def models(request):
    """(default model: folded, channels-last on the CPU; plain model) with the same random
    weights; ``.kind`` on the default one."""
    unfolded = build(request.param, *PLAIN)
    folded = build(request.param, state=unfolded.state_dict())
    folded.kind = request.param
    return folded, unfolded


# ---------------------------------------------------------------- folding


def test_pairs_found_in_both_backbone_kinds(models):
    folded, _ = models
    pairs = conv_bn_pairs(folded)
    norms = [m for m in folded.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]
    # Every norm of these models follows a conv: all of them are folded (backbone + mask heads).
    assert len(pairs) == len(norms) > 0
    assert {id(norm) for _, norm, _, _ in pairs} == {id(m) for m in norms}


def test_folded_outputs_equal_unfolded(models):
    folded, unfolded = models
    for seed in (0, 1):
        assert_parity(detect(folded, seed), detect(unfolded, seed))


def test_folded_weights_equal_hand_computation(models):
    folded, _ = models
    conv, norm, owner, attr = conv_bn_pairs(folded)[3]
    w = conv.weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if conv.bias is None else conv.bias.double()
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    want_w = w * scale[:, None, None, None]
    want_b = (b - norm.running_mean.double()) * scale + norm.bias.double()
    original = (conv.weight, conv.bias, getattr(owner, attr))
    with folded._inference_weights.applied():
        torch.testing.assert_close(conv.weight.double(), want_w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(conv.bias.double(), want_b, rtol=1e-6, atol=1e-7)
        assert getattr(owner, attr) is None or isinstance(getattr(owner, attr), nn.Identity)
    # Put back: the very same objects.
    assert conv.weight is original[0] and conv.bias is original[1]
    assert getattr(owner, attr) is original[2]


def test_state_dict_and_parameters_unchanged_by_inference(models):
    folded, _ = models
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    params = [id(p) for p in folded.parameters()]
    detect(folded)
    after = folded.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [id(p) for p in folded.parameters()] == params


def test_weights_loaded_after_folding_are_used(models):
    """A checkpoint loaded (or a statistic changed in place) after an inference replaces the
    folded weights: the next inference equals a fresh model with those weights."""
    folded, unfolded = models
    detect(folded)  # folded weights cached
    other = build(folded.kind, *PLAIN, seed=5)
    folded.load_state_dict(other.state_dict())
    assert_parity(detect(folded), detect(other))
    with torch.no_grad():  # in place, as tools/benchmark_measure.calibrate_frozen_bn does
        for _, norm, _, _ in conv_bn_pairs(folded)[:5]:
            norm.running_var.mul_(2.0)
            other_norm = dict(other.named_modules())[_name(folded, norm)]
            other_norm.running_var.mul_(2.0)
    assert_parity(detect(folded), detect(other))
    folded.load_state_dict(unfolded.state_dict())  # back, for the other tests


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_training_after_inference_gives_the_same_losses():
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    never = build("r50", *PLAIN)
    used = build("r50", state=never.state_dict())
    detect(used)
    inst = Instances(SIZE)
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 20, 120, 150], [100, 30, 220, 90]]))
    inst.gt_classes = torch.tensor([1, 4])
    masks = torch.zeros(2, *SIZE, dtype=torch.bool)
    masks[0, 20:150, 10:120] = masks[1, 30:90, 100:220] = True
    inst.gt_masks = BitMasks(masks)
    batch = [{"image": image(3), "instances": inst}]
    losses = []
    for model in (never, used):
        model.train()
        with EventStorage():
            losses.append({k: v.item() for k, v in model(batch).items()})
    assert losses[0] == losses[1]
    assert len(losses[0]) == 3 * 4  # cls, bbox, giou, mask per stage


def test_deepcopy_of_a_model_folds_its_own_weights(models):
    folded, _ = models
    detect(folded)
    twin = copy.deepcopy(folded)
    assert twin._inference_weights._root is twin
    assert_parity(detect(twin), detect(folded))


# ---------------------------------------------------------------- INFERENCE_MEMORY_FORMAT


def _is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last strides, not merely dense ones (1x1 kernels are dense in both); with
    one channel (depthwise kernels) both layouts are the same."""
    channels_last = t.is_contiguous(memory_format=torch.channels_last)
    return t.shape[1] == 1 or (t.stride(1) == 1 and channels_last)


def test_memory_format_names_resolve_per_device():
    assert resolve_memory_format("auto", "cpu") is torch.channels_last
    assert resolve_memory_format("auto", "cuda") is None  # each weight's own layout
    assert resolve_memory_format("channels_last", "cuda") is torch.channels_last
    assert resolve_memory_format("contiguous", "cpu") is torch.contiguous_format
    with pytest.raises(ValueError, match=r"INFERENCE_MEMORY_FORMAT 'nhwc'.*auto.*contiguous"):
        build_model(make_cfg("mnv2", "MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT", "nhwc"))


@pytest.mark.parametrize("fold", [True, False])
def test_channels_last_inference_equals_the_plain_model(models, fold):
    """Every conv (backbone, FPN, mask head convs, deconv, predictor) runs with a
    channels-last weight during the call and returns channels-last maps; the detections
    equal the plain model's; afterwards the original NCHW parameters are back."""
    _, plain = models
    model = copy.deepcopy(plain)
    model.fuse_bn_inference = fold
    model.inference_memory_format = "channels_last"
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = [c.weight for c in convs]
    seen = {}  # conv index -> (weight channels-last, output channels-last)

    def keep(i):
        def hook(module, args, out):
            seen[i] = (_is_channels_last(module.weight), _is_channels_last(out))
        return hook

    hooks = [c.register_forward_hook(keep(i)) for i, c in enumerate(convs)]
    for seed in (0, 1):
        assert_parity(detect(model, seed), detect(plain, seed))
    for h in hooks:
        h.remove()
    # All convs but those of the unused mask heads (stages before the last) ran.
    ran_mask_convs = [i for i in seen if "mask_heads" in _name(model, convs[i])]
    assert ran_mask_convs and len(seen) > len(ran_mask_convs) > 0
    assert all(w and o for w, o in seen.values()), seen
    assert all(c.weight is w for c, w in zip(convs, weights))
    assert all(w.is_contiguous() for w in weights if w.shape[-1] > 1)


# ---------------------------------------------------------------- INFERENCE_DTYPE


def test_invalid_inference_dtype_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"INFERENCE_DTYPE 'half'.*float32.*bfloat16.*float16"):
        build_model(make_cfg("mnv2", "MODEL.QUERYINST.INFERENCE_DTYPE", "half"))


def test_float16_on_the_cpu_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="MODEL.QUERYINST.INFERENCE_DTYPE float16 needs CUDA"):
        build_model(make_cfg("mnv2", "MODEL.QUERYINST.INFERENCE_DTYPE", "float16"))
    model = build("mnv2")
    model.inference_dtype = "float16"  # e.g. a model moved to the CPU after building
    with pytest.raises(ValueError, match="INFERENCE_DTYPE float16 needs CUDA"):
        detect(model)


def test_bf16_without_cpu_support_falls_back_to_fp32_with_a_warning(models, monkeypatch):
    folded, _ = models
    monkeypatch.setattr(fast_inference, "bf16_supported", lambda device_type: False)
    model = copy.deepcopy(folded)
    model.inference_dtype = "bfloat16"
    with pytest.warns(RuntimeWarning, match="no native bf16 support.*float32 instead"):
        got = detect(model)
    want = detect(folded)
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)


def test_export_refuses_reduced_precision():
    cfg = make_cfg("mnv2", "MODEL.QUERYINST.INFERENCE_DTYPE", "bfloat16")
    with pytest.raises(ExportError, match="INFERENCE_DTYPE bfloat16"):
        check_exportable(cfg, "onnx")


@needs_bf16
@pytest.mark.parametrize("fold", [True, False])
def test_bf16_agrees_with_fp32_on_the_top_detections(models, fold):
    """Random weights: the 5 best fp32 detections are among bf16's, each with the same query
    and class (the issue's "same labels"), a box within 2 % of the image (issue 13) and a
    score within 10 % (relative; measured up to 5.5 %: bf16 keeps 8 bits of mantissa, and
    the random model's scores sit near the 0.01 prior, where the sigmoid is steep in
    relative terms)."""
    folded, unfolded = models
    fp32 = folded if fold else unfolded
    bf16 = copy.deepcopy(fp32)
    bf16.inference_dtype = "bfloat16"
    for seed in (0, 1):
        want, got = detect(fp32, seed), detect(bf16, seed)
        pairs = list(zip(got.query_indices.tolist(), got.pred_classes.tolist()))
        for i in range(5):
            key = (want.query_indices[i].item(), want.pred_classes[i].item())
            assert key in pairs, (i, key)
            j = pairs.index(key)
            box_err = (got.pred_boxes.tensor[j] - want.pred_boxes.tensor[i]).abs().max()
            assert box_err <= 0.02 * max(SIZE), (i, box_err)
            assert abs(got.scores[j] - want.scores[i]) <= 0.1 * want.scores[i]


@needs_bf16
def test_bf16_runs_the_layers_in_bf16_and_keeps_the_fp32_islands(models, monkeypatch):
    folded, _ = models
    model = copy.deepcopy(folded)
    model.inference_dtype = "bfloat16"
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, out)
        return hook

    heads = model.roi_heads
    hooks = [model.backbone.register_forward_hook(keep("fpn")),
             heads.box_heads[0].cls_score.register_forward_hook(keep("logits")),
             heads.mask_heads[-1].predictor.register_forward_hook(keep("mask_logits"))]
    flat_dtypes = []
    from_maps = FlatMaps.from_maps.__func__

    def spy(cls, maps):
        flat = from_maps(cls, maps)
        flat_dtypes.append(flat.data.dtype)
        return flat

    monkeypatch.setattr(FlatMaps, "from_maps", classmethod(spy))
    forward_stages = heads.forward_stages
    stages_seen = []
    monkeypatch.setattr(heads, "forward_stages",
                        lambda *a: stages_seen.append(forward_stages(*a)) or stages_seen[-1])
    got = detect(model)
    for h in hooks:
        h.remove()
    # The network runs in bf16 ...
    assert all(t.dtype == torch.bfloat16 for t in seen["fpn"].values())
    assert seen["logits"].dtype == seen["mask_logits"].dtype == torch.bfloat16
    # ... RoIAlign sums in fp32 (from the bf16 maps), boxes are decoded in fp32, and the
    # outputs (scores after sigmoid / top-k, boxes, pasted masks) are fp32 / bool.
    assert flat_dtypes and all(d == torch.float32 for d in flat_dtypes)
    assert all(s.pred_boxes.dtype == torch.float32 for s in stages_seen[0])
    assert got.scores.dtype == got.pred_boxes.tensor.dtype == torch.float32
    assert got.pred_masks.dtype == torch.bool


@needs_bf16
def test_bf16_casts_linear_weights_once_with_autocasts_values(models, monkeypatch):
    """In bf16 the plain ``nn.Linear`` weights run as cached bf16 copies, and
    ``nn.MultiheadAttention``'s own projections stay with autocast. The detections equal,
    bit for bit, those of the same call with every linear weight left to autocast."""
    folded, _ = models
    model = copy.deepcopy(folded)
    model.inference_dtype = "bfloat16"
    head = model.roi_heads.box_heads[0]
    seen = []
    head.register_forward_hook(lambda m, a, o: seen.append(
        (m.instance_interaction.dynamic_layer.weight.dtype, m.self_attn.out_proj.weight.dtype,
         m.self_attn.in_proj_weight.dtype)))
    got = detect(model)
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)]
    assert head.instance_interaction.dynamic_layer.weight.dtype == torch.float32  # put back

    real = fast_inference.InferenceWeights._weights

    def linears_left_to_autocast(self, module, norm, dtype, memory_format):
        if isinstance(module, nn.Linear):
            return fast_inference._Swapped((), (), (), module.weight, module.bias)
        return real(self, module, norm, dtype, memory_format)

    monkeypatch.setattr(fast_inference.InferenceWeights, "_weights", linears_left_to_autocast)
    model._inference_weights.clear()
    seen.clear()
    want = detect(model)
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    assert torch.equal(got.scores, want.scores)
    assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.pred_masks, want.pred_masks)


def test_swapped_weights_are_not_part_of_the_module_tree(models):
    folded, _ = models
    assert isinstance(folded._inference_weights, InferenceWeights)
    assert all(not isinstance(m, InferenceWeights) for m in folded.modules())
    assert not any("inference_weights" in k for k in folded.state_dict())
