"""tools/missed_instances.py: missed GT instances and the kinds of false positives.

Truth: square masks on a 20 x 20 image whose IoUs are worked out by hand in the comments.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import missed_instances  # noqa: E402


def _rle(rows, cols):
    m = np.zeros((20, 20), np.uint8)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


A, B, C, D = ((0, 5), (0, 5)), ((10, 15), (10, 15)), ((0, 4), (15, 19)), ((5, 9), (5, 9))


def _data():
    images = [{"id": 1, "height": 20, "width": 20}, {"id": 2, "height": 20, "width": 20}]
    anns = [{"id": k, "image_id": img, "category_id": 1, "iscrowd": 0, "segmentation": _rle(*sq)}
            for k, (img, sq) in enumerate([(1, A), (1, B), (1, C), (2, D)], 1)]
    preds = [
        {"image_id": 1, "score": 0.9, "segmentation": _rle(*A)},  # A exactly: TP
        {"image_id": 1, "score": 0.8, "segmentation": _rle(*A)},  # A again: a duplicate
        # B moved 2 columns: 5 x 3 = 15 shared pixels of 25 + 25 - 15 = 35: IoU 0.43, and
        # fourth by score, outside the top 3 (image 1 has 3 GT)
        {"image_id": 1, "score": 0.7, "segmentation": _rle((10, 15), (12, 17))},
        {"image_id": 1, "score": 0.95, "segmentation": _rle((17, 20), (0, 3))},  # background
    ]
    return {"images": images, "annotations": anns}, preds


def test_counts_match_the_hand_worked_example():
    gt, preds = _data()
    t = missed_instances.analyse(gt, preds, 0.5)
    # missed: B (best IoU 0.43: band 0.3 and above), C (nothing there), D (image 2: nothing)
    assert (t["gt"], t["missed"]) == (4, 3)
    assert (t["missed_below_0.1"], t["missed_0.1_0.3"], t["missed_0.3_iou"]) == (2, 0, 1)
    # top 3 of image 1 by score: background (0.95), A (0.9, TP), A again (0.8, duplicate)
    assert (t["tp"], t["fp_duplicate"], t["fp_partial"], t["fp_background"]) == (1, 1, 0, 1)
    # areas: missed B 25, C 16, D 16 -> median 16; all 25, 25, 16, 16 -> 20.5
    assert (t["missed_median_area"], t["median_area"]) == (16.0, 20.5)


def test_a_lower_threshold_finds_the_shifted_mask():
    gt, preds = _data()
    t = missed_instances.analyse(gt, preds, 0.4)  # 0.43 >= 0.4: B is found now
    assert t["missed"] == 2 and t["missed_0.3_iou"] == 0


def test_partial_false_positive_in_the_top_n():
    gt, preds = _data()
    preds[2]["score"] = 0.99  # the shifted B first: IoU 0.43 < 0.5 with B, so partial
    t = missed_instances.analyse(gt, preds, 0.5)
    assert (t["tp"], t["fp_duplicate"], t["fp_partial"], t["fp_background"]) == (1, 0, 1, 1)


def test_bad_input_names_the_problem(tmp_path):
    gt, preds = _data()
    preds[0]["image_id"] = 7
    with pytest.raises(ValueError, match="image_id 7"):
        missed_instances.analyse(gt, preds)
    with pytest.raises(ValueError, match="--iou"):
        missed_instances.analyse(gt, [], 0)
    boxes_only = [{"image_id": 1, "score": 0.5, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(ValueError, match="image_id 1 has no segmentation"):
        missed_instances.analyse(gt, boxes_only)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "missed_instances.py"),
                          "--gt", str(gt_path), "--pred", str(tmp_path / "none.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "none.json: cannot read the results json" in bad.stderr
    (tmp_path / "boxes.json").write_text(json.dumps([{"image_id": 1, "score": 0.5,
                                                      "bbox": [0, 0, 5, 5]}]))
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "missed_instances.py"),
                          "--gt", str(gt_path), "--pred", str(tmp_path / "boxes.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "boxes.json: the result of image_id 1" in bad.stderr
