"""The Cityscapes sample (labelme's street frames in Cityscapes' layout), read by Detectron2's own
Cityscapes loader and evaluator, and the checks that name what is missing.

Truths used: labelme's JSON and JPEG frames read straight from the sdist in the package cache
(not through the converter under test); the label PNGs that cityscapesscripts drew; Detectron2's
Cityscapes class order. The sample is built once per module into a temporary folder.
"""
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import builtin as d2_builtin
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.cityscapes import load_cityscapes_instances
from detectron2.structures import Instances
import torch
from PIL import Image

from queryinst import add_queryinst_config
from queryinst.data import (
    DatasetFormatError,
    MissingPackageError,
    check_cityscapes_dataset,
    check_dataset,
    download_package,
    write_cityscapes_sample,
)
from queryinst.data import bundled_sources as src
from queryinst.evaluation import CityscapesAPEvaluator
from queryinst.video.data import builtin as video_builtin

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

LABELME_BASE = "labelme-6.3.1/examples/video_annotation/data_annotated"
SPLITS = {"train": (100, 101, 102), "val": (103, 104)}
THING_CLASSES = _get_builtin_metadata("cityscapes")["thing_classes"]  # Detectron2's order
CAR, TRUCK = 26, 27  # cityscapesscripts' label ids (helpers/labels.py)


def _stem(frame):
    return f"labelme_000000_{frame:06d}"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes_sample"))
    return root, write_cityscapes_sample(root)


@pytest.fixture(scope="module")
def labelme():
    """frame -> (labelme json, RGB array), read from the sdist with tarfile."""
    archive = download_package(src.LABELME, sdist=True)
    out = {}
    with tarfile.open(archive) as tf:
        for frame in range(100, 105):
            member = f"{LABELME_BASE}/{frame:08d}"
            annotation = json.load(tf.extractfile(member + ".json"))
            image = np.asarray(Image.open(io.BytesIO(tf.extractfile(member + ".jpg").read())))
            out[frame] = annotation, image
    return out


def _paths(root, split, frame):
    city = os.path.join(root, "cityscapes", "{}", split, "labelme")
    stem = _stem(frame)
    return {"image": os.path.join(city.format("leftImg8bit"), stem + "_leftImg8bit.png"),
            **{key: os.path.join(city.format("gtFine"), f"{stem}_gtFine_{key}")
               for key in ("instanceIds.png", "labelIds.png", "polygons.json")}}


def _split_dirs(root, split):
    return (os.path.join(root, "cityscapes", "leftImg8bit", split),
            os.path.join(root, "cityscapes", "gtFine", split))


def _polygon_mask(polygons, height, width):
    """(H, W) bool from COCO-style polygons (lists of x, y), pycocotools' rasterisation."""
    rles = mask_util.frPyObjects([[float(c) for c in p] for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def _gt_instances(root, split, frame):
    """instance id -> (H, W) bool mask, from the instanceIds PNG that cityscapesscripts drew."""
    ids = np.asarray(Image.open(_paths(root, split, frame)["instanceIds.png"]))
    return {int(i): ids == i for i in np.unique(ids) if i >= 1000}


# ---- the files -------------------------------------------------------------------------------


def test_layout_counts_and_rebuild_only_checks(sample, monkeypatch):
    root, result = sample
    assert result == {"train": 3, "val": 2, "root": root}
    assert sorted(os.listdir(root)) == ["cityscapes"]  # no temporary folder left
    for split, frames in SPLITS.items():
        for frame in frames:
            for path in _paths(root, split, frame).values():
                assert os.path.isfile(path), path
    mtimes = {p: os.stat(p).st_mtime_ns for p in _paths(root, "val", 103).values()}

    def no_fetch():
        raise AssertionError("an existing sample was converted again")

    monkeypatch.setattr(video_builtin, "fetch_labelme_video_source", no_fetch)
    assert write_cityscapes_sample(root) == result
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes


def test_incomplete_sample_is_reported_not_trusted(sample, tmp_path):
    root, _ = sample
    shutil.copytree(os.path.join(root, "cityscapes"), tmp_path / "cityscapes")
    missing = _paths(str(tmp_path), "train", 101)["labelIds.png"]
    os.remove(missing)
    with pytest.raises(DatasetFormatError, match="tools/prepare_datasets.py") as info:
        write_cityscapes_sample(str(tmp_path))
    assert missing in str(info.value)


def test_images_are_the_labelme_frames(sample, labelme):
    root, _ = sample
    for split, frames in SPLITS.items():
        for frame in frames:
            image = Image.open(_paths(root, split, frame)["image"])
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (1000, 563))
            np.testing.assert_array_equal(np.asarray(image), labelme[frame][1])


def test_polygons_json_is_labelme_rounded_to_pixels(sample, labelme):
    root, _ = sample
    names = {"track": "truck", "car": "car"}
    for split, frames in SPLITS.items():
        for frame in frames:
            with open(_paths(root, split, frame)["polygons.json"]) as f:
                written = json.load(f)
            source = labelme[frame][0]
            assert (written["imgHeight"], written["imgWidth"]) == (563, 1000)
            assert [o["label"] for o in written["objects"]] == [
                names[s["label"]] for s in source["shapes"]]
            assert set(written["objects"][0]) == {"label", "polygon"}
            for obj, shape in zip(written["objects"], source["shapes"]):
                assert len(obj["polygon"]) == len(shape["points"])
                for (x, y), (sx, sy) in zip(obj["polygon"], shape["points"]):
                    assert isinstance(x, int) and isinstance(y, int)
                    assert 0 <= x <= 999 and 0 <= y <= 562
                    # within half a pixel of labelme's point, once clipped into the image
                    assert abs(x - min(max(sx, 0), 999)) <= 0.5
                    assert abs(y - min(max(sy, 0), 562)) <= 0.5


def test_label_pngs_drawn_by_cityscapesscripts_agree_with_labelme(sample, labelme):
    root, _ = sample
    for split, frames in SPLITS.items():
        for frame in frames:
            paths = _paths(root, split, frame)
            ids = np.asarray(Image.open(paths["instanceIds.png"]))
            label_ids = np.asarray(Image.open(paths["labelIds.png"]))
            assert sorted(np.unique(ids)) == [0, CAR * 1000, TRUCK * 1000, TRUCK * 1000 + 1]
            np.testing.assert_array_equal(np.where(ids >= 1000, ids // 1000, ids), label_ids)
            # instance k of a class = its k-th shape; compare with pycocotools' raster
            shapes = labelme[frame][0]["shapes"]
            expected = {TRUCK * 1000: shapes[0], TRUCK * 1000 + 1: shapes[1],
                        CAR * 1000: shapes[2]}
            for instance_id, shape in expected.items():
                mask = _polygon_mask([np.ravel(shape["points"])], 563, 1000)
                assert _iou(ids == instance_id, mask) > 0.9, (frame, instance_id)


# ---- Detectron2 reads it ---------------------------------------------------------------------


@pytest.mark.parametrize("from_json", [True, False], ids=["polygons_json", "instanceIds_png"])
def test_detectron2_loader_reads_the_sample(sample, from_json):
    """Both of Detectron2's readings (json polygons; instanceIds PNG -> contours): 3 instances
    per image (the car and the truck's load bed share an edge, which takes no instance away),
    classes in Detectron2's order, each mask on cityscapesscripts' raster (IoU > 0.9)."""
    root, _ = sample
    assert (THING_CLASSES.index("car"), THING_CLASSES.index("truck")) == (2, 3)
    for split, frames in SPLITS.items():
        dicts = load_cityscapes_instances(*_split_dirs(root, split), from_json=from_json,
                                          to_polygons=True)
        assert sorted(os.path.basename(d["file_name"]) for d in dicts) == [
            _stem(f) + "_leftImg8bit.png" for f in frames]
        for d in dicts:
            assert (d["height"], d["width"]) == (563, 1000)
            assert sorted(a["category_id"] for a in d["annotations"]) == [2, 3, 3]
            gt = _gt_instances(root, split, int(d["image_id"].split("_")[2]))
            matched = set()
            for ann in d["annotations"]:
                assert not ann["iscrowd"]
                mask = _polygon_mask(ann["segmentation"], 563, 1000)
                same_class = {i: m for i, m in gt.items()
                              if THING_CLASSES[ann["category_id"]] == ("car", "truck")[
                                  i // 1000 - CAR]}
                best = max(same_class, key=lambda i: _iou(mask, same_class[i]))
                assert _iou(mask, same_class[best]) > 0.9
                matched.add(best)
            assert matched == set(gt)


@pytest.fixture
def builtin_on_sample(sample):
    """Detectron2's own Cityscapes registrations, made with DETECTRON2_DATASETS=<sample>."""
    def register(root):
        for name in [n for n in DatasetCatalog.list() if n.startswith("cityscapes_fine_")]:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        d2_builtin.register_all_cityscapes(root)

    register(sample[0])
    yield sample[0]
    register(d2_builtin._root)


def test_detectron2_builtin_datasets_read_the_sample(builtin_on_sample):
    for name, images in (("cityscapes_fine_instance_seg_train", 3),
                         ("cityscapes_fine_instance_seg_val", 2)):
        metadata = MetadataCatalog.get(name)
        assert metadata.evaluator_type == "cityscapes_instance"
        assert metadata.thing_classes == THING_CLASSES
        check_cityscapes_dataset(name)  # passes
    dicts = DatasetCatalog.get("cityscapes_fine_instance_seg_val")
    assert (len(dicts), sum(len(d["annotations"]) for d in dicts)) == (2, 6)


# ---- Detectron2's evaluator ------------------------------------------------------------------


def _predictions(root, perfect):
    """Detectron2 inputs / outputs for the val images: the instanceIds PNG's instances as
    predictions (score 1), or none."""
    inputs, outputs = [], []
    for frame in SPLITS["val"]:
        gt = _gt_instances(root, "val", frame) if perfect else {}
        instances = Instances((563, 1000))
        instances.pred_masks = torch.as_tensor(
            np.stack(list(gt.values())) if gt else np.zeros((0, 563, 1000), bool))
        instances.pred_classes = torch.tensor(
            [THING_CLASSES.index(("car", "truck")[i // 1000 - CAR]) for i in gt],
            dtype=torch.int64)
        instances.scores = torch.ones(len(gt))
        inputs.append({"file_name": _paths(root, "val", frame)["image"]})
        outputs.append({"instances": instances})
    return inputs, outputs


@pytest.fixture
def eval_dataset(sample):
    name = "cityscapes_sample_test_val"
    MetadataCatalog.get(name).set(gt_dir=_split_dirs(sample[0], "val")[1],
                                  thing_classes=THING_CLASSES,
                                  evaluator_type="cityscapes_instance")
    yield name
    MetadataCatalog.remove(name)


def test_evaluator_perfect_predictions_score_100_and_none_0(sample, eval_dataset, tmp_path,
                                                            monkeypatch):
    """cityscapesscripts' AP (mean over overlaps 0.5:0.95 and over the classes present, car
    and truck here) is exactly 100 for the ground truth itself, whose scores are all 1: its
    step-wise precision-recall integral has precision 1 up to recall 1."""
    import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval

    monkeypatch.chdir(tmp_path)  # cityscapesscripts wrote "matches.json" into the cwd
    args_before = dict(vars(cs_eval.args))
    evaluator = CityscapesAPEvaluator(eval_dataset)
    results = {}
    for perfect in (True, False):
        evaluator.reset()
        evaluator.process(*_predictions(sample[0], perfect))
        results[perfect] = evaluator.evaluate()["cityscapes"]
    assert results[True] == {"AP": 100.0, "AP50": 100.0}
    assert results[False] == {"AP": 0.0, "AP50": 0.0}
    assert os.listdir(tmp_path) == []
    assert cs_eval.np is np  # the NumPy-2 patches are undone
    assert vars(cs_eval.args).keys() == args_before.keys()  # and Detectron2's settings undone
    assert all(getattr(cs_eval.args, key) is value for key, value in args_before.items())


# ---- errors that name what is missing --------------------------------------------------------


@pytest.fixture
def register_cityscapes(tmp_path):
    """register(image_dir, gt_dir) -> name of a Cityscapes instance dataset (metadata only,
    its loader fails: the checks must not load it)."""
    names = []

    def register(image_dir, gt_dir):
        name = f"cityscapes_check_test_{len(names)}"
        DatasetCatalog.register(name, lambda: pytest.fail("the dataset was loaded"))
        MetadataCatalog.get(name).set(image_dir=str(image_dir), gt_dir=str(gt_dir),
                                      evaluator_type="cityscapes_instance",
                                      thing_classes=THING_CLASSES)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_missing_cityscapes_folder_names_path_and_detectron2_datasets(tmp_path,
                                                                      register_cityscapes):
    image_dir = tmp_path / "cityscapes" / "leftImg8bit" / "train"
    name = register_cityscapes(image_dir, tmp_path / "cityscapes" / "gtFine" / "train")
    with pytest.raises(DatasetFormatError) as info:
        check_cityscapes_dataset(name)
    message = str(info.value)
    for text in (str(image_dir), name, "DETECTRON2_DATASETS", "cityscapes/",
                 "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
        assert text in message
    assert "\n" not in message


def test_split_without_images(tmp_path, register_cityscapes):
    image_dir = tmp_path / "leftImg8bit" / "val"
    (image_dir / "labelme").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="_leftImg8bit.png") as info:
        check_cityscapes_dataset(register_cityscapes(image_dir, tmp_path / "gtFine" / "val"))
    assert str(image_dir) in str(info.value)


def test_stray_file_in_city_folder(sample, tmp_path, register_cityscapes):
    image_dir = tmp_path / "val"
    shutil.copytree(_split_dirs(sample[0], "val")[0], image_dir)
    (image_dir / "labelme" / "notes.txt").write_text("x")
    with pytest.raises(DatasetFormatError, match="notes.txt"):
        check_cityscapes_dataset(register_cityscapes(image_dir, _split_dirs(sample[0], "val")[1]))


def test_images_without_gtfine_files(sample, tmp_path, register_cityscapes):
    image_dir, gt_dir = _split_dirs(sample[0], "val")
    shutil.copytree(gt_dir, tmp_path / "gtFine")
    missing = tmp_path / "gtFine" / "labelme" / (_stem(104) + "_gtFine_instanceIds.png")
    missing.unlink()
    with pytest.raises(DatasetFormatError) as info:
        check_cityscapes_dataset(register_cityscapes(image_dir, tmp_path / "gtFine"))
    assert "1 of 2 images" in str(info.value) and str(missing) in str(info.value)

    absent = tmp_path / "no_gtFine"  # a split whose gtFine folder was never unpacked
    with pytest.raises(DatasetFormatError) as info:
        check_cityscapes_dataset(register_cityscapes(image_dir, absent))
    message = str(info.value)
    assert "2 of 2 images" in message and "gtFine_trainvaltest.zip" in message
    assert str(absent / "labelme" / (_stem(103) + "_gtFine_instanceIds.png")) in message


def test_missing_cityscapesscripts_names_package_and_fix(sample, register_cityscapes,
                                                         monkeypatch):
    for module in [m for m in sys.modules if m.split(".")[0] == "cityscapesscripts"]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)  # as if not installed
    name = register_cityscapes(*_split_dirs(sample[0], "val"))
    with pytest.raises(MissingPackageError) as info:
        check_cityscapes_dataset(name)
    message = str(info.value)
    assert info.value.name == "cityscapesscripts"
    for text in ("cityscapesscripts", "pip install cityscapesscripts", "make setup", name):
        assert text in message


def test_not_a_cityscapes_dataset():
    with pytest.raises(ValueError, match="cityscapes_instance"):
        check_cityscapes_dataset("nuclei_dsb_val")


# ---- check_dataset: files checked, nothing loaded --------------------------------------------


def _cfg(num_classes):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.QUERYINST.NUM_CLASSES = num_classes
    return cfg


def test_check_dataset_does_not_load_cityscapes(sample, tmp_path, register_cityscapes,
                                                monkeypatch):
    def no_load(name):
        raise AssertionError(f"DatasetCatalog.get({name!r}) was called")

    monkeypatch.setattr(DatasetCatalog, "get", no_load)
    name = register_cityscapes(*_split_dirs(sample[0], "val"))
    check_dataset(_cfg(8), name)  # masks not loaded, 8 classes from the metadata: passes
    with pytest.raises(ValueError, match="has 8 classes"):
        check_dataset(_cfg(80), name, key="DATASETS.TEST")
    missing = register_cityscapes(tmp_path / "nowhere", tmp_path / "nowhere_gt")
    with pytest.raises(DatasetFormatError, match="nowhere"):
        check_dataset(_cfg(8), missing)


def test_rounding_rule_is_half_up():
    from queryinst.data.cityscapes import labelme_to_cityscapes_json

    shape = {"label": "car", "shape_type": "polygon",
             "points": [[0.5, 1.49], [2.5, -3.0], [1000.0, 562.6]]}
    out = labelme_to_cityscapes_json({"imageHeight": 563, "imageWidth": 1000,
                                      "shapes": [shape]})
    # halves up (not Python's round-half-even: round(0.5) == 0), then clipped into the image
    assert out["objects"][0]["polygon"] == [[1, 1], [3, 0], [999, 562]]


def test_evaluator_survives_a_class_whose_predictions_all_lie_on_void(sample, eval_dataset,
                                                                    tmp_path, monkeypatch):
    """cityscapesscripts 2.3.0 crashed (IndexError, mcordts/cityscapesScripts #89) when a
    class has ground truth and predictions but every prediction is set aside for lying on
    void pixels. Trucks predicted perfectly and one car predicted on the sky (void: the sample
    labels only its 3 objects) must give truck AP 100 and car AP 0: mean (100 + 0) / 2 = 50."""
    monkeypatch.chdir(tmp_path)
    inputs, outputs = _predictions(sample[0], perfect=True)
    for out in outputs:
        instances = out["instances"]
        trucks = instances.pred_classes == THING_CLASSES.index("truck")
        void = torch.zeros((1, 563, 1000), dtype=torch.bool)
        void[0, :60, :200] = True  # top-left corner: no object there in either frame
        assert not (void[0] & instances.pred_masks.any(0)).any()
        out["instances"] = Instances.cat([instances[trucks], Instances(
            (563, 1000), pred_masks=void, scores=torch.tensor([0.9]),
            pred_classes=torch.tensor([THING_CLASSES.index("car")]))])
    evaluator = CityscapesAPEvaluator(eval_dataset)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    assert evaluator.evaluate()["cityscapes"] == {"AP": 50.0, "AP50": 50.0}
