"""The Cell Tracking Challenge reader (queryinst.data.ctc) on real sequences shipped in sdists.

Fixtures: baclct==0.4.1's toy data (4 frames as one uint16 stack, 105 ids, man_track.txt with
divisions) and epicure==1.6.4's 11-frame epithelium crop (float32 labels holding integer
ids). The expected counts and ids below were read off the files by hand (man_track.txt lines,
np.unique of the stacks) when the tests were written. The bundled PhC-C2DL-PSC sequence
checks the temporal split.
"""
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest

from queryinst.data import ctc
from queryinst.data.builtin import write_converted_folder
from queryinst.data.coco_format import DatasetFormatError, load_coco_instances
from queryinst.video import load_ytvis_json

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@pytest.fixture(scope="module")
def baclct():
    return ctc.fetch_ctc_source("baclct_toy")


@pytest.fixture(scope="module")
def epicure():
    return ctc.fetch_ctc_source("epicure_013")


def _tracks(ytvis):
    return {a["id"]: a for a in ytvis["annotations"]}


def _present(track):
    return [t for t, s in enumerate(track["segmentations"]) if s is not None]


def test_baclct_lineage_becomes_tracks(baclct, tmp_path):
    out = ctc.convert_ctc_sequence(**baclct, video_name="toy")
    ytvis, coco = out["video_all"].coco, out["all"].coco
    assert len(ytvis["videos"][0]["file_names"]) == 4 and len(coco["images"]) == 4
    tracks = _tracks(ytvis)
    assert len(tracks) == 105  # 105 lines in man_track.txt, every id present
    # cells per frame (np.unique of each page of sample_masks.tif)
    assert [sum(a["image_id"] == i for a in coco["annotations"]) for i in (1, 2, 3, 4)] == \
        [95, 96, 98, 99]
    # "143 0 0 0": a mother present in frame 0 only; "178 1 3 143", "181 1 3 143": its
    # daughters start in frame 1. The division ends one track and starts two.
    assert _present(tracks[143]) == [0] and tracks[143]["parent"] == 0
    for daughter in (178, 181):
        assert _present(tracks[daughter]) == [1, 2, 3] and tracks[daughter]["parent"] == 143
    assert tracks[178]["areas"] == [None, 284, 335, 355]  # pixel counts of id 178
    assert _present(tracks[186]) == [3] and tracks[186]["parent"] == 151  # "186 3 3 151"
    assert _present(tracks[3]) == [0]  # "3 0 0 0": a track that simply ends
    # a COCO annotation is the same mask as the track's frame
    ann = next(a for a in coco["annotations"] if a["track_id"] == 178 and a["image_id"] == 3)
    assert ann["segmentation"] == tracks[178]["segmentations"][2] and ann["parent"] == 143
    # both jsons load with the project's validating loaders
    write_converted_folder(str(tmp_path), {f"images/{n}": b for n, b in out["all"].files.items()},
                           "test", {"video.json": ytvis, "coco.json": coco})
    videos = load_ytvis_json(str(tmp_path / "video.json"), str(tmp_path / "images"))
    assert videos[0]["length"] == 4 and sum(len(f) for f in videos[0]["annotations"]) == 388
    assert len(load_coco_instances(str(tmp_path / "coco.json"), str(tmp_path / "images"))) == 4


def test_epicure_float_labels(epicure):
    assert epicure["labels"][0].dtype == np.float32
    out = ctc.convert_ctc_sequence(**epicure, video_name="013")
    tracks = _tracks(out["video_all"].coco)
    assert len(out["video_all"].coco["videos"][0]["file_names"]) == 11
    assert len(tracks) == 90  # np.unique over the stack: 90 ids besides 0
    assert min(tracks) == 16 and max(tracks) == 1162
    # id 16: frames 0, 1, 3 (absent in 2: a gap stays one track), 310 / 296 / 283 pixels
    assert _present(tracks[16]) == [0, 1, 3] and tracks[16]["areas"][:4] == [310, 296, None, 283]
    mask = mask_util.decode(tracks[16]["segmentations"][0]).astype(bool)
    assert np.array_equal(mask, epicure["labels"][0] == 16)
    assert all(t["parent"] == 0 for t in tracks.values())  # no lineage file: no parents


def test_frames_written_as_gray_png_read_as_three_equal_channels(epicure):
    """Each frame is one 8-bit grayscale PNG: the sequence's 1st / 99.8th percentiles map to
    0 / 255 (computed here by hand), and Detectron2's reader gives it as three equal BGR
    channels, the input a model trained on RGB frames sees."""
    import io

    from detectron2.data.detection_utils import convert_PIL_to_numpy
    from PIL import Image

    out = ctc.convert_ctc_sequence(**epicure, video_name="013")
    stack = np.stack(epicure["frames"]).astype(np.float64)
    lo, hi = np.percentile(stack, [1, 99.8])
    expected = np.round(np.clip((stack - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    for t in (0, 10):
        image = Image.open(io.BytesIO(out["all"].files[f"013/t{t:03d}.png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "L", stack.shape[:0:-1])
        assert np.array_equal(np.asarray(image), expected[t])
        bgr = convert_PIL_to_numpy(image, "BGR")
        assert bgr.shape == stack.shape[1:] + (3,) and (bgr == expected[t][:, :, None]).all()


def test_crop_and_split_counts(epicure):
    splits = ctc.temporal_split(11)
    assert list(splits["train"]) == list(range(7)) and list(splits["val"]) == [7, 8, 9, 10]
    out = ctc.convert_ctc_sequence(**epicure, video_name="013", crop=(10, 110, 20, 220),
                                   min_area=5, splits=splits)
    video = out["video_val"].coco["videos"][0]
    assert (video["height"], video["width"], video["first_frame"]) == (100, 200, 7)
    assert video["file_names"] == [f"013/t{t:03d}.png" for t in (7, 8, 9, 10)]
    labels = [lab.astype(np.int64)[10:110, 20:220] for lab in epicure["labels"]]
    expected = sum(int(np.sum(np.bincount(lab[lab > 0]) >= 5)) for lab in labels[7:])
    assert len(out["val"].coco["annotations"]) == expected


@pytest.mark.parametrize("case", ["count", "size", "absent_id", "float", "outside", "parent"])
def test_bad_inputs_name_the_file(baclct, epicure, case):
    data = dict(baclct)
    if case == "count":
        data["labels"], data["label_names"] = data["labels"][:3], data["label_names"][:3]
        match = r"sample_masks\.tif\[0\]: 3 label images but 4 frames"
    elif case == "size":
        data["labels"] = list(data["labels"])
        data["labels"][2] = np.pad(data["labels"][2], ((0, 1), (0, 0)))
        match = r"sample_masks\.tif\[2\]: size \(301, 530\), but the first frame"
    elif case == "absent_id":
        data["lineage"] = {k: v for k, v in data["lineage"].items() if k != 178}
        match = r"sample_masks\.tif\[1\]: id 178 is absent from the lineage file .*man_track"
    elif case == "outside":
        data["lineage"] = {**data["lineage"], 178: ctc.CTCTrack(2, 3, 143)}
        match = r"sample_masks\.tif\[1\]: id 178 in frame 1, but .*man_track\.txt gives it"
    elif case == "parent":
        with pytest.raises(DatasetFormatError, match=r"^lin\.txt: track 5's parent 9 has no"):
            ctc.read_ctc_lineage("1 0 3 0\n5 1 2 9\n", "lin.txt")
        return
    else:
        data = dict(epicure)
        data["labels"] = [lab.copy() for lab in data["labels"]]
        data["labels"][4][7, 9] = 16.5
        match = r"013_crop_labels\.tif\[4\]: float label value 16\.5 is not a whole number"
    with pytest.raises(DatasetFormatError, match=match) as info:
        ctc.convert_ctc_sequence(**data, video_name="v")
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    import tifffile

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((2, 4, 5), np.uint16))
    other = tmp_path / "t001.tif"
    tifffile.imwrite(other, np.zeros((4, 5), np.uint16))
    with pytest.raises(DatasetFormatError, match=r"stack\.tif: shape \(2, 4, 5\)"):
        ctc.read_ctc_frames([str(stack), str(other)])
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(DatasetFormatError, match=r"bad\.tif: cannot read it as TIFF"):
        ctc.read_ctc_frames([str(tmp_path / "bad.tif")])
    with pytest.raises(DatasetFormatError, match=r"^m\.txt: line 2 is '1 2 x'"):
        ctc.read_ctc_lineage("1 0 3 0\n1 2 x\n", "m.txt")
    arrays, names = ctc.read_ctc_frames([str(stack)])
    assert len(arrays) == 2 and names == [f"{stack}[0]", f"{stack}[1]"]


@pytest.fixture(scope="module")
def psc():
    return ctc.convert_bundled_ctc("ctc_psc")


def test_psc_temporal_split_never_leaks(psc):
    train, val = psc["video_train.json"].coco, psc["video_val.json"].coco
    train_files, val_files = train["videos"][0]["file_names"], val["videos"][0]["file_names"]
    assert len(train_files) + len(val_files) == 50 and len(val_files) >= 0.3 * 50
    frame = [int(os.path.basename(f)[1:4]) for f in train_files + val_files]
    assert frame == list(range(50))  # train t000-t034, val t035-t049: val strictly later
    assert set(psc["video_train.json"].files).isdisjoint(psc["video_val.json"].files)
    assert set(psc["train.json"].files) == set(train_files)  # the image split: same frames
    assert {i["file_name"] for i in psc["train.json"].coco["images"]} == set(train_files)
    # no held-out frame's pixels in a training file under another name
    val_bytes = set(psc["val.json"].files.values())
    assert not val_bytes & set(psc["train.json"].files.values())
    # every track of the train json has a frame in the train split only
    assert all(len(a["segmentations"]) == 35 for a in train["annotations"])
    assert (train["videos"][0]["height"], train["videos"][0]["width"]) == (536, 700)
    # 3457 cell-frames in the 50 frames (the count); the crop loses none
    assert (sum(sum(s is not None for s in a["segmentations"]) for a in train["annotations"])
            + len(psc["val.json"].coco["annotations"])) == 3457


def test_demo_config_trains_on_train_frames_only():
    """The make-demo config trains on the train split only and validates nothing during
    training (the held-out frames are evaluated once, after the last iteration)."""
    from detectron2.config import get_cfg

    from queryinst import add_queryinst_config
    from queryinst.config_loading import merge_config

    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, os.path.join(ROOT, "configs", "bundled",
                                   "queryinst_vis_MNV2_FPN_ctc_psc.yaml"), [])
    assert tuple(cfg.DATASETS.TRAIN) == ("ctc_psc_video_train",)
    assert cfg.TEST.EVAL_PERIOD in (0, cfg.SOLVER.MAX_ITER)


def test_convert_ctc_tool(epicure, tmp_path, capsys):
    """tools/convert_ctc.py on files in the CTC layout: jsons that load; a bad input is one
    ERROR line naming the file, exit status 1."""
    import tifffile
    from conftest import load_script

    tool = load_script("tools/convert_ctc.py", "convert_ctc")
    (tmp_path / "01").mkdir()
    (tmp_path / "01_ST").mkdir()
    for t, (frame, labels) in enumerate(zip(epicure["frames"], epicure["labels"])):
        tifffile.imwrite(tmp_path / "01" / f"t{t:03d}.tif", frame)
        tifffile.imwrite(tmp_path / "01_ST" / f"man_seg{t:03d}.tif", labels)
    out = tmp_path / "out"
    argv = ["--frames", str(tmp_path / "01" / "t*.tif"),
            "--labels", str(tmp_path / "01_ST" / "man_seg*.tif"), "--out", str(out)]
    assert tool.main(argv) == 0
    videos = load_ytvis_json(str(out / "annotations" / "video_val.json"), str(out / "images"))
    assert videos[0]["length"] == 4  # t007-t010
    assert len(load_coco_instances(str(out / "annotations" / "train.json"),
                                   str(out / "images"))) == 7
    capsys.readouterr()
    os.remove(tmp_path / "01_ST" / "man_seg010.tif")
    assert tool.main(argv + ["--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and err.count("\n") == 1
    assert "man_seg000.tif: 10 label images but 11 frames" in err
    assert not (tmp_path / "bad").exists()


def test_bundled_video_sets_load_with_their_counts():
    """The registered video splits load (validated YouTube-VIS) with the recorded counts and
    share their frames with the image splits of the same name."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for folder, val_frames in (("ctc_psc", 15), ("ecoli_colony", 16)):
        for split in ("train", "val"):
            videos = DatasetCatalog.get(f"{folder}_video_{split}")
            meta = MetadataCatalog.get(f"{folder}_video_{split}")
            assert len(videos) == 1 and meta.evaluator_type == "ytvis"
            assert sum(len(f) for f in videos[0]["annotations"]) == meta.track_frame_count
            images = DatasetCatalog.get(f"{folder}_{split}")
            assert [d["file_name"] for d in images] == videos[0]["file_names"]
        assert len(DatasetCatalog.get(f"{folder}_video_val")[0]["file_names"]) == val_frames
