"""YouTube-VIS loading, registration and the video dataset mapper (queryinst.video).

The data are written by hand in tmp_path: 2 videos of 3 frames whose objects are rectangles
and an L shape given as numpy arrays (the truth), stored as uncompressed RLE (run lengths
computed here, column-major as the format defines), compressed RLE (pycocotools' encoder)
and a polygon; some objects are absent (None) in some frames.
"""
import copy
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from conftest import uncompressed_rle
from queryinst import add_queryinst_config
from queryinst.data import DatasetFormatError, datasets_root
from queryinst.video import (
    PREDEFINED_YTVIS_SPLITS,
    YTVISDatasetMapper,
    build_vis_train_loader,
    load_ytvis_json,
    register_ytvis_instances,
    sample_frame_pair,
)
from queryinst.video.data import key_frame_records

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

H, W = 20, 24


def rect(x0, y0, x1, y1):
    """A (H, W) uint8 mask that is 1 on rows y0..y1-1, columns x0..x1-1."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def l_shape(x0, y0):
    """An asymmetric (H, W) mask: a vertical bar with a foot pointing right."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y0 + 8, x0:x0 + 2] = 1
    m[y0 + 6:y0 + 8, x0:x0 + 6] = 1
    return m


def compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


POLYGON = [[2.0, 12.0, 9.0, 12.0, 9.0, 18.0, 2.0, 18.0]]
# Truth: video id -> track id -> (json category id, per-frame mask array, polygon or None)
MASKS = {
    10: {100: (3, [rect(1, 1, 6, 5), rect(2, 1, 7, 5), None]),
         101: (7, [None, "polygon", "polygon"])},
    20: {200: (7, [l_shape(3, 2), l_shape(5, 3), l_shape(8, 4)])},
}


def write_ytvis(root, frame_mode="RGB"):
    """Frames under ``root/JPEGImages/<video>/`` and ``root/train.json``; returns the json path.

    Video 10: track 100 (category 3) uncompressed RLE in frame 0, compressed in frame 1,
    absent in frame 2; track 101 (category 7) absent in frame 0, a polygon in frames 1, 2.
    Video 20: track 200 (category 7), compressed RLE in every frame, bbox None in frame 2
    (the loader takes the mask's box).
    """
    rng = np.random.RandomState(0)
    videos = []
    for vid in (10, 20):
        names = [f"v{vid}/{t:05d}.png" for t in range(3)]
        for name in names:
            os.makedirs(os.path.join(root, "JPEGImages", f"v{vid}"), exist_ok=True)
            pixels = rng.randint(0, 256, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels, frame_mode).save(os.path.join(root, "JPEGImages", name))
        videos.append({"id": vid, "file_names": names, "height": H, "width": W, "length": 3})
    annotations = []
    for vid, tracks in MASKS.items():
        for tid, (cat, masks) in tracks.items():
            segms, boxes, areas = [], [], []
            for t, m in enumerate(masks):
                if m is None:
                    segms.append(None), boxes.append(None), areas.append(None)
                elif isinstance(m, str):
                    segms.append(POLYGON), boxes.append([2.0, 12.0, 7.0, 6.0]), areas.append(42)
                else:
                    segms.append(uncompressed_rle(m) if (tid, t) == (100, 0) else compressed_rle(m))
                    boxes.append(None if (tid, t) == (200, 2) else box_of(m))
                    areas.append(int(m.sum()))
            annotations.append({"id": tid, "video_id": vid, "category_id": cat, "iscrowd": 0,
                                "segmentations": segms, "bboxes": boxes, "areas": areas})
    data = {"videos": videos, "annotations": annotations,
            "categories": [{"id": 3, "name": "cat_a"}, {"id": 7, "name": "cat_b"}]}
    json_file = os.path.join(root, "train.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file


@pytest.fixture
def tiny(tmp_path):
    root = str(tmp_path)
    return write_ytvis(root), os.path.join(root, "JPEGImages")


# ---------------------------------------------------------------- loader


def test_loader_round_trip(tiny):
    json_file, image_root = tiny
    name = "test_ytvis_round_trip"
    MetadataCatalog.remove(name) if name in MetadataCatalog.list() else None
    dicts = load_ytvis_json(json_file, image_root, dataset_name=name)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["cat_a", "cat_b"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    contiguous = {3: 0, 7: 1}

    assert [d["video_id"] for d in dicts] == [10, 20]
    for d in dicts:
        vid = d["video_id"]
        assert (d["height"], d["width"], d["length"]) == (H, W, 3)
        assert d["file_names"] == [os.path.join(image_root, f"v{vid}/{t:05d}.png")
                                   for t in range(3)]
        assert len(d["annotations"]) == 3
        for t, objs in enumerate(d["annotations"]):
            present = {tid for tid, (_, ms) in MASKS[vid].items() if ms[t] is not None}
            assert {o["id"] for o in objs} == present
            for o in objs:
                cat, masks = MASKS[vid][o["id"]]
                assert o["category_id"] == contiguous[cat]
                assert o["iscrowd"] == 0 and o["bbox_mode"] == BoxMode.XYWH_ABS
                if isinstance(masks[t], str):
                    assert o["segmentation"] == POLYGON
                    assert o["bbox"] == [2.0, 12.0, 7.0, 6.0]
                    continue
                segm = o["segmentation"]
                assert isinstance(segm["counts"], str)  # compressed, also from uncompressed
                np.testing.assert_array_equal(mask_util.decode(segm), masks[t])
                assert o["bbox"] == box_of(masks[t])  # the json's, or the mask's (200, t=2)


def test_loader_without_dataset_name_keeps_json_ids(tiny):
    dicts = load_ytvis_json(*tiny)
    cats = {o["id"]: o["category_id"] for d in dicts for objs in d["annotations"] for o in objs}
    assert cats == {100: 3, 101: 7, 200: 7}


def _edit_json(json_file, edit):
    with open(json_file) as f:
        data = json.load(f)
    edit(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def _track(data, tid):
    return next(a for a in data["annotations"] if a["id"] == tid)


@pytest.mark.parametrize("case, words", [
    ("missing_frame", ["video id 20, frame 1", "v20/00001.png", "does not exist",
                       "put the frame there"]),
    ("short_segmentations", ["annotation id 101 (video id 10)", "'segmentations' has 2 entries",
                             "3 frames", "one entry per frame"]),
    ("long_bboxes", ["annotation id 200 (video id 20)", "'bboxes' has 4 entries"]),
    ("short_areas", ["annotation id 100 (video id 10)", "'areas' has 1 entries"]),
    ("unknown_category", ["annotation id 200 (video id 20)", "category_id 99",
                          "ids [3, 7]", "add the category"]),
    ("length_mismatch", ["video id 10", "'length' is 4", "3 entries"]),
    ("rle_size", ["annotation id 200 (video id 20), frame 0", "RLE size"]),
])
def test_loader_errors_name_file_and_id(tiny, case, words):
    json_file, image_root = tiny
    if case == "missing_frame":
        os.remove(os.path.join(image_root, "v20", "00001.png"))
    else:
        def edit(data):
            if case == "short_segmentations":
                _track(data, 101)["segmentations"].pop()
            elif case == "long_bboxes":
                _track(data, 200)["bboxes"].append(None)
            elif case == "short_areas":
                _track(data, 100)["areas"] = [1]
            elif case == "unknown_category":
                _track(data, 200)["category_id"] = 99
            elif case == "length_mismatch":
                data["videos"][0]["length"] = 4
            elif case == "rle_size":
                _track(data, 200)["segmentations"][0]["size"] = [W, H]
        _edit_json(json_file, edit)
    with pytest.raises(DatasetFormatError) as err:
        load_ytvis_json(json_file, image_root)
    message = str(err.value)
    assert message.startswith(json_file)
    for word in words:
        assert word in message, message


def test_loader_rejects_json_of_other_categories(tiny):
    """A json whose category ids / names disagree with a dataset's fixed metadata."""
    json_file, image_root = tiny
    name = "test_ytvis_fixed_meta"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(thing_classes=["cat_a", "other"],
                                  thing_dataset_id_to_contiguous_id={3: 0, 5: 1})
    with pytest.raises(DatasetFormatError, match=r"category id 7 \('cat_b'\) is not a category"):
        load_ytvis_json(json_file, image_root, dataset_name=name)


def test_registration_is_lazy(tmp_path):
    name = "test_ytvis_lazy"
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    root = str(tmp_path)
    json_file = os.path.join(root, "train.json")
    register_ytvis_instances(name, {}, json_file, os.path.join(root, "JPEGImages"))  # no files yet
    meta = MetadataCatalog.get(name)
    assert (meta.evaluator_type, meta.json_file) == ("ytvis", json_file)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        DatasetCatalog.get(name)
    write_ytvis(root)
    dicts = DatasetCatalog.get(name)
    assert [d["video_id"] for d in dicts] == [10, 20]
    assert meta.thing_classes == ["cat_a", "cat_b"]


def test_predefined_splits():
    root = datasets_root()
    expected = {
        "ytvis_2019_train": ("ytvis_2019/train.json", "ytvis_2019/train/JPEGImages"),
        "ytvis_2019_val": ("ytvis_2019/valid.json", "ytvis_2019/valid/JPEGImages"),
        "ytvis_2021_train": ("ytvis_2021/train.json", "ytvis_2021/train/JPEGImages"),
        "ytvis_2021_val": ("ytvis_2021/valid.json", "ytvis_2021/valid/JPEGImages"),
    }
    assert set(PREDEFINED_YTVIS_SPLITS) == set(expected)
    for name, (json_file, image_root) in expected.items():
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.json_file == os.path.join(root, json_file)
        assert meta.image_root == os.path.join(root, image_root)
        assert meta.evaluator_type == "ytvis"
        assert len(meta.thing_classes) == len(set(meta.thing_classes)) == 40
        assert meta.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 41)}
    # Spot checks against the official files' categories (id: name).
    c19 = MetadataCatalog.get("ytvis_2019_val").thing_classes
    c21 = MetadataCatalog.get("ytvis_2021_train").thing_classes
    assert (c19[0], c19[5], c19[38], c19[39]) == ("person", "sedan", "earless_seal",
                                                  "tennis_racket")
    assert (c21[0], c21[13], c21[25], c21[39]) == ("airplane", "flying_disc", "person", "zebra")
    assert c21 == sorted(c21)  # the 2021 ids are in alphabetical order


# ---------------------------------------------------------------- mapper


def test_sample_frame_pair_range_and_uniformity():
    for length, frame_range in [(10, 3), (10, 1), (4, 20), (2, 1)]:
        rng = np.random.RandomState(0)
        pairs = [sample_frame_pair(length, frame_range, rng) for _ in range(4000)]
        for k, r in pairs:
            assert k != r and abs(k - r) <= frame_range and 0 <= r < length
        allowed = {(k, r) for k in range(length) for r in range(length)
                   if k != r and abs(k - r) <= frame_range}
        assert set(pairs) == allowed  # every allowed pair occurs
        keys = np.bincount([k for k, _ in pairs], minlength=length)
        assert keys.min() > 0.7 * 4000 / length  # the key is uniform (loose bound)
    assert sample_frame_pair(1, 5) == (0, 0)  # one frame: key twice
    with pytest.raises(ValueError):
        sample_frame_pair(0, 5)


def test_sample_frame_pair_given_key():
    rng = np.random.RandomState(0)
    pairs = {sample_frame_pair(6, 2, rng, key=1) for _ in range(400)}
    assert pairs == {(1, 0), (1, 2), (1, 3)}  # the key kept, every reference in range drawn
    with pytest.raises(ValueError, match="key frame 6 outside 0..5"):
        sample_frame_pair(6, 2, key=6)


def test_key_frame_records_windows():
    video = {"video_id": 7, "height": H, "width": W, "length": 6,
             "file_names": [f"f{t}" for t in range(6)],
             "annotations": [[{"id": 100 + t}] for t in range(6)]}
    records = key_frame_records(video, 2)
    windows = [(0, 3), (0, 4), (0, 5), (1, 6), (2, 6), (3, 6)]  # frames t-2..t+2, clipped
    assert len(records) == 6
    for t, (record, (lo, hi)) in enumerate(zip(records, windows)):
        assert record["file_names"] == [f"f{i}" for i in range(lo, hi)]
        assert record["annotations"] == [[{"id": 100 + i}] for i in range(lo, hi)]
        assert record["frame_offset"] == lo and record["key_frame"] == t - lo
        assert (record["video_id"], record["height"], record["length"]) == (7, H, 6)
    assert [r["file_names"] for r in key_frame_records(video, 0)] == [[f"f{t}"] for t in range(6)]
    with pytest.raises(ValueError, match="SAMPLING_FRAME_RANGE"):
        key_frame_records(video, -1)


def _mapper(is_train, augmentations, mask_format="bitmask", frame_range=1, **kwargs):
    return YTVISDatasetMapper(is_train, augmentations=augmentations, image_format="RGB",
                              use_instance_mask=True, instance_mask_format=mask_format,
                              sampling_frame_range=frame_range, **kwargs)


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_mapper_pairs_ids_and_absent_objects(tiny, mask_format):
    json_file, image_root = tiny
    video = load_ytvis_json(json_file, image_root)[0]  # video 10
    if mask_format == "polygon":  # Detectron2's polygon format takes no RLE: keep track 101
        video = copy.deepcopy(video)
        video["annotations"] = [[o for o in objs if o["id"] == 101]
                                for objs in video["annotations"]]
    mapper = _mapper(True, [T.ResizeShortestEdge(40, 100), T.RandomFlip(0.5)], mask_format)
    seen = set()
    for seed in range(30):
        np.random.seed(seed)
        out = mapper(copy.deepcopy(video))
        k, r = out["frame_indices"]
        seen.add((k, r))
        assert k != r and abs(k - r) <= 1
        assert out["file_names"] == [video["file_names"][k], video["file_names"][r]]
        assert out["video_id"] == 10 and len(out["image"]) == len(out["instances"]) == 2
        for t, image, inst in zip((k, r), out["image"], out["instances"]):
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 40, 48)
            truth = sorted(o["id"] for o in video["annotations"][t])
            assert sorted(inst.gt_ids.tolist()) == truth  # absent objects are absent
            assert inst.gt_ids.dtype == torch.int64
            for tid, cls in zip(inst.gt_ids.tolist(), inst.gt_classes.tolist()):
                assert cls == {100: 3, 101: 7}[tid]  # identity keeps its category
    assert seen == {(0, 1), (1, 0), (1, 2), (2, 1)}


def test_mapper_on_key_frame_records(tiny):
    """A key-frame record keeps its key; frame indices and objects are the whole video's."""
    json_file, image_root = tiny
    video = load_ytvis_json(json_file, image_root)[0]  # video 10, 3 frames
    mapper = _mapper(True, [T.ResizeShortestEdge(40, 100)])
    for t, record in enumerate(key_frame_records(video, 1)):
        refs = set()
        for seed in range(12):
            np.random.seed(seed)
            out = mapper(copy.deepcopy(record))
            k, r = out["frame_indices"]
            assert k == t and abs(r - t) == 1 and out["length"] == 3
            refs.add(r)
            assert out["file_names"] == [video["file_names"][k], video["file_names"][r]]
            for i, inst in zip((k, r), out["instances"]):
                assert sorted(inst.gt_ids.tolist()) == sorted(o["id"]
                                                              for o in video["annotations"][i])
        assert refs == {r for r in (t - 1, t + 1) if 0 <= r < 3}


def test_mapper_without_reference_masks_changes_nothing_else(tiny):
    """reference_masks False: the reference frame has no gt_masks; images, the key frame's
    Instances and the reference frame's boxes, classes and ids are those of the mapper that
    keeps them, under the same random draws."""
    json_file, image_root = tiny
    video = load_ytvis_json(json_file, image_root)[0]
    augs = [T.ResizeShortestEdge(40, 100), T.RandomFlip(0.5)]
    full, lean = _mapper(True, augs), _mapper(True, augs, reference_masks=False)
    for seed in range(8):
        outs = []
        for mapper in (full, lean):
            np.random.seed(seed)
            outs.append(mapper(copy.deepcopy(video)))
        (a, b) = outs
        assert a["frame_indices"] == b["frame_indices"]
        assert all(torch.equal(x, y) for x, y in zip(a["image"], b["image"]))
        (key_a, ref_a), (key_b, ref_b) = a["instances"], b["instances"]
        assert torch.equal(key_a.gt_masks.tensor, key_b.gt_masks.tensor)
        assert ref_a.has("gt_masks") and not ref_b.has("gt_masks")
        for field in ("gt_ids", "gt_classes"):
            assert torch.equal(ref_a.get(field), ref_b.get(field))
        assert torch.equal(ref_a.gt_boxes.tensor, ref_b.gt_boxes.tensor)
    with pytest.raises(ValueError, match="reference_masks"):
        _mapper(True, augs, recompute_boxes=True, reference_masks=False)


@pytest.mark.parametrize("supervised, crop, expected", [
    (True, False, True), (False, False, False), (False, True, True)])
def test_mapper_from_config_keeps_reference_masks_where_used(supervised, crop, expected):
    """The reference frame's masks: where the model supervises that frame, or where the
    boxes are recomputed from masks after a crop."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME = supervised
    cfg.INPUT.CROP.ENABLED = crop
    assert YTVISDatasetMapper(cfg, is_train=True).reference_masks is expected


def _vis_train_cfg(name, sampling):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.KEY_FRAME_SAMPLING = sampling
    cfg.INPUT.SAMPLING_FRAME_RANGE = 1
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (H,), 100
    cfg.INPUT.FORMAT, cfg.INPUT.MASK_FORMAT, cfg.MODEL.MASK_ON = "RGB", "bitmask", True
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS, cfg.SEED = 1, 0, 3
    return cfg


def test_train_loader_key_frame_sampling(tiny):
    """"frame": each frame of each video is the key once an epoch (6 draws: all 6 frames).
    An unknown value is refused, naming the key."""
    json_file, image_root = tiny
    name = "test_ytvis_key_frames"
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    register_ytvis_instances(name, {}, json_file, image_root)
    loader = iter(build_vis_train_loader(_vis_train_cfg(name, "frame")))
    for _epoch in range(3):
        keys = [(b[0]["video_id"], b[0]["frame_indices"][0]) for b in
                (next(loader) for _ in range(6))]
        assert sorted(keys) == [(v, t) for v in (10, 20) for t in range(3)]
    with pytest.raises(ValueError, match="INPUT.KEY_FRAME_SAMPLING"):
        build_vis_train_loader(_vis_train_cfg(name, "clip"))


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
@pytest.mark.parametrize("crop", [False, True])
def test_mapper_same_augmentation_on_both_frames(tmp_path, crop, mask_format):
    """Identical frames with an asymmetric object: both frames come out identical, and the
    object's mask lands where its pixels are (flip, resize and crop shared)."""
    obj = l_shape(4, 6)
    os.makedirs(tmp_path / "v")
    names = []
    for t in range(4):
        names.append(str(tmp_path / "v" / f"{t}.png"))
        Image.fromarray(np.repeat(obj[:, :, None] * 255, 3, axis=2)).save(names[-1])
    polygon = [[4.0, 6.0, 6.0, 6.0, 6.0, 12.0, 10.0, 12.0, 10.0, 14.0, 4.0, 14.0]]
    segm = polygon if mask_format == "polygon" else compressed_rle(obj)
    annos = [[{"id": 5, "category_id": 0, "iscrowd": 0, "bbox": box_of(obj),
               "bbox_mode": BoxMode.XYWH_ABS, "segmentation": segm}] for _ in range(4)]
    video = {"video_id": 1, "height": H, "width": W, "file_names": names, "annotations": annos}
    # Integer scales (20 -> 40; a 16x16 crop -> 32), so that nearest-neighbour pixels and
    # scaled polygon corners describe the same pixels.
    augs = [T.RandomFlip(0.5), T.ResizeShortestEdge(32 if crop else 40, 100, interp=Image.NEAREST)]
    if crop:
        augs = [T.RandomCrop("absolute", (16, 16))] + augs
    mapper = _mapper(True, augs, mask_format, frame_range=3, recompute_boxes=crop)
    flips = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(copy.deepcopy(video))
        key, ref = out["image"]
        assert torch.equal(key, ref)
        key_inst, ref_inst = out["instances"]
        assert key_inst.gt_ids.tolist() == ref_inst.gt_ids.tolist()
        if len(key_inst) == 0:  # cropped away: in both frames
            continue
        assert torch.equal(key_inst.gt_boxes.tensor, ref_inst.gt_boxes.tensor)
        pixels = key[0] > 127
        for inst in out["instances"]:
            if mask_format == "bitmask":
                assert torch.equal(inst.gt_masks.tensor[0], pixels)
            else:  # polygons are transformed as coordinates: the same rectangle-union
                rast = mask_util.decode(mask_util.merge(mask_util.frPyObjects(
                    [p.tolist() for p in inst.gt_masks.polygons[0]], *pixels.shape)))
                assert torch.equal(torch.from_numpy(rast.astype(bool)), pixels)
        ys, xs = torch.nonzero(pixels, as_tuple=True)
        foot_right = xs[ys == ys.max()].float().mean() > xs.float().mean()
        flips.add(bool(foot_right))
    assert flips == {True, False}  # both flipped and unflipped draws were checked


def test_mapper_test_mode_all_frames(tiny):
    json_file, image_root = tiny
    video = load_ytvis_json(json_file, image_root)[1]
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT = 40, 100, "RGB"
    out = YTVISDatasetMapper(cfg, is_train=False)(video)
    assert out["length"] == 3 and out["file_names"] == video["file_names"]
    assert "instances" not in out and "annotations" not in out
    assert [tuple(im.shape) for im in out["image"]] == [(3, 40, 48)] * 3
    for t, im in enumerate(out["image"]):
        source = np.asarray(Image.open(video["file_names"][t]).resize((48, 40), Image.BILINEAR))
        assert np.abs(im.permute(1, 2, 0).numpy().astype(int) - source).max() <= 1


def test_mapper_from_config_train_and_16_bit_frames(tmp_path):
    """from_config in training; 16-bit frames are read as the image mapper reads them."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.INPUT.SAMPLING_FRAME_RANGE = 2
    mapper = YTVISDatasetMapper(cfg, is_train=True)
    assert mapper.sampling_frame_range == 2 and mapper.is_train
    values = (np.arange(H * W).reshape(H, W) * 7 % 4096).astype(np.uint16)  # 12-bit data
    names = [str(tmp_path / f"{t}.png") for t in range(2)]
    for name in names:
        Image.fromarray(values).save(name)
    test_mapper = _mapper(False, [T.ResizeShortestEdge(H, 100)])
    out = test_mapper({"video_id": 0, "height": H, "width": W, "file_names": names})
    for im in out["image"]:
        np.testing.assert_array_equal(im[0].numpy(), (values >> 4).astype(np.uint8))


@pytest.mark.parametrize("edit", ["absent", "null"])
def test_split_without_annotations_loads_videos_without_objects(tiny, edit):
    """The official valid json has no annotations: every video loads, with empty frames."""
    json_file, image_root = tiny

    def drop(data):
        if edit == "absent":
            del data["annotations"]
        else:
            data["annotations"] = None

    _edit_json(json_file, drop)
    dicts = load_ytvis_json(json_file, image_root)
    assert len(dicts) == 2
    assert all(frame == [] for d in dicts for frame in d["annotations"])
    assert all(len(d["annotations"]) == d["length"] == len(d["file_names"]) for d in dicts)


def test_annotations_of_the_wrong_type_are_refused(tiny):
    json_file, image_root = tiny
    _edit_json(json_file, lambda data: data.update(annotations={"id": 1}))
    with pytest.raises(DatasetFormatError, match="'annotations' must be a list"):
        load_ytvis_json(json_file, image_root)
