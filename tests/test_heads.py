"""Tests of the QueryInst heads: DynamicConv, DIIHead (box stage), DynamicMaskHead.

Truth comes from outside the modules: an explicit per-instance loop for DynamicConv, hand
arithmetic from the shapes of docs/method.md §1 for parameter counts, the xavier formula and
the focal prior for init (docs/method.md §2.3), and symmetry properties of the architecture.
"""
from __future__ import annotations

import math

import pytest
import torch
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

from queryinst.modeling.roi_heads.box_head import DIIHead
from queryinst.modeling.roi_heads.dynamic_conv import DynamicConv
from queryinst.modeling.roi_heads.mask_head import DynamicMaskHead

# Small sizes keep the behavioural tests fast; full sizes are used for counts and init.
SMALL_BOX = dict(
    num_classes=5, hidden_dim=16, dim_feedforward=32, num_heads=4, dynamic_dim=4,
    pooler_resolution=3,
)
SMALL_MASK = dict(num_classes=5, hidden_dim=16, dynamic_dim=4, pooler_resolution=4, conv_dim=8)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter and norm statistic, so no default (1, 0) hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def _layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim written out: (x - mean) / sqrt(biased var + eps) * w + b."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _reference_dynamic_conv(conv: DynamicConv, query, roi):
    """docs/method.md §1.3, step 3, one instance at a time with plain matmuls."""
    dim, dyn, res = conv.hidden_dim, conv.dynamic_dim, conv.pooler_resolution
    outs = []
    for r in range(query.shape[0]):
        params = conv.dynamic_layer.weight @ query[r] + conv.dynamic_layer.bias
        w_in = params[: dim * dyn].reshape(dim, dyn)
        w_out = params[dim * dyn :].reshape(dyn, dim)
        # One row per position, row-major over (y, x).
        x = torch.stack([roi[r, :, i, j] for i in range(res) for j in range(res)])
        x = torch.relu(_layer_norm(x @ w_in, conv.norm_in))
        x = torch.relu(_layer_norm(x @ w_out, conv.norm_out))
        if conv.with_proj:
            flat = torch.cat([x[s] for s in range(res * res)])  # index = s * D + c
            x = conv.fc_layer.weight @ flat + conv.fc_layer.bias
            x = torch.relu(_layer_norm(x, conv.fc_norm))
        outs.append(x)
    if not outs:
        shape = (0, dim) if conv.with_proj else (0, res * res, dim)
        return query.new_zeros(shape)
    return torch.stack(outs)


# ---------------------------------------------------------------- DynamicConv


@pytest.mark.parametrize("with_proj", [True, False])
@pytest.mark.parametrize("num_rois", [0, 1, 3])
def test_dynamic_conv_matches_per_instance_loop(with_proj, num_rois):
    dim, dyn, res = 8, 3, 3
    conv = _randomize(DynamicConv(dim, dyn, res, with_proj=with_proj).double(), seed=0)
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(num_rois, dim, generator=gen, dtype=torch.float64)
    roi = torch.randn(num_rois, dim, res, res, generator=gen, dtype=torch.float64)

    out = conv(query, roi)

    expected = _reference_dynamic_conv(conv, query, roi)
    assert out.shape == ((num_rois, dim) if with_proj else (num_rois, res * res, dim))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_dynamic_conv_submodules():
    with_proj = DynamicConv()
    assert with_proj.dynamic_layer.weight.shape == (32768, 256)
    assert with_proj.fc_layer.weight.shape == (256, 12544)
    no_proj = DynamicConv(pooler_resolution=14, with_proj=False)
    assert not hasattr(no_proj, "fc_layer") and not hasattr(no_proj, "fc_norm")


def test_dynamic_conv_rejects_mismatched_shapes():
    conv = DynamicConv(8, 2, 3)
    with pytest.raises(ValueError):
        conv(torch.zeros(2, 8), torch.zeros(3, 8, 3, 3))
    with pytest.raises(ValueError):
        conv(torch.zeros(2, 8), torch.zeros(2, 8, 4, 4))


# ---------------------------------------------------------------- parameter counts


@pytest.fixture(scope="module")
def full_box_head():
    torch.manual_seed(0)
    return DIIHead(num_classes=80)


@pytest.fixture(scope="module")
def full_mask_head():
    torch.manual_seed(0)
    return DynamicMaskHead(num_classes=80)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_box_stage_parameter_count(full_box_head):
    ln = 256 + 256  # LayerNorm(256): weight + bias
    self_attn = (768 * 256 + 768) + (256 * 256 + 256)  # in_proj (q, k, v) + out_proj
    dynamic_layer = 256 * 32768 + 32768  # 32768 = 2 * 256 * 64
    fc_layer = 12544 * 256 + 256  # 12544 = 7 * 7 * 256
    dynamic_conv = dynamic_layer + (64 + 64) + ln + fc_layer + ln  # + norm_in, norm_out, fc_norm
    ffn = (256 * 2048 + 2048) + (2048 * 256 + 256)
    fc_block = 256 * 256 + ln  # Linear without bias + LayerNorm
    cls_branch = 1 * fc_block + (256 * 80 + 80)
    reg_branch = 3 * fc_block + (256 * 4 + 4)
    expected = self_attn + ln + dynamic_conv + ln + ffn + ln + cls_branch + reg_branch

    assert expected == 13_235_412  # "~13.2 M per box stage" (docs/method.md §1)
    assert _num_params(full_box_head.instance_interaction) == 11_634_048 == dynamic_conv
    assert _num_params(full_box_head) == expected


def test_mask_stage_parameter_count(full_mask_head):
    dynamic_conv = (256 * 32768 + 32768) + (64 + 64) + (256 + 256)  # no fc_layer / fc_norm
    conv_block = 256 * 256 * 3 * 3 + (256 + 256)  # conv without bias + BN weight, bias
    deconv = 256 * 256 * 2 * 2 + 256
    predictor = 256 * 80 + 80
    expected = dynamic_conv + 4 * conv_block + deconv + predictor

    assert expected == 11_066_320  # "~11.1 M per mask stage" (docs/method.md §1)
    assert _num_params(full_mask_head) == expected


# ---------------------------------------------------------------- init


def _check_xavier(module: nn.Module) -> int:
    """Every weight with dim > 1 lies in the xavier bound and nearly fills it."""
    checked = 0
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        receptive = math.prod(p.shape[2:])
        fan_in, fan_out = p.shape[1] * receptive, p.shape[0] * receptive
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        max_abs = p.detach().abs().max().item()
        # The lower check rules out PyTorch's default kaiming init (bound 1/sqrt(fan_in)).
        assert 0.9 * bound <= max_abs <= bound, (name, max_abs, bound)
        checked += 1
    return checked


def test_box_head_init(full_box_head):
    head = full_box_head
    # attn in/out proj, dynamic_layer, fc_layer, ffn x2, cls_fcs x1, reg_fcs x3, cls, reg
    assert _check_xavier(head) == 2 + 2 + 2 + 1 + 3 + 2
    torch.testing.assert_close(
        head.cls_score.bias, torch.full((80,), -math.log(0.99 / 0.01))
    )
    assert abs(head.cls_score.bias[0].item() - (-4.59512)) < 1e-4
    for m in head.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_mask_head_init(full_mask_head):
    head = full_mask_head
    assert _check_xavier(head) == 1 + 4 + 1 + 1  # dynamic layer, convs, deconv, predictor
    assert torch.equal(head.predictor.bias, torch.zeros(80))
    for block in head.mask_convs:
        assert block[0].bias is None
        assert isinstance(block[1], nn.BatchNorm2d)
        assert torch.equal(block[1].weight, torch.ones(256))


# ---------------------------------------------------------------- DIIHead behaviour


def _box_inputs(batch, num_queries, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dim, res = SMALL_BOX["hidden_dim"], SMALL_BOX["pooler_resolution"]
    roi = torch.randn(batch * num_queries, dim, res, res, generator=gen, dtype=dtype)
    query = torch.randn(batch, num_queries, dim, generator=gen, dtype=dtype)
    return roi, query


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,num_queries", [(1, 1), (1, 5), (2, 3), (2, 7)])
def test_box_head_shapes(batch, num_queries, dtype):
    torch.manual_seed(0)
    head = DIIHead(**SMALL_BOX).to(dtype)
    roi, query = _box_inputs(batch, num_queries, seed=1, dtype=dtype)

    outputs = head(roi, query)

    expected = [(batch, num_queries, d) for d in (5, 4, 16, 16)]
    assert [tuple(o.shape) for o in outputs] == expected
    assert all(o.dtype == dtype for o in outputs)


def test_box_head_rejects_wrong_roi_count():
    head = DIIHead(**SMALL_BOX)
    roi, query = _box_inputs(2, 3, seed=0)
    with pytest.raises(ValueError):
        head(roi[:5], query)


@pytest.fixture
def small_box_head():
    head = _randomize(DIIHead(**SMALL_BOX).double(), seed=3)
    return head.eval()


def test_box_head_is_permutation_equivariant_per_image(small_box_head):
    head, batch, n = small_box_head, 2, 6
    roi, query = _box_inputs(batch, n, seed=4, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    query_p = query.clone()
    query_p[0] = query[0, perm]
    roi_p = roi.view(batch, n, *roi.shape[1:]).clone()
    roi_p[0] = roi_p[0, perm]
    roi_p = roi_p.flatten(0, 1)

    outputs = head(roi, query)
    outputs_p = head(roi_p, query_p)

    for out, out_p in zip(outputs, outputs_p):
        torch.testing.assert_close(out_p[0], out[0, perm], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_p[1], out[1], rtol=1e-10, atol=1e-10)


def test_box_head_attention_stays_within_image(small_box_head):
    head, batch, n = small_box_head, 2, 4
    roi, query = _box_inputs(batch, n, seed=5, dtype=torch.float64)
    roi_b, query_b = roi.clone(), query.clone()
    query_b[1] += 1.0  # change image 1's queries and RoI features only
    roi_b[n:] *= -2.0

    outputs = head(roi, query)
    outputs_b = head(roi_b, query_b)

    for out, out_b in zip(outputs, outputs_b):
        torch.testing.assert_close(out_b[0], out[0], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out_b[1], out[1])

    # Within an image the queries do interact: changing query 1 changes query 0's outputs.
    query_c = query.clone()
    query_c[0, 1] += 1.0
    assert not torch.allclose(head(roi, query_c)[2][0, 0], outputs[2][0, 0])


# ---------------------------------------------------------------- DynamicMaskHead behaviour


def _mask_inputs(num_rois, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dim, res = SMALL_MASK["hidden_dim"], SMALL_MASK["pooler_resolution"]
    roi = torch.randn(num_rois, dim, res, res, generator=gen, dtype=dtype)
    attn_feats = torch.randn(num_rois, dim, generator=gen, dtype=dtype)
    return roi, attn_feats


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("num_rois", [0, 1, 6])
def test_mask_head_shapes(num_rois, train):
    torch.manual_seed(0)
    head = DynamicMaskHead(**SMALL_MASK).train(train)
    roi, attn_feats = _mask_inputs(num_rois, seed=1)

    out = head(roi, attn_feats)

    assert out.shape == (num_rois, 5, 8, 8)  # 2 * pooler_resolution
    assert out.dtype == torch.float32


def test_mask_head_default_resolution():
    head = DynamicMaskHead(num_classes=3, hidden_dim=16, dynamic_dim=4, conv_dim=8).eval()
    out = head(torch.randn(2, 16, 14, 14), torch.randn(2, 16))
    assert out.shape == (2, 3, 28, 28)
    assert head(torch.zeros(0, 16, 14, 14), torch.zeros(0, 16)).shape == (0, 3, 28, 28)


@pytest.mark.parametrize("norm", ["BN", ""])
def test_mask_head_eval_is_per_roi(norm):
    head = _randomize(DynamicMaskHead(**SMALL_MASK, norm=norm).double(), seed=6).eval()
    roi, attn_feats = _mask_inputs(5, seed=7, dtype=torch.float64)

    batched = head(roi, attn_feats)
    one_by_one = torch.cat([head(roi[i : i + 1], attn_feats[i : i + 1]) for i in range(5)])

    assert batched.dtype == torch.float64
    torch.testing.assert_close(batched, one_by_one, rtol=1e-10, atol=1e-10)


def test_mask_head_norm_options():
    plain = DynamicMaskHead(**SMALL_MASK, norm="")
    assert all(block[0].bias is not None and len(block) == 2 for block in plain.mask_convs)
    sync = DynamicMaskHead(**SMALL_MASK, norm="SyncBN")
    # Detectron2's all_reduce BatchNorm (gloo and NCCL), weighted by each process's RoIs;
    # its behaviour across processes: tests/test_distributed.py.
    assert isinstance(sync.mask_convs[0][1], NaiveSyncBatchNorm)
    assert sync.mask_convs[0][1]._stats_mode == "N"
    assert sync.state_dict().keys() == DynamicMaskHead(**SMALL_MASK, norm="BN").state_dict().keys()
    with pytest.raises(ValueError):
        DynamicMaskHead(**SMALL_MASK, norm="GN")
