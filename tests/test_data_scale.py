"""COCO-scale data path (docs/benchmark.md "COCO-scale data"): the synthetic COCO-size json,
the dataset read once per process, no image headers read unless asked, and
tools/data_scale_benchmark.py on a 5,000-image version against Detectron2's Mask R-CNN.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import load_script
from queryinst.data import DatasetFormatError, register_coco_instances_checked
from queryinst.data.checks import check_dataset, keep_for_next_get

gen = load_script("tools/make_coco_scale_json.py", "make_coco_scale_json")
bench = load_script("tools/data_scale_benchmark.py", "data_scale_benchmark")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

IMAGES = 5000


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco5k")
    json_path = gen.write(str(out), IMAGES, round(gen.COCO_INSTANCES * IMAGES / gen.COCO_IMAGES))
    with open(json_path) as f:
        return json_path, str(out / "images"), json.load(f)


def test_generator_draws_coco_like_counts_and_sizes(small_coco):
    _, image_root, data = small_coco
    assert len(data["images"]) == IMAGES
    assert len(data["annotations"]) == 36352  # 860,001 x 5,000 / 118,287, rounded
    # The full size: the per-image counts sum to COCO's total exactly.
    full = gen._counts(np.random.default_rng(0), gen.COCO_IMAGES, gen.COCO_INSTANCES)
    assert full.sum() == gen.COCO_INSTANCES and full.max() <= 93
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=IMAGES + 1)[1:]
    assert 0.002 < (per_image == 0).mean() < 0.05  # COCO: ~1 % of the images empty
    longer = np.array([max(im["width"], im["height"]) for im in data["images"]])
    assert longer.max() == 640 and 0.95 < (longer == 640).mean() < 0.99
    vertices = [len(p) // 2 for a in data["annotations"] for p in a["segmentation"]]
    assert min(vertices) >= 3 and 13 <= np.median(vertices) <= 19
    assert {c["id"] for c in data["categories"]} == set(range(1, 81))
    # One shared file per image size, of that size.
    from PIL import Image
    names = {im["file_name"]: (im["width"], im["height"]) for im in data["images"]}
    assert len(os.listdir(image_root)) == len(names) < IMAGES / 4
    name, size = next(iter(names.items()))
    assert Image.open(os.path.join(image_root, name)).size == size


def test_checked_training_set_is_read_once(small_coco):
    """check_dataset on DATASETS.TRAIN hands its dicts to the loader's DatasetCatalog.get;
    the get after that loads again."""
    json_path, image_root, _ = small_coco
    calls = []
    DatasetCatalog.register("scale_once", lambda: calls.append(1) or [{"annotations": []}])
    MetadataCatalog.get("scale_once").set(thing_classes=["a"])
    try:
        from test_model import small_cfg
        cfg = small_cfg(num_classes=1)
        check_dataset(cfg, "scale_once", key="DATASETS.TRAIN")
        first = DatasetCatalog.get("scale_once")
        assert len(calls) == 1
        assert DatasetCatalog.get("scale_once") is not first and len(calls) == 2
        keep_for_next_get("scale_once", first)
        assert DatasetCatalog.get("scale_once") is first and len(calls) == 2
    finally:
        DatasetCatalog.remove("scale_once")
        MetadataCatalog.remove("scale_once")


def test_image_headers_are_read_only_when_asked(tmp_path):
    """A file that exists but is no image: loading passes without verify_images (no header
    read), and names the file with it (train_net.py --verify-images)."""
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
            "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    for name, verify in (("scale_noverify", False), ("scale_verify", True)):
        register_coco_instances_checked(name, {}, str(tmp_path / "ann.json"), str(tmp_path),
                                        verify_images=verify)
    try:
        assert len(DatasetCatalog.get("scale_noverify")) == 1
        with pytest.raises(DatasetFormatError, match=r"a\.jpg cannot be read by PIL"):
            DatasetCatalog.get("scale_verify")
    finally:
        for name in ("scale_noverify", "scale_verify"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.mark.slow
def test_data_path_benchmark_on_5000_images(small_coco):
    """tools/data_scale_benchmark.py: train_net.py and Detectron2's Mask R-CNN each reach
    their first batch reading the json once, with 4 workers whose unique memory is about
    Detectron2's (the dicts are serialised once and shared), and a main process whose
    memory besides the model parameters is within 1.25x of Detectron2's."""
    json_path, image_root, _ = small_coco
    res = bench.run(bench.RUNS, json_path, image_root, workers=4, batch=8, timeout=600)
    for run in bench.RUNS:
        assert res[run]["dataset_loads"] == 1, run
        assert len(res[run]["worker_uss_mb"]) == 4, run
        assert 0 < res[run]["seconds"] < 600
    assert res["ratio"]["worker_uss"] <= 1.25
    assert res["ratio"]["main_peak_rss_besides_parameters"] <= 1.25
