"""Loading the official QueryInst checkpoints (docs/method.md §4): converter, config
detection, checkpointer.

The official key names and shapes are written out here from docs/method.md §4 (torchvision ResNet,
mmdet FPN, EmbeddingRPNHead, DIIHead, DynamicMaskHead), not derived from the converter. The
full-size layout is checked on the ``meta`` device (no memory); values are checked on a
narrow model (same structure, small widths).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from queryinst import add_queryinst_config
from queryinst.checkpoint import (
    CheckpointFormatError,
    QueryInstCheckpointer,
    check_against_model,
    config_as_opts,
    convert_official_checkpoint,
    convert_official_state_dict,
    detect_official_config,
    load_checkpoint_file,
    load_official_state_dict,
    official_config_opts,
)

BASE = "configs/Base-QueryInst.yaml"
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# Narrow widths for the value tests: D (queries, FPN, mask convs), FFN, dynamic, stem.
SMALL = dict(dim=16, ffn=32, dyn=4, width=8)


def official_layout(*, stages, queries, classes, depth=50, dim=256, ffn=2048, dyn=64,
                    width=64, box_res=7, mask_convs=4, conv_bias=False):
    """(name, shape) of every tensor of an official QueryInst checkpoint (docs/method.md §4)."""
    out = []

    def bn(prefix, c):
        out.extend([(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)),
                    (f"{prefix}.running_mean", (c,)), (f"{prefix}.running_var", (c,)),
                    (f"{prefix}.num_batches_tracked", ())])

    def ln(prefix, c):
        out.extend([(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))])

    def linear(prefix, o, i, bias=True):
        out.append((f"{prefix}.weight", (o, i)))
        if bias:
            out.append((f"{prefix}.bias", (o,)))

    # torchvision ResNet (bottleneck, stride on the 3x3).
    out.append(("backbone.conv1.weight", (width, 3, 7, 7)))
    bn("backbone.bn1", width)
    in_c, stage_out = width, []
    for i, n in enumerate(BLOCKS[depth], start=1):
        planes = width * 2 ** (i - 1)
        for b in range(n):
            p = f"backbone.layer{i}.{b}"
            out.append((f"{p}.conv1.weight", (planes, in_c, 1, 1)))
            bn(f"{p}.bn1", planes)
            out.append((f"{p}.conv2.weight", (planes, planes, 3, 3)))
            bn(f"{p}.bn2", planes)
            out.append((f"{p}.conv3.weight", (planes * 4, planes, 1, 1)))
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                out.append((f"{p}.downsample.0.weight", (planes * 4, in_c, 1, 1)))
                bn(f"{p}.downsample.1", planes * 4)
            in_c = planes * 4
        stage_out.append(in_c)
    for k, c in enumerate(stage_out):
        out += [(f"neck.lateral_convs.{k}.conv.weight", (dim, c, 1, 1)),
                (f"neck.lateral_convs.{k}.conv.bias", (dim,))]
    for k in range(4):
        out += [(f"neck.fpn_convs.{k}.conv.weight", (dim, dim, 3, 3)),
                (f"neck.fpn_convs.{k}.conv.bias", (dim,))]
    out += [("rpn_head.init_proposal_bboxes.weight", (queries, 4)),
            ("rpn_head.init_proposal_features.weight", (queries, dim))]
    for s in range(stages):
        p = f"roi_head.bbox_head.{s}"
        out += [(f"{p}.attention.attn.in_proj_weight", (3 * dim, dim)),
                (f"{p}.attention.attn.in_proj_bias", (3 * dim,))]
        linear(f"{p}.attention.attn.out_proj", dim, dim)
        ln(f"{p}.attention_norm", dim)
        linear(f"{p}.instance_interactive_conv.dynamic_layer", 2 * dim * dyn, dim)
        ln(f"{p}.instance_interactive_conv.norm_in", dyn)
        ln(f"{p}.instance_interactive_conv.norm_out", dim)
        linear(f"{p}.instance_interactive_conv.fc_layer", dim, box_res * box_res * dim)
        ln(f"{p}.instance_interactive_conv.fc_norm", dim)
        ln(f"{p}.instance_interactive_conv_norm", dim)
        linear(f"{p}.ffn.layers.0.0", ffn, dim)
        linear(f"{p}.ffn.layers.1", dim, ffn)
        ln(f"{p}.ffn_norm", dim)
        linear(f"{p}.cls_fcs.0", dim, dim, bias=False)
        ln(f"{p}.cls_fcs.1", dim)
        for j in range(3):
            linear(f"{p}.reg_fcs.{3 * j}", dim, dim, bias=False)
            ln(f"{p}.reg_fcs.{3 * j + 1}", dim)
        linear(f"{p}.fc_cls", classes, dim)
        linear(f"{p}.fc_reg", 4, dim)
    for s in range(stages):
        p = f"roi_head.mask_head.{s}"
        linear(f"{p}.instance_interactive_conv.dynamic_layer", 2 * dim * dyn, dim)
        ln(f"{p}.instance_interactive_conv.norm_in", dyn)
        ln(f"{p}.instance_interactive_conv.norm_out", dim)
        for i in range(mask_convs):
            out.append((f"{p}.convs.{i}.conv.weight", (dim, dim, 3, 3)))
            if conv_bias:
                out.append((f"{p}.convs.{i}.conv.bias", (dim,)))
            bn(f"{p}.convs.{i}.bn", dim)
        out += [(f"{p}.upsample.weight", (dim, dim, 2, 2)), (f"{p}.upsample.bias", (dim,)),
                (f"{p}.conv_logits.weight", (classes, dim, 1, 1)),
                (f"{p}.conv_logits.bias", (classes,))]
    return out


def make_state_dict(layout, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for name, shape in layout:
        if device == "meta":
            dtype = torch.long if name.endswith("num_batches_tracked") else torch.float32
            sd[name] = torch.empty(shape, device="meta", dtype=dtype)
        elif name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(123)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=gen) * 0.1
    return sd


def make_cfg(detected, small=True, device="cpu"):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(BASE)
    cfg.merge_from_list(config_as_opts(detected) + ["MODEL.DEVICE", device])
    if small:
        d, w = SMALL["dim"], SMALL["width"]
        cfg.merge_from_list([
            "MODEL.FPN.OUT_CHANNELS", d, "MODEL.QUERYINST.HIDDEN_DIM", d,
            "MODEL.QUERYINST.MASK_CONV_DIM", d, "MODEL.QUERYINST.DIM_FEEDFORWARD", SMALL["ffn"],
            "MODEL.QUERYINST.DYNAMIC_DIM", SMALL["dyn"], "MODEL.QUERYINST.NUM_HEADS", 2,
            "MODEL.RESNETS.STEM_OUT_CHANNELS", w, "MODEL.RESNETS.RES2_OUT_CHANNELS", 4 * w,
            "MODEL.RESNETS.WIDTH_PER_GROUP", w,
        ])
    return cfg


SMALL_LAYOUT = dict(stages=2, queries=10, classes=3, **SMALL)


@pytest.fixture(scope="module")
def official():
    return make_state_dict(official_layout(**SMALL_LAYOUT))


@pytest.fixture(scope="module")
def model(official):
    return build_model(make_cfg(detect_official_config(official))).eval()


@pytest.fixture(scope="module")
def official_file(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "queryinst_official.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0", "epoch": 12, "CLASSES": ("a", "b", "c")},
                "state_dict": official}, path)
    return str(path)


# ----------------------------------------------------------------------------- full size
@pytest.mark.parametrize("depth,queries", [(50, 100), (101, 300)])
def test_full_size_official_layout_fits_the_model(depth, queries):
    """docs/method.md §4 names/shapes at the real sizes convert and fill a model built from
    the config."""
    official = make_state_dict(
        official_layout(stages=6, queries=queries, classes=80, depth=depth), device="meta")
    detected = detect_official_config(official)
    assert detected["MODEL.RESNETS.DEPTH"] == depth
    assert detected["MODEL.QUERYINST.NUM_PROPOSALS"] == queries
    assert detected["MODEL.QUERYINST.TEST_TOPK"] == queries
    assert detected["MODEL.QUERYINST.NUM_CLASSES"] == 80
    assert detected["MODEL.QUERYINST.NUM_STAGES"] == 6
    assert detected["MODEL.MASK_ON"] is True
    with torch.device("meta"):
        model = build_model(make_cfg(detected, small=False, device="meta"))
    converted = convert_official_state_dict(official)
    check_against_model(converted, model.state_dict(), detected)
    if depth == 50 and queries == 100:  # docs/method.md §1: ~173 M parameters in total
        total = sum(p.numel() for p in model.parameters())
        assert 172e6 < total < 174e6


# ----------------------------------------------------------------------------- values
def test_detects_small_config(official):
    detected = detect_official_config(official)
    assert dict(detected) == {
        "MODEL.RESNETS.DEPTH": 50, "MODEL.QUERYINST.NUM_PROPOSALS": 10,
        "MODEL.QUERYINST.TEST_TOPK": 10, "TEST.DETECTIONS_PER_IMAGE": 10,
        "MODEL.QUERYINST.NUM_CLASSES": 3, "MODEL.QUERYINST.NUM_STAGES": 2, "MODEL.MASK_ON": True,
    }


def test_converted_loads_strictly_and_tensors_land_in_place(official, model):
    converted = convert_official_state_dict(official)
    check_against_model(converted, model.state_dict())
    state = dict(converted)
    for k, v in model.state_dict().items():  # mask BN step counters, ours if absent
        state.setdefault(k, v)
    model.load_state_dict(state, strict=True)
    ours = model.state_dict()
    pairs = {
        "roi_head.bbox_head.1.fc_cls.weight": "roi_heads.box_heads.1.cls_score.weight",
        "roi_head.bbox_head.0.fc_reg.bias": "roi_heads.box_heads.0.bbox_pred.bias",
        "roi_head.bbox_head.1.attention.attn.out_proj.weight":
            "roi_heads.box_heads.1.self_attn.out_proj.weight",
        "roi_head.bbox_head.0.attention_norm.bias": "roi_heads.box_heads.0.self_attn_norm.bias",
        "roi_head.bbox_head.1.instance_interactive_conv.fc_layer.weight":
            "roi_heads.box_heads.1.instance_interaction.fc_layer.weight",
        "roi_head.bbox_head.1.instance_interactive_conv_norm.weight":
            "roi_heads.box_heads.1.instance_interaction_norm.weight",
        "roi_head.bbox_head.0.ffn.layers.0.0.weight": "roi_heads.box_heads.0.ffn.0.weight",
        "roi_head.bbox_head.0.ffn.layers.1.bias": "roi_heads.box_heads.0.ffn.3.bias",
        "roi_head.bbox_head.1.reg_fcs.7.bias": "roi_heads.box_heads.1.reg_fcs.7.bias",
        "roi_head.bbox_head.1.cls_fcs.0.weight": "roi_heads.box_heads.1.cls_fcs.0.weight",
        "roi_head.mask_head.1.instance_interactive_conv.norm_in.weight":
            "roi_heads.mask_heads.1.instance_interaction.norm_in.weight",
        "roi_head.mask_head.0.convs.2.bn.running_var":
            "roi_heads.mask_heads.0.mask_convs.2.1.running_var",
        "roi_head.mask_head.1.convs.3.conv.weight": "roi_heads.mask_heads.1.mask_convs.3.0.weight",
        "roi_head.mask_head.1.upsample.weight": "roi_heads.mask_heads.1.deconv.weight",
        "roi_head.mask_head.0.conv_logits.bias": "roi_heads.mask_heads.0.predictor.bias",
        "rpn_head.init_proposal_bboxes.weight": "proposal_generator.init_proposal_boxes.weight",
        "rpn_head.init_proposal_features.weight":
            "proposal_generator.init_proposal_features.weight",
        "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
        "backbone.bn1.running_mean": "backbone.bottom_up.stem.conv1.norm.running_mean",
        "backbone.layer3.2.bn2.running_var": "backbone.bottom_up.res4.2.conv2.norm.running_var",
        "backbone.layer4.0.downsample.0.weight": "backbone.bottom_up.res5.0.shortcut.weight",
        "backbone.layer2.0.downsample.1.bias": "backbone.bottom_up.res3.0.shortcut.norm.bias",
        "backbone.layer1.1.conv3.weight": "backbone.bottom_up.res2.1.conv3.weight",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral2.weight",
        "neck.lateral_convs.3.conv.bias": "backbone.fpn_lateral5.bias",
        "neck.fpn_convs.1.conv.weight": "backbone.fpn_output3.weight",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(official[theirs], ours[mine]), (theirs, mine)
    # nn.MultiheadAttention's packed rows are (q, k, v) in both; check each block.
    d = SMALL["dim"]
    their_in = official["roi_head.bbox_head.1.attention.attn.in_proj_weight"]
    my_in = ours["roi_heads.box_heads.1.self_attn.in_proj_weight"]
    for block in range(3):
        assert torch.equal(their_in[block * d:(block + 1) * d], my_in[block * d:(block + 1) * d])


def test_mask_conv_bias_folds_exactly_into_the_bn():
    """Official repo files carry convs.{i}.conv.bias: eval output of conv+bias+BN unchanged."""
    layout = official_layout(**SMALL_LAYOUT, conv_bias=True)
    official = make_state_dict(layout, seed=3)
    converted = convert_official_state_dict(official)
    assert not any(k.endswith("mask_convs.1.0.bias") for k in converted)
    d = SMALL["dim"]
    ref = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=True), nn.BatchNorm2d(d)).eval()
    folded = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d)).eval()
    p, q = "roi_head.mask_head.1.convs.2.", "roi_heads.mask_heads.1.mask_convs.2."
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ref.load_state_dict({"0.weight": official[p + "conv.weight"],
                         "0.bias": official[p + "conv.bias"],
                         **{f"1.{n}": official[p + "bn." + n] for n in bn}})
    folded.load_state_dict({"0.weight": converted[q + "0.weight"],
                            **{f"1.{n}": converted[q + "1." + n] for n in bn}})
    x = torch.randn(2, d, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(converted[q + "1.running_mean"],
                          official[p + "bn.running_mean"] - official[p + "conv.bias"])


# ----------------------------------------------------------------------------- refusals
def test_missing_key_is_refused_with_its_name(official, model):
    broken = OrderedDict(official)
    del broken["roi_head.bbox_head.1.fc_cls.bias"]
    with pytest.raises(CheckpointFormatError, match=r"roi_heads\.box_heads\.1\.cls_score\.bias"):
        check_against_model(convert_official_state_dict(broken), model.state_dict())


def test_unknown_key_is_refused_with_its_name(official):
    broken = OrderedDict(official)
    broken["roi_head.bbox_head.0.extra_fc.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointFormatError, match=r"roi_head\.bbox_head\.0\.extra_fc\.weight"):
        convert_official_state_dict(broken)


def test_key_the_model_lacks_is_refused(official, model):
    broken = OrderedDict(official)
    broken["roi_head.mask_head.0.convs.4.conv.weight"] = torch.zeros(16, 16, 3, 3)
    with pytest.raises(CheckpointFormatError, match=r"mask_heads\.0\.mask_convs\.4\.0\.weight"):
        check_against_model(convert_official_state_dict(broken), model.state_dict())


def test_wrong_config_is_refused_with_the_detected_one(model):
    other = make_state_dict(official_layout(**{**SMALL_LAYOUT, "queries": 30}))
    with pytest.raises(CheckpointFormatError, match=r"(?s)init_proposal_boxes.*NUM_PROPOSALS: 30"):
        check_against_model(convert_official_state_dict(other), model.state_dict(),
                            detect_official_config(other))


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("kind", ["torchvision_resnet", "random_dict", "mmdet_other"])
def test_non_queryinst_file_gets_the_expected_error(kind, model, tmp_path):
    import torchvision

    obj = {
        "torchvision_resnet": lambda: torchvision.models.resnet18(weights=None).state_dict(),
        "random_dict": lambda: {"foo": torch.zeros(3), "bar": 1},
        "mmdet_other": lambda: {"meta": {}, "state_dict": {
            "backbone.conv1.weight": torch.zeros(1), "rpn_head.rpn_cls.weight": torch.zeros(1)}},
    }[kind]()
    path = _save(tmp_path, f"{kind}.pth", obj)
    with pytest.raises(CheckpointFormatError, match="expected"):
        QueryInstCheckpointer(model).load(path)
    with pytest.raises(CheckpointFormatError, match="expected"):
        load_official_state_dict(path)


def test_detectron2_checkpoint_of_another_model_is_refused(model, tmp_path):
    path = _save(tmp_path, "other.pth", {"model": {"head.weight": torch.zeros(2)}})
    with pytest.raises(CheckpointFormatError, match="expected"):
        QueryInstCheckpointer(model).load(path)


# ----------------------------------------------------------------------------- loading paths
def _assert_loaded(model, official):
    ours = model.state_dict()
    assert torch.equal(ours["roi_heads.box_heads.1.cls_score.weight"],
                       official["roi_head.bbox_head.1.fc_cls.weight"])
    assert torch.equal(ours["backbone.bottom_up.res4.2.conv2.norm.running_var"],
                       official["backbone.layer3.2.bn2.running_var"])


def test_model_weights_may_name_an_official_file(official, official_file):
    detected = detect_official_config(load_official_state_dict(official_file))
    cfg = make_cfg(detected)
    cfg.MODEL.WEIGHTS = official_file
    model = build_model(cfg)
    QueryInstCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    _assert_loaded(model, official)


def test_official_config_opts_reads_the_file_or_gives_nothing(official_file, model, tmp_path):
    opts = official_config_opts(official_file)
    assert dict(zip(opts[::2], opts[1::2]))["MODEL.QUERYINST.NUM_PROPOSALS"] == 10
    own = _save(tmp_path, "model_final.pth", {"model": model.state_dict()})
    for path in (own, "", "detectron2://ImageNetPretrained/torchvision/R-50.pkl",
                 str(tmp_path / "missing.pth")):
        assert official_config_opts(path) == []


def test_official_file_for_another_class_count_fine_tunes_but_never_infers(official,
                                                                           official_file):
    """Training (not strict) fine-tunes an official file to 5 classes: every tensor but the
    class logits and mask predictors is the file's, those keep their random init; inference
    (strict) refuses the file and names the class count it implies."""
    detected = detect_official_config(load_official_state_dict(official_file))
    model = build_model(make_cfg({**detected, "MODEL.QUERYINST.NUM_CLASSES": 5}))
    before = model.state_dict()["roi_heads.box_heads.1.cls_score.weight"].clone()
    QueryInstCheckpointer(model).load(official_file)
    state = model.state_dict()
    assert torch.equal(state["backbone.bottom_up.res4.2.conv2.norm.running_var"],
                       official["backbone.layer3.2.bn2.running_var"])
    assert torch.equal(state["roi_heads.box_heads.1.cls_score.weight"], before)
    assert state["roi_heads.mask_heads.0.predictor.weight"].shape[0] == 5
    with pytest.raises(CheckpointFormatError, match=r"(?s)cls_score.*NUM_CLASSES: 3"):
        QueryInstCheckpointer(model, strict=True).load(official_file)


def test_official_file_for_another_query_count_is_refused_even_for_training(official_file):
    detected = detect_official_config(load_official_state_dict(official_file))
    model = build_model(make_cfg({**detected, "MODEL.QUERYINST.NUM_PROPOSALS": 12}))
    with pytest.raises(CheckpointFormatError, match=r"(?s)init_proposal_boxes.*NUM_PROPOSALS: 10"):
        QueryInstCheckpointer(model).load(official_file)


def test_official_file_starts_a_video_model_with_its_own_classes(official, official_file):
    """The YouTube-VIS configs' start: an official COCO file into QueryInstVIS with another
    class count; the track head (no official tensor) keeps its init, the rest is the file's.
    official_config_opts leaves the class count to the config when fine-tuning."""
    detected = detect_official_config(load_official_state_dict(official_file))
    opts = official_config_opts(official_file, fine_tuning=True)
    assert "MODEL.QUERYINST.NUM_CLASSES" not in opts[::2]
    assert "MODEL.QUERYINST.NUM_CLASSES" in official_config_opts(official_file)[::2]
    cfg = make_cfg({**detected, "MODEL.QUERYINST.NUM_CLASSES": 4})
    cfg.MODEL.META_ARCHITECTURE = "QueryInstVIS"
    model = build_model(cfg)
    head = model.track_head.mlp[0].weight.clone()
    QueryInstCheckpointer(model).load(official_file)
    assert torch.equal(model.track_head.mlp[0].weight, head)
    assert torch.equal(model.state_dict()["proposal_generator.init_proposal_features.weight"],
                       official["rpn_head.init_proposal_features.weight"])
    with pytest.raises(CheckpointFormatError, match="track_head"):
        QueryInstCheckpointer(model, strict=True).load(official_file)


def test_converted_file_loads_with_detectron2_checkpointer(official, official_file, tmp_path):
    out = str(tmp_path / "queryinst_d2.pth")
    models = {}

    def model_state(detected):
        models["m"] = build_model(make_cfg(detected))
        return models["m"].state_dict()

    _, detected = convert_official_checkpoint(official_file, out, build_model_state=model_state)
    data = torch.load(out, weights_only=True)
    assert data["matching_heuristics"] is False and "__author__" in data
    model = build_model(make_cfg(detected))
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(out))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    _assert_loaded(model, official)
    QueryInstCheckpointer(model).load(out)  # strict path of the converted file


def test_own_detectron2_checkpoint_still_loads(model, tmp_path):
    path = _save(tmp_path, "model_final.pth", {"model": model.state_dict(), "iteration": 7})
    other = build_model(make_cfg(detect_official_config(make_state_dict(
        official_layout(**SMALL_LAYOUT))))).eval()
    extra = QueryInstCheckpointer(other).load(path)
    assert extra["iteration"] == 7
    assert torch.equal(other.state_dict()["roi_heads.box_heads.0.cls_score.weight"],
                       model.state_dict()["roi_heads.box_heads.0.cls_score.weight"])


# ----------------------------------------------------------------------------- file formats
def test_legacy_format_loads_in_weights_only_mode(official, tmp_path):
    """mmdet's publish_model saves with _use_new_zipfile_serialization=False."""
    path = tmp_path / "legacy.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": official}, path,
               _use_new_zipfile_serialization=False)
    sd = load_official_state_dict(str(path))
    assert torch.equal(sd["backbone.conv1.weight"], official["backbone.conv1.weight"])


@pytest.mark.parametrize("legacy", [False, True])
def test_numpy_in_meta_loads_without_leaving_weights_only_mode(official, tmp_path, caplog,
                                                               legacy):
    """numpy scalars (not allowed by plain weights_only) are on queryinst.checkpoint.safe_load's
    allow-list: official files and any other file load, no warning, nothing dropped."""
    meta = {"seed": np.int64(3)}
    kw = {"_use_new_zipfile_serialization": False} if legacy else {}
    good = tmp_path / "official_numpy_meta.pth"
    torch.save({"meta": meta, "state_dict": official}, good, **kw)
    with caplog.at_level("INFO"):
        sd = load_official_state_dict(str(good))
    assert not caplog.records
    assert torch.equal(sd["rpn_head.init_proposal_bboxes.weight"],
                       official["rpn_head.init_proposal_bboxes.weight"])
    other = tmp_path / "other_numpy.pth"
    torch.save({"meta": meta, "state_dict": {"layer.weight": torch.zeros(2)}}, other, **kw)
    assert load_checkpoint_file(str(other))["meta"]["seed"] == 3


# ------------------------------------------------------ class rows from another class list
def _class_init_cfg(official_file, names, source="class_init_test_source", classes=4):
    from detectron2.data import MetadataCatalog

    MetadataCatalog.get("class_init_test_source").set(thing_classes=["a", "b", "c"])
    detected = detect_official_config(load_official_state_dict(official_file))
    cfg = make_cfg({**detected, "MODEL.QUERYINST.NUM_CLASSES": classes})
    cfg.merge_from_list(["MODEL.QUERYINST.CLASS_INIT_FROM", names,
                         "MODEL.QUERYINST.CLASS_INIT_SOURCE", source])
    return cfg


def test_class_init_copies_the_named_rows_and_initialises_the_rest(official, official_file,
                                                                   tmp_path):
    """COCO -> Cityscapes style fine-tuning (docs/method.md §7) on a 3-class official file:
    model classes 0, 2, 3 start from file classes c, a, a (rows of every stage's classifier
    and mask logits, exactly); class 1 ("") keeps the model's initialisation, whose bias is
    the prior -log((1 - 0.01) / 0.01). A resumed 4-class checkpoint is not remapped again."""
    from queryinst.checkpoint.class_init import class_init_from_config

    cfg = _class_init_cfg(official_file, ("c", "", "a", "a"))
    init = class_init_from_config(cfg)
    assert init.rows == (2, -1, 0, 0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    QueryInstCheckpointer(model, class_init=init).load(official_file)
    state = model.state_dict()
    prior_bias = -np.log((1 - 0.01) / 0.01)
    for s in range(SMALL_LAYOUT["stages"]):
        for ours, theirs in ((f"roi_heads.box_heads.{s}.cls_score",
                              f"roi_head.bbox_head.{s}.fc_cls"),
                             (f"roi_heads.mask_heads.{s}.predictor",
                              f"roi_head.mask_head.{s}.conv_logits")):
            for part in ("weight", "bias"):
                got, src = state[f"{ours}.{part}"], official[f"{theirs}.{part}"]
                assert got.shape[0] == 4
                assert torch.equal(got[[0, 2, 3]], src[[2, 0, 0]])
                assert torch.equal(got[1], before[f"{ours}.{part}"][1])
        assert state[f"roi_heads.box_heads.{s}.cls_score.bias"][1].item() == pytest.approx(
            prior_bias, abs=1e-6)
    # everything else is the file's
    assert torch.equal(state["proposal_generator.init_proposal_features.weight"],
                       official["rpn_head.init_proposal_features.weight"])
    # resuming the fine-tuned model's own checkpoint leaves its rows as they are
    own = _save(tmp_path, "model_0000099.pth", {"model": state})
    again = build_model(cfg)
    QueryInstCheckpointer(again, class_init=init).load(own)
    for key, value in state.items():
        assert torch.equal(again.state_dict()[key], value), key


def test_class_init_config_errors_name_the_key_and_the_fix(official_file):
    from queryinst.checkpoint.class_init import ClassInitError, class_init_from_config

    with pytest.raises(ClassInitError,
                       match=r"CLASS_INIT_FROM has 3 entries but .*NUM_CLASSES is 4"):
        class_init_from_config(_class_init_cfg(official_file, ("a", "b", "c")))
    with pytest.raises(ClassInitError, match=r"CLASS_INIT_FROM\[1\] is 'bb'.*closest: b"):
        class_init_from_config(_class_init_cfg(official_file, ("a", "bb", "c", "")))
    with pytest.raises(ClassInitError, match="'no_such_dataset', which is not a registered"):
        class_init_from_config(_class_init_cfg(official_file, ("a", "b", "c", ""),
                                               source="no_such_dataset"))


def test_class_init_refuses_a_source_with_another_class_count(official_file):
    """COCO's 80 names for a 3-class file: the rows cannot be the named classes."""
    from queryinst.checkpoint.class_init import ClassInitError, class_init_from_config

    cfg = _class_init_cfg(official_file, ("person", "", "car", "truck"), source="coco_2017_train")
    model = build_model(cfg)
    with pytest.raises(ClassInitError, match=r"cls_score.weight has shape \(3, 16\).*80 classes"):
        QueryInstCheckpointer(model, class_init=class_init_from_config(cfg)).load(official_file)
