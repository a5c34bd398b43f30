"""MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT: the FPN's output convs contiguous in a channels-last
backbone (queryinst/modeling/memory_format.py) change the layout only, never the numbers."""
from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from queryinst.modeling.memory_format import fpn_output_convs, resolve_fpn_output_memory_format
from test_model import random_gt, small_cfg, train_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CL = torch.channels_last


def _model(fpn_format: str, seed: int = 0):
    cfg = small_cfg(num_proposals=8)
    cfg.MODEL.QUERYINST.CHANNELS_LAST = True
    cfg.MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT = fpn_format
    torch.manual_seed(seed)
    return build_model(cfg)


def _batch():
    return [train_input(96, 128, 70, random_gt(96, 128, 3, 3, seed=71)),
            train_input(96, 128, 72, random_gt(96, 128, 2, 3, seed=73))]


@pytest.mark.parametrize("avx512, device, want", [
    (False, "cpu", "contiguous"),  # oneDNN's channels-last weight gradient is slow there
    (True, "cpu", "channels_last"),
    (False, "cuda", "channels_last"),
])
def test_auto_keeps_fpn_outputs_contiguous_only_on_cpus_without_avx512(
        monkeypatch, avx512, device, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    assert resolve_fpn_output_memory_format("auto", device) == want
    for name in ("channels_last", "contiguous"):  # an explicit choice is kept everywhere
        assert resolve_fpn_output_memory_format(name, device) == name


def test_unknown_fpn_output_memory_format_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"MODEL\.QUERYINST\.FPN_OUTPUT_MEMORY_FORMAT 'nhwc'.*"
                                         r"channels_last"):
        resolve_fpn_output_memory_format("nhwc", "cpu")
    with pytest.raises(ValueError, match="FPN_OUTPUT_MEMORY_FORMAT"):
        _model("nhwc")


def test_contiguous_fpn_outputs_give_the_channels_last_losses_and_gradients():
    plain, mixed = _model("channels_last").train(), _model("contiguous").train()
    mixed.load_state_dict(plain.state_dict())
    outputs = fpn_output_convs(mixed.backbone)
    assert len(outputs) == 4  # p2..p5
    assert all(c.weight.is_contiguous() and not c.weight.is_contiguous(memory_format=CL)
               for c in outputs)
    assert all(c.weight.is_contiguous(memory_format=CL) for c in fpn_output_convs(plain.backbone))
    # The rest of the backbone stays channels-last: the ResNet stem conv (7x7) shows it.
    assert mixed.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=CL)
    # The layout is not saved: the checkpoints (before any BatchNorm update) are equal.
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 mixed.state_dict().values()))
    batch = _batch()
    want, got = plain(batch), mixed(batch)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # Gradients through the backbone alone: the full losses pass through the matching and
    # three stages, which amplify rounding; the layout changes only the backbone.
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    cotangents = None
    for model in (plain, mixed):
        model.zero_grad()
        maps = model.backbone(x)
        if cotangents is None:
            gen = torch.Generator().manual_seed(6)
            cotangents = {k: torch.randn(v.shape, generator=gen) for k, v in maps.items()}
        sum((maps[k] * cotangents[k]).sum() for k in maps).backward()
    grads = dict(plain.backbone.named_parameters())
    checked = 0
    for name, p in mixed.backbone.named_parameters():
        if p.grad is None:  # frozen stem and res2 (FREEZE_AT)
            assert grads[name].grad is None, name
            continue
        want_grad = grads[name].grad  # float32 sums over the map: rounding ~1e-5 of the max
        torch.testing.assert_close(p.grad, want_grad, rtol=1e-3,
                                   atol=1e-4 * want_grad.abs().max().item(), msg=name)
        checked += 1
    assert checked > 50
    assert fpn_output_convs(mixed.backbone)[0].weight.grad.abs().max() > 0  # P2's conv learnt


def test_fpn_maps_are_contiguous_in_training_and_channels_last_in_cpu_inference():
    model = _model("contiguous").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        trained_layout = model.backbone(x)
        with model._inference_weights.applied(memory_format=CL):  # INFERENCE_MEMORY_FORMAT auto
            inference_layout = model.backbone(x)
    for name, f in trained_layout.items():
        assert f.is_contiguous() and not f.is_contiguous(memory_format=CL), name
        # the hook leaves a channels-last weight alone: no copy into the other layout
        assert inference_layout[name].is_contiguous(memory_format=CL), name
        torch.testing.assert_close(inference_layout[name], f, rtol=1e-3, atol=1e-4)


def test_without_channels_last_the_key_changes_nothing():
    cfg = small_cfg(num_proposals=8)
    cfg.MODEL.QUERYINST.FPN_OUTPUT_MEMORY_FORMAT = "contiguous"
    model = build_model(cfg)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous() for c in convs)
    assert not any(c._forward_pre_hooks for c in convs)
