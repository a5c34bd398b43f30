"""No file the project reads runs code (issue 23): checkpoints, Detectron2 .pkl files, configs.

Crafted files carry a payload, an object whose ``__reduce__`` makes unpickling run
``os.system("touch MARKER")``: in ``meta``, in the weights, nested in lists and tuples; as a
zip and a legacy ``.pth``, as a ``.pkl``, with Detectron2's and with the official key names.
The truth is the marker file: it must never appear. Each file is refused with one ``ERROR:``
line naming it and what it refers to (``posix.system``: ``os.system`` on Linux), through the
loader in-process (every placement) and through ``demo/demo.py``, ``train_net.py --eval-only``,
``train_net.py --resume`` and ``tools/convert_mmdet_checkpoint.py`` (subprocesses, once per
file kind).

Legitimate files load with the same tensors: a Detectron2 model-zoo ``.pkl`` (numpy arrays,
``__author__``, ``matching_heuristics``), official mmdet 2.x files whose ``meta`` holds numpy
scalars and arrays, MMDetection 3.x files with a ``message_hub`` of mmengine objects (their
class is "installed" here as a fake module whose code creates the marker: it must not run),
and this project's own checkpoints with their RNG states.

Configs: a python tag, directly and in a ``_BASE_`` file, is one ``ERROR: <file>: line N:``
line (exit 1 in train_net.py, 2 in the demo) and runs nothing; the project's configs and
Detectron2's model-zoo configs still load (tests/test_configs.py loads every one of
``configs/`` with ``merge_config_file``).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import sys
import types

import matplotlib
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from queryinst import add_queryinst_config
from queryinst.checkpoint import (
    CheckpointFormatError,
    QueryInstCheckpointer,
    load_checkpoint_file,
    load_official_state_dict,
)
from queryinst.config_loading import ConfigFileError, merge_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUCLEI = os.path.join(REPO, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
# A small model (as tests/test_weights_errors.py): builds and loads in a second.
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.QUERYINST.HIDDEN_DIM", "64",
        "MODEL.QUERYINST.DIM_FEEDFORWARD", "128", "MODEL.QUERYINST.MASK_CONV_DIM", "32",
        "MODEL.QUERYINST.NUM_MASK_CONVS", "1", "MODEL.QUERYINST.NUM_PROPOSALS", "10",
        "MODEL.QUERYINST.TEST_TOPK", "10", "MODEL.QUERYINST.NUM_STAGES", "2",
        "MODEL.QUERYINST.NUM_CLASSES", "1", "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "INPUT.MIN_SIZE_TRAIN",
        "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "1",
        "DATALOADER.NUM_WORKERS", "0"]
REFUSED = "holds a reference to posix.system, which is not loaded: only tensors, arrays and " \
          "plain containers are"
OFFICIAL_KEY = "roi_head.bbox_head.0.fc_cls.weight"
D2_KEY = "roi_heads.box_heads.0.cls_score.weight"


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a malicious file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _small_cfg(*opts):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, NUCLEI, [*TINY, *opts])
    return cfg


# ------------------------------------------------------------------------ crafted files
FORMATS = ("zip", "legacy", "pkl")
PLACEMENTS = ("meta", "weights", "nested_meta", "nested_weights")


def crafted_file(folder, fmt, placement, official, marker):
    """A checkpoint with a payload; Detectron2's ``{"model": ...}`` or the official
    ``{"state_dict": ..., "meta": ...}`` layout; returns its path."""
    key, weights_key = (OFFICIAL_KEY, "state_dict") if official else (D2_KEY, "model")
    weights = {key: torch.arange(6.0).reshape(2, 3)}
    meta = {"epoch": 12, "mmdet_version": "2.25.0", "CLASSES": ("nucleus",)}
    payload = Payload(marker)
    if placement == "meta":
        meta["hook_msgs"] = payload
    elif placement == "weights":
        weights["evil"] = payload
    elif placement == "nested_meta":
        meta["history"] = [1, (2.0, [payload])]
    else:
        weights["evil"] = (0.5, [{"x": payload}])
    if fmt == "pkl":
        weights = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
    data = {weights_key: weights, "meta": meta}
    if not official:
        data["__author__"] = "someone"
    path = os.path.join(folder, f"{fmt}_{placement}_{'official' if official else 'd2'}"
                                f".{'pkl' if fmt == 'pkl' else 'pth'}")
    if fmt == "pkl":
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


@pytest.mark.parametrize("official", [False, True], ids=["d2_keys", "official_keys"])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_file_is_refused_without_running_it(tmp_path, fmt, placement, official):
    marker = tmp_path / "MARKER"
    path = crafted_file(tmp_path, fmt, placement, official, marker)
    with pytest.raises(CheckpointFormatError) as info:
        QueryInstCheckpointer(torch.nn.Linear(1, 1))._load_file(path)
    assert str(info.value) == f"{path}: {REFUSED}"
    if fmt != "pkl":  # also the reader of official files and the config they imply
        with pytest.raises(CheckpointFormatError, match=re.escape(REFUSED)):
            load_official_state_dict(path)
    assert not marker.exists()


def test_plain_pickle_named_pth_is_refused_by_what_it_names(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "renamed.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": Payload(marker)}}, f, protocol=4)  # STACK_GLOBAL
    with pytest.raises(CheckpointFormatError, match=re.escape(REFUSED)):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_non_tensor_object_is_named_not_called_corrupt(tmp_path):
    """A .pth holding an object of some class (here collections.UserDict) was called
    "truncated or corrupt"; it names the class now."""
    from collections import UserDict

    path = str(tmp_path / "object.pth")
    torch.save({"model": {D2_KEY: torch.zeros(1)}, "extra": UserDict(a=1)}, path)
    with pytest.raises(CheckpointFormatError) as info:
        load_checkpoint_file(path)
    assert str(info.value) == (f"{path}: holds a reference to collections.UserDict, which is "
                               "not loaded: only tensors, arrays and plain containers are")
    assert "corrupt" not in str(info.value) and "weights_only" not in str(info.value)


# ------------------------------------------------------------------------ entry points
def _run(argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error(proc, expected_start):
    """The process printed exactly one ``ERROR:`` line, starting as expected, no traceback."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(expected_start), errors[0]
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr


ENTRY_POINTS = ("demo", "eval_only", "resume", "converter")
KINDS = {"zip": ("zip", "weights", False), "legacy": ("legacy", "nested_weights", False),
         "pkl": ("pkl", "nested_meta", False), "official": ("legacy", "meta", True)}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_entry_point_refuses_crafted_file(tmp_path, kind, entry):
    marker = tmp_path / "MARKER"
    path = crafted_file(tmp_path, *KINDS[kind], marker)
    out = tmp_path / "out"
    out.mkdir()
    if entry == "demo":
        proc = _run(["demo/demo.py", "--config-file", NUCLEI, "--input", PHOTO, "--output",
                     str(out), "--opts", *TINY, "MODEL.WEIGHTS", path])
    elif entry == "eval_only":
        proc = _run(["train_net.py", "--config-file", NUCLEI, "--eval-only", *TINY,
                     "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(out)])
    elif entry == "resume":  # the file is the last checkpoint of OUTPUT_DIR
        (out / os.path.basename(path)).write_bytes(open(path, "rb").read())
        (out / "last_checkpoint").write_text(os.path.basename(path))
        path = str(out / os.path.basename(path))
        proc = _run(["train_net.py", "--config-file", NUCLEI, "--resume", *TINY,
                     "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(out)])
    else:
        proc = _run(["tools/convert_mmdet_checkpoint.py", "--input", path,
                     "--output", str(out / "converted.pth")])
        assert not (out / "converted.pth").exists()
    assert proc.returncode == 1
    _one_error(proc, f"ERROR: {path}: {REFUSED}")
    assert not marker.exists()


# ------------------------------------------------------------------------ legitimate files
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(_small_cfg()).eval()


def _assert_same(model, state):
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.as_tensor(state[key])), key


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_detectron2_model_zoo_pkl_loads_the_same_tensors(tiny_model, tmp_path, protocol):
    """As Detectron2's trained model-zoo files: {"model": numpy arrays, "__author__"}."""
    state = {k: v.numpy().copy() for k, v in tiny_model.state_dict().items()}
    path = str(tmp_path / "model_final_abc.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo",
                     "matching_heuristics": False}, f, protocol=protocol)
    torch.manual_seed(1)
    other = build_model(_small_cfg()).eval()
    QueryInstCheckpointer(other, strict=True).load(path)
    _assert_same(other, state)


def test_imagenet_pkl_with_matching_heuristics_fills_the_backbone(tiny_model, tmp_path):
    """As Detectron2's ImageNet R-50.pkl: backbone names without prefix, matching_heuristics."""
    prefix = "backbone.bottom_up."
    state = {k[len(prefix):]: v.numpy().copy() for k, v in tiny_model.state_dict().items()
             if k.startswith(prefix)}
    path = str(tmp_path / "R-18.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True},
                    f, protocol=2)
    torch.manual_seed(1)
    other = build_model(_small_cfg())
    QueryInstCheckpointer(other).load(path)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[prefix + key], torch.from_numpy(value)), key


@pytest.fixture(scope="module")
def official_sd():
    from test_checkpoint import SMALL_LAYOUT, make_state_dict, official_layout

    return make_state_dict(official_layout(**SMALL_LAYOUT))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_official_mmdet2_file_with_numpy_meta_loads(official_sd, tmp_path, legacy, caplog):
    meta = {"epoch": 12, "seed": np.int64(3), "best_score": np.float64(0.4),
            "mean": np.array([123.675, 116.28, 103.53]), "CLASSES": ("a", "b", "c")}
    path = str(tmp_path / "queryinst_r50_official.pth")
    torch.save({"meta": meta, "state_dict": official_sd}, path,
               _use_new_zipfile_serialization=not legacy)
    with caplog.at_level(logging.INFO):
        data = load_checkpoint_file(path)
    assert data["meta"]["seed"] == 3 and isinstance(data["meta"]["seed"], np.int64)
    np.testing.assert_array_equal(data["meta"]["mean"], meta["mean"])
    assert "dropped" not in caplog.text  # nothing to drop
    sd = load_official_state_dict(path)
    assert sd.keys() == official_sd.keys()
    assert all(torch.equal(sd[k], official_sd[k]) for k in sd)


@pytest.fixture
def fake_mmengine(tmp_path, monkeypatch):
    """mmengine's HistoryBuffer "installed" as a fake module whose code creates the marker
    when an object is unpickled or built: the loader must neither import nor call it."""
    marker = tmp_path / "MARKER"
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    modules = {n: types.ModuleType(n) for n in names}

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(3.0)
            self._count_history = np.ones(3)
            self.max_length = 1000000

        def __setstate__(self, state):
            marker.touch()

    HistoryBuffer.__module__ = names[-1]
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    modules[names[-1]].HistoryBuffer = HistoryBuffer
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return HistoryBuffer, marker


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mmdet3_file_with_message_hub_loads_and_drops_it_in_one_line(
        official_sd, fake_mmengine, tmp_path, legacy, caplog):
    HistoryBuffer, marker = fake_mmengine
    path = str(tmp_path / "queryinst_mmdet3.pth")
    torch.save({
        "meta": {"epoch": 12, "iter": 100, "seed": np.int64(0), "mmengine_version": "0.10.4",
                 "dataset_meta": {"classes": ("a", "b", "c")}, "hub": HistoryBuffer()},
        "state_dict": official_sd,
        "message_hub": {"log_scalars": {"train/loss": HistoryBuffer(),
                                        "train/lr": HistoryBuffer()},
                        "runtime_info": {"epoch": 12}, "resumed_keys": {"epoch": True}},
        "param_schedulers": [{"base_values": [0.0001], "last_step": 12}],
    }, path, _use_new_zipfile_serialization=not legacy)
    with caplog.at_level(logging.INFO, logger="queryinst"):
        data = load_checkpoint_file(path)
    assert not marker.exists()
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1
    for where in ("meta['hub']", "message_hub['log_scalars']['train/loss']",
                  "message_hub['log_scalars']['train/lr']"):
        assert where in lines[0]
    assert "mmengine.logging.history_buffer.HistoryBuffer" in lines[0]
    assert data["message_hub"]["runtime_info"] == {"epoch": 12}
    assert data["meta"]["dataset_meta"] == {"classes": ("a", "b", "c")}
    assert all(torch.equal(data["state_dict"][k], official_sd[k]) for k in official_sd)


def test_mmengine_object_in_the_weights_is_refused(fake_mmengine, tmp_path):
    HistoryBuffer, marker = fake_mmengine
    path = str(tmp_path / "bad.pth")
    torch.save({"state_dict": {OFFICIAL_KEY: torch.zeros(2), "x": HistoryBuffer()}}, path)
    with pytest.raises(CheckpointFormatError) as info:
        load_checkpoint_file(path)
    assert str(info.value) == (
        f"{path}: holds a reference to mmengine.logging.history_buffer.HistoryBuffer in its "
        "weights (state_dict['x']), which is not loaded: only tensors, arrays and plain "
        "containers are")
    assert not marker.exists()


def test_own_checkpoint_with_optimizer_scheduler_and_rng_loads(tiny_model, tmp_path):
    from detectron2.solver import build_lr_scheduler

    from queryinst.engine.solver import build_optimizer
    from queryinst.data.train_loader import rng_state

    cfg = _small_cfg()
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    sum(model(_one_batch(model)).values()).backward()  # a step: the optimizer has state
    optimizer.step()
    scheduler.step()
    checkpointer = QueryInstCheckpointer(model, str(tmp_path), optimizer=optimizer,
                                         scheduler=scheduler)
    rng = rng_state()
    checkpointer.save("model_0000001", iteration=1, rng=rng)
    data = load_checkpoint_file(str(tmp_path / "model_0000001.pth"))
    assert data["iteration"] == 1
    assert torch.equal(data["rng"]["torch"], rng["torch"]) and data["rng"]["random"] == rng["random"]
    assert data["scheduler"] == scheduler.state_dict()
    for key, value in optimizer.state_dict()["state"].items():
        assert torch.equal(data["optimizer"]["state"][key]["exp_avg"], value["exp_avg"])
    restored = build_model(cfg)
    extra = QueryInstCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    _assert_same(restored, model.state_dict())


def _one_batch(model):
    from detectron2.structures import BitMasks, Boxes, Instances

    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([0])
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 8:40, 8:40] = True
    inst.gt_masks = BitMasks(mask)
    model.train()
    return [{"image": torch.rand(3, 64, 64) * 255, "instances": inst, "height": 64,
             "width": 64}]


# ------------------------------------------------------------------------ configs
@pytest.fixture
def tagged_configs(tmp_path):
    """(direct, child): a yaml whose MODEL.WEIGHTS is a python tag that creates the marker,
    and a yaml that has it as _BASE_."""
    marker = tmp_path / "MARKER"
    direct = tmp_path / "evil.yaml"
    direct.write_text(f"_BASE_: {NUCLEI}\nMODEL:\n  WEIGHTS: !!python/object/apply:os.system "
                      f"[\"touch {marker}\"]\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: evil.yaml\nSOLVER:\n  BASE_LR: 0.001\n")
    return str(direct), str(child), marker


TAG = "python objects are not allowed in configs (!!python/object/apply:os.system"


def test_python_tag_in_a_config_or_its_base_is_refused(tagged_configs):
    direct, child, marker = tagged_configs
    for path in (direct, child):
        cfg = get_cfg()
        add_queryinst_config(cfg)
        with pytest.raises(ConfigFileError) as info:
            merge_config(cfg, path)
        assert str(info.value).startswith(f"{direct}: line 3: {TAG}")
    assert str(info.value).endswith(f", a _BASE_ of {child})")
    assert not marker.exists()


@pytest.mark.parametrize("entry,which,code", [("train_net", 0, 1), ("demo", 1, 2)])
def test_entry_point_refuses_python_tag_config(tagged_configs, tmp_path, entry, which, code):
    direct, child, marker = tagged_configs
    config = (direct, child)[which]
    if entry == "train_net":
        proc = _run(["train_net.py", "--config-file", config, "--eval-only",
                     "OUTPUT_DIR", str(tmp_path / "out")])
    else:
        proc = _run(["demo/demo.py", "--config-file", config, "--input", PHOTO,
                     "--output", str(tmp_path / "out")])
    assert proc.returncode == code
    _one_error(proc, f"ERROR: {direct}: line 3: {TAG}")
    assert not marker.exists()


@pytest.mark.parametrize("tool,option", [("tools/run_demo.py", "--config-file"),
                                         ("tools/benchmark.py", "--config-file"),
                                         ("tools/vis_report.py", "--vis-config")])
def test_tools_refuse_python_tag_config(tagged_configs, tool, option):
    """The tools that take a config stop on a python tag with one line, before training."""
    direct, _, marker = tagged_configs
    proc = _run([tool, option, direct])
    assert proc.returncode == 1
    _one_error(proc, f"ERROR: {direct}: line 3: {TAG}")
    assert not marker.exists()


def test_converter_refuses_python_tag_config(tagged_configs, official_sd, tmp_path, capsys):
    from conftest import load_script

    direct, _, marker = tagged_configs
    path = str(tmp_path / "official.pth")
    torch.save({"meta": {}, "state_dict": official_sd}, path)
    converter = load_script("tools/convert_mmdet_checkpoint.py", "convert_safe_loading")
    assert converter.main(["--input", path, "--output", str(tmp_path / "o.pth"),
                           "--config", direct]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ERROR: {direct}: line 3: {TAG}") and len(err.splitlines()) == 1
    assert not marker.exists()


def test_detectron2_model_zoo_configs_still_load(tmp_path):
    """Base-RetinaNet.yaml writes its anchor sizes as a python tag (an eval of a list
    comprehension): read as its value there, refused in any other file."""
    from detectron2 import model_zoo

    for name in ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
                 "COCO-Detection/retinanet_R_50_FPN_3x.yaml"):
        cfg = get_cfg()
        add_queryinst_config(cfg)
        merge_config(cfg, model_zoo.get_config_file(name))
        assert cfg.MODEL.RESNETS.DEPTH == 50
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES  # x, x * 2^(1/3), x * 2^(2/3) for 32 ... 512
    assert [s[0] for s in sizes] == [32, 64, 128, 256, 512]
    assert sizes[0][1] == pytest.approx(40.3174736) and sizes[4][2] == pytest.approx(812.7493)
    copy = tmp_path / "retina.yaml"
    with open(model_zoo.get_config_file("Base-RetinaNet.yaml")) as f:
        copy.write_text(f.read())
    with pytest.raises(ConfigFileError, match="python objects are not allowed"):
        merge_config(get_cfg(), str(copy))


# ------------------------------------------------------------------------ the code itself
FORBIDDEN = ("weights_only=False", "pickle.load", "pickle.loads", "yaml.unsafe_load",
             "yaml.load(", "merge_from_file(")
# The restricted loader may unpickle; config_loading calls merge_from_file with
# allow_unsafe=False (the one place that does).
ALLOWED_FILES = {"projects/QueryInst/queryinst/checkpoint/safe_load.py": ("pickle.load",),
                 "projects/QueryInst/queryinst/config_loading.py": ("merge_from_file(",),
                 # SerializedList unpickles only the bytes it pickled itself in this process
                 # (the training dicts, as Detectron2's DatasetFromList); no file is read.
                 "projects/QueryInst/queryinst/data/train_loader.py": ("pickle.load",
                                                                        "pickle.loads")}


def _project_python_files():
    roots = [os.path.join(REPO, "projects"), os.path.join(REPO, "tools"),
             os.path.join(REPO, "demo"), os.path.join(REPO, "train_net.py")]
    for root in roots:
        if root.endswith(".py"):
            yield root
            continue
        for folder, _, files in os.walk(root):
            yield from (os.path.join(folder, f) for f in files if f.endswith((".py", ".sh")))


def test_no_unsafe_loading_anywhere_in_the_project_code():
    found = []
    files = list(_project_python_files())
    assert len(files) > 40  # the walk found the package, the tools, the demo
    for path in files:
        rel = os.path.relpath(path, REPO)
        text = open(path, encoding="utf-8").read().replace(" ", "")
        for word in FORBIDDEN:
            if word.replace(" ", "") in text and word not in ALLOWED_FILES.get(rel, ()):
                found.append(f"{rel}: {word}")
    assert not found
    with open(os.path.join(REPO, "projects/QueryInst/queryinst/config_loading.py")) as f:
        assert "merge_from_file(config_file, allow_unsafe=False)" in f.read()
