"""Bundled video datasets: nuclei pseudo-videos and labelme's street clip, loaded through the
YouTube-VIS loader and decoded against their sources read straight from the package archives.

The sources come from the package cache ($QUERYINST_CACHE/packages, downloaded once per
machine); the build runs once per test session, into a temporary datasets root.
"""
import json
import os
import shutil
import tarfile

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from queryinst.data import DatasetFormatError, download_package
from queryinst.data import bundled_sources as src
from queryinst.video.data import builtin as vb

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

NAMES = ("nuclei_dsb_video_train", "nuclei_dsb_video_val", "labelme_video_example")
FRAME = 192
VAL = 256  # the val quadrant is x, y in [256, 512)
LABELME_BASE = "labelme-6.3.1/examples/video_annotation/data_annotated"
LABELME_STEMS = [f"{i:08d}" for i in range(100, 105)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Register from a clean DETECTRON2_DATASETS and load every bundled video dataset once."""
    root = str(tmp_path_factory.mktemp("datasets"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", root)
        vb.register_bundled_video_datasets()
        dicts = {name: DatasetCatalog.get(name) for name in NAMES}
    jsons = {}
    for name in NAMES:
        with open(MetadataCatalog.get(name).json_file) as f:
            jsons[name] = json.load(f)
    yield root, dicts, jsons
    vb.register_bundled_video_datasets()  # back to the default root for other tests


def _decode(segm):
    return mask_util.decode(segm).astype(bool)


def _expected_labels(labels, window):
    """The window's label frame by Pillow's NEAREST (not the converter's index arithmetic)."""
    x, y, side = window
    crop = np.ascontiguousarray(labels[y:y + side, x:x + side])
    if side == FRAME:
        return crop
    return np.asarray(Image.fromarray(crop).resize((FRAME, FRAME), Image.NEAREST))


def _videos(jsons, name):
    """video name -> (loaded dict, json video, {track id: source label})."""
    data = jsons[name]
    by_id = {d["video_id"]: d for d in DatasetCatalog.get(name)}
    source = {a["id"]: a["source_label"] for a in data["annotations"]}
    return {v["file_names"][0].split("/")[0]: (by_id[v["id"]], v, source)
            for v in data["videos"]}


# ---- nuclei pseudo-videos --------------------------------------------------------------------


def test_counts_layout_and_metadata(built):
    root, dicts, jsons = built
    expected = {"nuclei_dsb_video_train": (5, 50, 240, 996),
                "nuclei_dsb_video_val": (1, 12, 23, 185),
                "labelme_video_example": (1, 5, 3, 15)}
    for name, (videos, frames, tracks, track_frames) in expected.items():
        d = dicts[name]
        ids = {(v["video_id"], o["id"]) for v in d for f in v["annotations"] for o in f}
        assert (len(d), sum(v["length"] for v in d), len(ids),
                sum(len(f) for v in d for f in v["annotations"])) == expected[name]
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "ytvis" and meta.json_file.startswith(root)
        assert (meta.video_count, meta.track_frame_count) == (videos, track_frames)
        for v in d:
            assert len(v["file_names"]) == len(v["annotations"]) == v["length"]
            assert all(os.path.isfile(f) for f in v["file_names"])
    assert MetadataCatalog.get("nuclei_dsb_video_val").thing_classes == ["nucleus"]
    assert MetadataCatalog.get("labelme_video_example").thing_classes == ["car", "track"]
    first = dicts["nuclei_dsb_video_train"][0]["file_names"][0]
    assert first == os.path.join(root, "nuclei_dsb_video", "train", "JPEGImages", "pan_right",
                                 "00000.png")
    assert Image.open(first).size == (FRAME, FRAME)
    readme = open(os.path.join(root, "nuclei_dsb_video", "README.md")).read()
    assert "SYNTHETIC" in readme and "CC0" in readme
    assert "GPL-3.0" in open(os.path.join(root, "labelme_video", "README.md")).read()


def test_windows_split_by_the_val_quadrant(built):
    _, _, jsons = built
    train = [w for v in jsons["nuclei_dsb_video_train"]["videos"] for w in v["windows"]]
    val = [w for v in jsons["nuclei_dsb_video_val"]["videos"] for w in v["windows"]]
    assert len(train) == 50 and len(val) == 12
    for x, y, side in train:  # no pixel in [256, 512)^2: right of or below the window's end
        assert x >= 0 and y >= 0 and x + side <= 512 and y + side <= 512
        assert x + side <= VAL or y + side <= VAL
    for x, y, side in val:
        assert x >= VAL and y >= VAL and x + side <= 512 and y + side <= 512
    # the hand-written paths of the pure pans: side 192 (scale 1), integer steps
    pans = {v["file_names"][0].split("/")[0]: v["windows"]
            for v in jsons["nuclei_dsb_video_train"]["videos"]}
    assert pans["pan_right"] == [[32 * t, 32, 192] for t in range(10)]
    assert pans["pan_down"] == [[32, 32 * t, 192] for t in range(10)]
    assert pans["pan_diagonal_slow"] == [[10 * t, 6 * t, 192] for t in range(10)]
    assert {w[2] for w in pans["pan_left_zoom_in"]} != {192}  # the zooming ones do zoom


def test_masks_equal_source_labels_frame_by_frame(built, stardist_arrays):
    _, _, jsons = built
    image, labels = stardist_arrays
    lo, hi = np.percentile(image, [1.0, 99.8])
    gray = np.round(np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    for name in ("nuclei_dsb_video_train", "nuclei_dsb_video_val"):
        for video, (loaded, raw, source) in _videos(jsons, name).items():
            for t, window in enumerate(raw["windows"]):
                expected = _expected_labels(labels, window)
                objects = {source[o["id"]]: o for o in loaded["annotations"][t]}
                present = {int(v) for v, n in zip(*np.unique(expected, return_counts=True))
                           if v > 0 and n >= 20}
                assert set(objects) == present, (video, t)
                for label, obj in objects.items():
                    mask = _decode(obj["segmentation"])
                    assert np.array_equal(mask, expected == label), (video, t, label)
                    assert obj["category_id"] == 0 and obj["iscrowd"] == 0
                    ys, xs = np.nonzero(mask)
                    assert obj["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                           ys.max() - ys.min() + 1]
                frame = np.asarray(Image.open(loaded["file_names"][t]))
                assert frame.shape == (FRAME, FRAME, 3)
                if window[2] == FRAME:  # scale 1: the frame is the normalised crop itself
                    x, y, _ = window
                    assert np.array_equal(frame[:, :, 1], gray[y:y + FRAME, x:x + FRAME])


def test_identity_follows_the_pan(built):
    """Pure pan by (dx, dy): an object's mask in frame t+1 is its frame-t mask moved by
    (-dx, -dy), on the part of the frame both windows see."""
    _, _, jsons = built
    videos = _videos(jsons, "nuclei_dsb_video_train")
    checked = 0
    for video, (dx, dy) in (("pan_right", (32, 0)), ("pan_diagonal_slow", (10, 6))):
        loaded = videos[video][0]
        for t in range(loaded["length"] - 1):
            now = {o["id"]: _decode(o["segmentation"]) for o in loaded["annotations"][t]}
            nxt = {o["id"]: _decode(o["segmentation"]) for o in loaded["annotations"][t + 1]}
            for track in set(now) & set(nxt):
                assert np.array_equal(nxt[track][:FRAME - dy, :FRAME - dx],
                                      now[track][dy:, dx:]), (video, t, track)
                checked += 1
    assert checked > 100


def test_val_video_objects_enter_and_leave(built):
    _, dicts, _ = built
    (video,) = dicts["nuclei_dsb_video_val"]
    present = {}
    for t, frame in enumerate(video["annotations"]):
        for obj in frame:
            present.setdefault(obj["id"], []).append(t)
    last = video["length"] - 1
    entering = [i for i, ts in present.items() if ts[0] > 0]
    leaving = [i for i, ts in present.items() if ts[-1] < last]
    assert len(entering) >= 2 and len(leaving) >= 5
    assert all(ts == list(range(ts[0], ts[-1] + 1)) for ts in present.values())  # no gaps


def test_registration_does_no_io_and_a_changed_build_is_an_error(built, tmp_path):
    root = tmp_path / "root"
    vb.register_bundled_video_datasets(str(root))
    try:
        assert not root.exists()
        # a built folder whose json has one track fewer than recorded is refused
        shutil.copytree(os.path.join(built[0], "labelme_video"), root / "labelme_video")
        data = json.loads(json.dumps(built[2]["labelme_video_example"]))
        data["annotations"].pop()
        (root / "labelme_video" / "example.json").write_text(json.dumps(data))
        with pytest.raises(DatasetFormatError, match="example.json.*expected"):
            DatasetCatalog.get("labelme_video_example")
    finally:
        vb.register_bundled_video_datasets()


def test_labelme_conversion_needs_one_shape_order(labelme_clip):
    jsons = [json.loads(json.dumps(labelme_clip[s][0])) for s in LABELME_STEMS]
    jsons[3]["shapes"].reverse()  # car first: identity by order would swap tracks
    with pytest.raises(ValueError, match="differ from the first frame"):
        vb.convert_labelme_video(jsons, [labelme_clip[s][1] for s in LABELME_STEMS],
                                 LABELME_STEMS, ["__ignore__", "_background_", "car", "track"])


# ---- labelme street clip ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelme_clip():
    """{stem: (labelme json, jpeg bytes)} read straight from the cached labelme sdist."""
    sdist = download_package(src.LABELME, sdist=True)
    with tarfile.open(sdist) as tf:
        return {s: (json.load(tf.extractfile(f"{LABELME_BASE}/{s}.json")),
                    tf.extractfile(f"{LABELME_BASE}/{s}.jpg").read()) for s in LABELME_STEMS}


def test_labelme_clip_masks_equal_the_polygons(built, labelme_clip):
    _, dicts, jsons = built
    (video,) = dicts["labelme_video_example"]
    assert (video["length"], video["height"], video["width"]) == (5, 563, 1000)
    assert [c["name"] for c in jsons["labelme_video_example"]["categories"]] == ["car", "track"]
    for t, stem in enumerate(LABELME_STEMS):
        labelme, jpeg = labelme_clip[stem]
        assert open(video["file_names"][t], "rb").read() == jpeg  # copied unchanged
        objects = sorted(video["annotations"][t], key=lambda o: o["id"])
        assert [o["id"] for o in objects] == [1, 2, 3]
        assert [o["category_id"] for o in objects] == [1, 1, 0]  # track, track, car
        for obj, shape in zip(objects, labelme["shapes"]):
            mask = _decode(obj["segmentation"])
            flat = [float(c) for p in shape["points"] for c in p]
            coco = mask_util.decode(mask_util.merge(mask_util.frPyObjects([flat], 563, 1000)))
            assert np.array_equal(mask, coco.astype(bool))
            filled = np.zeros((563, 1000), np.uint8)  # an independent rasteriser
            cv2.fillPoly(filled, [np.round(np.array(shape["points"])).astype(np.int32)], 1)
            iou = (mask & (filled > 0)).sum() / (mask | (filled > 0)).sum()
            assert iou > 0.97, (stem, obj["id"], iou)


def test_labelme_truck_moves_the_rest_stays(built):
    _, dicts, _ = built
    (video,) = dicts["labelme_video_example"]
    tracks = {}
    for frame in video["annotations"]:
        for obj in frame:
            mask = _decode(obj["segmentation"])
            ys, xs = np.nonzero(mask)
            tracks.setdefault(obj["id"], []).append((xs.min(), xs.mean(), ys.mean()))
    front = np.diff([f[0] for f in tracks[1]])  # the truck cab's front (left) edge
    assert np.all((front <= -15) & (front >= -25)) and abs(front.mean() + 20) < 1.5
    assert np.all(np.diff([f[1] for f in tracks[1]]) < -5)  # its centroid moves left too
    for still in (2, 3):
        steps = np.abs(np.diff(np.array(tracks[still])[:, 1:], axis=0))
        assert steps.max() < 1.0
