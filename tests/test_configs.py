"""Every yaml under configs/ loads; the COCO variants say what docs/method.md says and build.

Numbers: docs/method.md §1, §2 and §5; parameter arithmetic from the
shapes (ResNet bottleneck convs have no bias; FrozenBN has buffers, not parameters).
"""
import glob
import os
import re
import sys

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from torchvision.models import mobilenet_v2

from queryinst import add_queryinst_config
from queryinst.config_loading import device_note, merge_config, merge_config_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_net  # noqa: E402

CONFIGS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "configs"))
BASE = os.path.join(CONFIGS, "Base-QueryInst.yaml")
ALL_YAMLS = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))
MULTI_SCALE = tuple(range(480, 801, 32))

# name -> expected values (depth, queries = top-k = detections, mask, multi-scale, crop,
# schedule, solver recipe)
OFFICIAL = dict(lr=2.5e-5, backbone_mult=1.0, clip=1.0)
MMDET = dict(lr=1e-4, backbone_mult=0.1, clip=0.1)  # docs/method.md §2: recommended for R101
SCHED_1X = dict(max_iter=90000, steps=(60000, 82500))
SCHED_3X = dict(max_iter=270000, steps=(210000, 250000))
COCO = {
    "queryinst_R50_FPN_1x_coco.yaml":
        dict(depth=50, queries=100, mask=True, sizes=(800,), crop=False, **SCHED_1X, **OFFICIAL),
    "queryinst_R50_FPN_3x_ms_coco.yaml":
        dict(depth=50, queries=100, mask=True, sizes=MULTI_SCALE, crop=False, **SCHED_3X,
             **OFFICIAL),
    "queryinst_R50_FPN_3x_ms_crop_300q_coco.yaml":
        dict(depth=50, queries=300, mask=True, sizes=MULTI_SCALE, crop=True, **SCHED_3X,
             **OFFICIAL),
    "queryinst_R101_FPN_3x_ms_coco.yaml":
        dict(depth=101, queries=100, mask=True, sizes=MULTI_SCALE, crop=False, **SCHED_3X,
             **MMDET),
    "queryinst_R101_FPN_3x_ms_crop_300q_coco.yaml":
        dict(depth=101, queries=300, mask=True, sizes=MULTI_SCALE, crop=True, **SCHED_3X,
             **MMDET),
    "queryinst_MNV2_FPN_1x_coco.yaml":  # depth None: the MobileNetV2 backbone
        dict(depth=None, queries=100, mask=True, sizes=(800,), crop=False, **SCHED_1X,
             **OFFICIAL),
    "sparse_rcnn_R50_FPN_1x_coco.yaml":
        dict(depth=50, queries=100, mask=False, sizes=(800,), crop=False, **SCHED_1X,
             **OFFICIAL),
}
# 17 more res4 bottlenecks in R101: 1x1 1024->256, 3x3 256->256, 1x1 256->1024, no bias
R101_EXTRA_PARAMS = 17 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024)


def _load(path, opts=()):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config_file(cfg, path)  # yaml.safe_load only, as every entry point reads configs
    cfg.merge_from_list(list(opts))
    return cfg


def _base_chain(path):
    """The files a yaml inherits from, nearest first, following ``_BASE_``."""
    chain = []
    while True:
        with open(path) as f:
            base = (yaml.safe_load(f) or {}).get("_BASE_")
        if base is None:
            return chain
        path = os.path.normpath(os.path.join(os.path.dirname(path), base))
        assert os.path.isfile(path), f"{path}: _BASE_ file missing"
        assert path not in chain, f"{path}: _BASE_ cycle"
        chain.append(path)


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_coco_configs_exist():
    assert set(COCO) <= {os.path.basename(p) for p in ALL_YAMLS}


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_every_config_loads_and_inherits_base(path):
    cfg = _load(path)
    if path != BASE:
        assert _base_chain(path)[-1] == BASE  # every variant ends at Base-QueryInst.yaml
    # inherited, not restated; the video configs set the video meta-architecture
    video = "youtube_vis" in path or os.path.basename(path).startswith("queryinst_vis_")
    if os.path.basename(path).startswith("mask_rcnn_"):  # the peer detector (compare_real_video)
        assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert (cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg.MODEL.ROI_HEADS.NAME) == (
            "RPN", "StandardROIHeads")
    else:
        assert cfg.MODEL.META_ARCHITECTURE == ("QueryInstVIS" if video else "QueryInst")
        assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "LearnableProposals"
        assert cfg.MODEL.ROI_HEADS.NAME == "QueryInstROIHeads"
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False


@pytest.mark.parametrize("name", sorted(COCO))
def test_coco_variant_sets_only_what_differs(name):
    """Each key a variant file sets changes the value its base gives (no restated keys)."""
    path = os.path.join(CONFIGS, name)
    with open(path) as f:
        own = _flatten({k: v for k, v in yaml.safe_load(f).items() if k != "_BASE_"})
    base = _load(_base_chain(path)[0])
    variant = _load(path)
    for key in own:
        node_base, node_variant = base, variant
        for part in key.split("."):
            node_base, node_variant = node_base[part], node_variant[part]
        assert node_variant != node_base, f"{name}: {key} restates its base's value"


@pytest.mark.parametrize("name", sorted(COCO))
def test_coco_variant_values(name):
    e = COCO[name]
    cfg = _load(os.path.join(CONFIGS, name))
    q = cfg.MODEL.QUERYINST
    if e["depth"] is None:
        assert cfg.MODEL.BACKBONE.NAME == "build_mobilenetv2_fpn_p2_p5_backbone"
        assert cfg.MODEL.WEIGHTS == "queryinst://ImageNetPretrained/MobileNetV2"
        assert cfg.MODEL.FPN.IN_FEATURES == cfg.MODEL.MOBILENET.OUT_FEATURES
    else:
        assert cfg.MODEL.RESNETS.DEPTH == e["depth"]
    assert q.NUM_PROPOSALS == q.TEST_TOPK == cfg.TEST.DETECTIONS_PER_IMAGE == e["queries"]
    assert cfg.MODEL.MASK_ON is e["mask"]
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == e["sizes"]
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.INPUT.CROP_POLICY.ENABLED is e["crop"] and cfg.INPUT.CROP.ENABLED is False
    assert tuple(cfg.INPUT.CROP_POLICY.PRE_RESIZE) == (400, 500, 600)
    assert tuple(cfg.INPUT.CROP_POLICY.SIZE) == (384, 600)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (e["max_iter"], e["steps"])
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.OPTIMIZER == "ADAMW"
    assert cfg.SOLVER.BASE_LR == pytest.approx(e["lr"])
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == pytest.approx(e["backbone_mult"])
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == pytest.approx(e["clip"])
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and q.NUM_CLASSES == 80


def test_wrong_key_raises_key_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{BASE}"\nMODEL:\n  QUERYINST:\n    NUM_PROPOSAL: 300\n')
    with pytest.raises(KeyError, match="MODEL.QUERYINST.NUM_PROPOSAL"):
        _load(str(bad))
    # yacs's merge_from_list reports the same with an AssertionError
    with pytest.raises((KeyError, AssertionError),
                       match="Non-existent key: INPUT.CROP_POLICY.ENABLE"):
        _load(BASE, ["INPUT.CROP_POLICY.ENABLE", "True"])
    missing = tmp_path / "orphan.yaml"
    missing.write_text('_BASE_: "no-such-base.yaml"\n')
    with pytest.raises((FileNotFoundError, OSError)):
        _load(str(missing))


def get_cfg_with_queryinst():
    """Detectron2's defaults plus QueryInst's keys."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    return cfg


def test_misspelled_key_gets_a_hint(tmp_path):
    """Issue 10 item 13: yacs says only "Non-existent config key"; the entry points' merge
    (queryinst.config_loading.merge_config) names the source and the closest key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{BASE}"\nMODEL:\n  QUERYINST:\n    NUM_PROPOSAL: 300\n')
    with pytest.raises(KeyError) as info:
        merge_config(get_cfg_with_queryinst(), str(bad))
    assert info.value.args[0] == (
        f"Non-existent config key: MODEL.QUERYINST.NUM_PROPOSAL (merging {bad}); "
        "did you mean MODEL.QUERYINST.NUM_PROPOSALS?")
    # The command-line path, through train_net.py's setup (yacs raises AssertionError there).
    args = default_argument_parser().parse_args(
        ["--config-file", BASE, "MODEL.QUERYINST.NUM_PROPOSAL", "300"])
    with pytest.raises(AssertionError, match=re.escape(
            "MODEL.QUERYINST.NUM_PROPOSAL (merging the command-line options); "
            "did you mean MODEL.QUERYINST.NUM_PROPOSALS?")):
        train_net.setup(args)
    # A key in the wrong section, and one with nothing close (no guess).
    with pytest.raises(AssertionError, match="did you mean MODEL.QUERYINST.NUM_PROPOSALS"):
        merge_config(get_cfg_with_queryinst(), BASE, ["MODEL.NUM_PROPOSALS", "300"])
    with pytest.raises(AssertionError, match=r"NO_SUCH\.KEY \(merging the command-line "
                                             r"options\)$"):
        merge_config(get_cfg_with_queryinst(), BASE, ["NO_SUCH.KEY", "1"])


def test_device_defaults_to_cpu_without_cuda(tmp_path, monkeypatch):
    """Issue 10 item 10: a COCO config (no MODEL.DEVICE) on a machine without CUDA gave
    "Found no NVIDIA driver" in train_net.py; now CPU, with the reason in the log."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    coco = os.path.join(CONFIGS, "queryinst_R50_FPN_1x_coco.yaml")
    args = default_argument_parser().parse_args(
        ["--config-file", coco, "OUTPUT_DIR", str(tmp_path)])
    assert train_net.setup(args).MODEL.DEVICE == "cpu"
    with open(tmp_path / "log.txt") as f:
        assert "MODEL.DEVICE cpu: CUDA is not available (torch.cuda.is_available() is False)" \
            in f.read()
    # An explicit MODEL.DEVICE (options or yaml) is kept.
    cfg = merge_config(get_cfg_with_queryinst(), coco, ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == "cuda"
    assert device_note("cuda") == ("MODEL.DEVICE cuda: set in the config, but CUDA is not "
                                   "available (torch.cuda.is_available() is False): set "
                                   "MODEL.DEVICE cpu")
    bundled = os.path.join(CONFIGS, "bundled", "queryinst_R50_FPN_nuclei.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert merge_config(get_cfg_with_queryinst(), bundled).MODEL.DEVICE == "cpu"  # its yaml
    assert merge_config(get_cfg_with_queryinst(), coco).MODEL.DEVICE == "cuda"
    assert device_note("cpu") == "MODEL.DEVICE cpu: set in the config (the default here " \
                                 "would be cuda)"


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _build(name, opts=()):
    cfg = _load(os.path.join(CONFIGS, name), ["MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg)


def test_build_r50_1x_full_size(one_torch_thread):
    """The whole model as configured: ~173 M parameters for R50, 100 queries (docs/method.md §1)."""
    model = _build("queryinst_R50_FPN_1x_coco.yaml")
    assert len(model.roi_heads.box_heads) == len(model.roi_heads.mask_heads) == 6
    assert model.proposal_generator.init_proposal_boxes.weight.shape == (100, 4)
    assert _params(model) == pytest.approx(173e6, rel=0.005)


def test_build_coco_variants(one_torch_thread):
    """Every COCO variant builds; one stage each (``NUM_STAGES 1``) to stay fast on a CPU."""
    opts = ["MODEL.QUERYINST.NUM_STAGES", "1"]
    models = {name: _build(name, opts) for name in COCO}
    r50 = models["queryinst_R50_FPN_3x_ms_coco.yaml"]
    for name, model in models.items():
        e = COCO[name]
        assert model.proposal_generator.init_proposal_boxes.weight.shape == (e["queries"], 4)
        assert model.proposal_generator.init_proposal_features.weight.shape == (e["queries"], 256)
        assert model.roi_heads.test_topk == e["queries"]
        assert model.roi_heads.mask_on is e["mask"]
        if e["depth"] is None:  # FrozenBN everywhere: only the convs have parameters
            convs = [m for m in mobilenet_v2().features[:18].modules()
                     if isinstance(m, torch.nn.Conv2d)]
            fpn = (24 + 32 + 96 + 320 + 4) * 256 + 4 * (256 * 256 * 9 + 256)
            assert _params(model.backbone) == sum(map(_params, convs)) + fpn
        else:
            backbone_extra = _params(model.backbone) - _params(r50.backbone)
            assert backbone_extra == (R101_EXTRA_PARAMS if e["depth"] == 101 else 0), name
        # the queries only add embeddings: (N, 4) boxes and (N, 256) features
        head_extra = _params(model) - _params(model.backbone) - (
            _params(r50) - _params(r50.backbone))
        mask_params = 0 if e["mask"] else _params(r50.roi_heads.mask_heads)
        assert head_extra == (e["queries"] - 100) * (4 + 256) - mask_params, name


YTVIS = {  # name -> (depth, train set, test set)
    "queryinst_vis_R50_FPN_ytvis2019.yaml": (50, "ytvis_2019_train", "ytvis_2019_val"),
    "queryinst_vis_R101_FPN_ytvis2019.yaml": (101, "ytvis_2019_train", "ytvis_2019_val"),
    "queryinst_vis_R50_FPN_ytvis2021.yaml": (50, "ytvis_2021_train", "ytvis_2021_val"),
    "queryinst_vis_R101_FPN_ytvis2021.yaml": (101, "ytvis_2021_train", "ytvis_2021_val"),
}


@pytest.mark.parametrize("name", sorted(YTVIS))
def test_youtube_vis_configs(name, one_torch_thread):
    """The paper's VIS setting (docs/method.md §6): 40 classes, frames 360/640, RLE masks as
    bitmasks, the official COCO weights of the same depth, the VIS data, loader and
    evaluator; the model builds with a track head and the embedding tracker."""
    from queryinst.video import QueryInstVIS, YTVISEvaluator, check_video_model

    depth, train, test = YTVIS[name]
    cfg = _load(os.path.join(CONFIGS, "youtube_vis", name))
    assert cfg.MODEL.QUERYINST.NUM_CLASSES == 40 and cfg.MODEL.RESNETS.DEPTH == depth
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN) == ((360,), 640)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (360, 640)
    assert cfg.INPUT.MASK_FORMAT == "bitmask"
    assert f"queryinst_r{depth}_fpn_mstrain_480-800_3x_coco" in cfg.MODEL.WEIGHTS
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)) == ((train,), (test,))
    check_video_model(cfg)  # video data with the video model: no error
    evaluator = train_net.Trainer.build_evaluator(cfg, test, output_folder="unused")
    assert isinstance(evaluator, YTVISEvaluator)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, QueryInstVIS) and model.track_head is not None
    assert type(model.tracker).__name__ == "EmbeddingTracker"


def test_video_data_with_an_image_model_is_refused():
    from queryinst.video import check_video_model

    cfg = _load(BASE, ["DATASETS.TEST", "('nuclei_dsb_video_val',)"])
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE QueryInstVIS"):
        check_video_model(cfg)
    cfg = _load(os.path.join(CONFIGS, "youtube_vis", "queryinst_vis_R50_FPN_ytvis2019.yaml"),
                ["DATASETS.TRAIN", "('nuclei_dsb_train',)"])
    with pytest.raises(ValueError, match="trains on videos"):
        check_video_model(cfg)


CITYSCAPES = {"queryinst_R50_FPN_cityscapes.yaml": 50, "queryinst_R101_FPN_cityscapes.yaml": 101}


@pytest.mark.parametrize("name", sorted(CITYSCAPES))
def test_cityscapes_configs(name, one_torch_thread, monkeypatch):
    """Cityscapes (docs/method.md §7): Detectron2's 8 thing classes and built-in splits, Mask
    R-CNN's scales, the official COCO weights of the same depth with each class's rows taken
    from its COCO counterpart, and both Cityscapes' and COCO's AP as evaluators."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import DatasetEvaluators

    from queryinst.checkpoint.class_init import class_init_from_config
    from queryinst.evaluation import build as evaluation

    depth = CITYSCAPES[name]
    cfg = _load(os.path.join(CONFIGS, "cityscapes", name))
    train, test = "cityscapes_fine_instance_seg_train", "cityscapes_fine_instance_seg_val"
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)) == ((train,), (test,))
    classes = MetadataCatalog.get(train).thing_classes
    assert cfg.MODEL.QUERYINST.NUM_CLASSES == len(classes) == 8
    assert cfg.MODEL.RESNETS.DEPTH == depth
    assert f"queryinst_r{depth}_fpn_mstrain_480-800_3x_coco" in cfg.MODEL.WEIGHTS
    assert min(cfg.INPUT.MIN_SIZE_TRAIN) == 800 and max(cfg.INPUT.MIN_SIZE_TRAIN) == 1024
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST) == (
        1024, 2048, 2048)
    # Cityscapes order (person, rider, car, truck, bus, train, motorcycle, bicycle) -> COCO
    # indices written out by hand from COCO's list (person 0, bicycle 1, car 2, motorcycle 3,
    # airplane 4, bus 5, train 6, truck 7); rider from person.
    assert class_init_from_config(cfg).rows == (0, 0, 2, 7, 5, 6, 3, 1)
    # COCOEvaluator reads the dataset when built (no Cityscapes data here): a stand-in
    class COCOStandIn:
        def __init__(self, dataset_name, **kwargs):
            self.dataset_name, self.tasks = dataset_name, kwargs["tasks"]

    monkeypatch.setattr(evaluation, "COCOEvaluator", COCOStandIn)
    evaluator = train_net.Trainer.build_evaluator(cfg, test, output_folder="unused")
    assert isinstance(evaluator, DatasetEvaluators)
    cityscapes, coco = evaluator._evaluators
    assert isinstance(cityscapes, evaluation.CityscapesAPEvaluator)
    assert (coco.dataset_name, coco.tasks) == (test, ("bbox", "segm"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert model.roi_heads.box_heads[0].cls_score.out_features == 8
