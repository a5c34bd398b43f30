#!/usr/bin/env python
"""Where a model's frame AP50 goes: the GT instances it never finds, and what its false positives are.

For each image of a COCO GT json and each COCO results json (``inference/
coco_instances_results.json`` of a ``--eval-only`` run), with mask IoU from pycocotools:

- **missed**: GT instances that no prediction of the image reaches at mask IoU >= ``--iou``
  (whatever its score), split by their best IoU: < 0.1 (nothing there), 0.1 to 0.3, 0.3 to
  ``--iou`` (found but poorly outlined); with the median GT area of the missed and of all;
- **top-N by score** (N = the image's GT count), matched greedily by score as COCO does at
  ``--iou``: true positives; false positives that are **duplicates** (IoU >= ``--iou`` with a
  GT already taken), **partial** (best IoU 0.1 to ``--iou``: a part of a cell, or two merged)
  or **background** (best IoU < 0.1).

A model's missed instances bound its AP50 whatever its scores: set
``TEST.DETECTIONS_PER_IMAGE`` to the number of queries for the run, so that every query's
prediction is in the json. Used in docs/results/ctc_psc_vis_demo.md ("Why Mask R-CNN leads").

Usage::

    python tools/missed_instances.py --gt datasets/ctc_psc/annotations/val.json \\
        --pred output/ctc_psc_MNV2_vis/inference/coco_instances_results.json [more.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from pycocotools import mask as mask_util

BANDS = (0.1, 0.3)  # the best-IoU bands of the missed instances, below --iou


def _load(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the {what} json ({e})") from e


def _segmentation(obj: dict, image: dict):
    """The RLE of an annotation or a result (polygons converted at the image's size)."""
    seg = obj["segmentation"]
    if isinstance(seg, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(seg, image["height"], image["width"]))
    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        return mask_util.frPyObjects(seg, *seg["size"])
    return seg


def image_outcome(gts: list, preds: list, scores: list, iou_thresh: float) -> dict:
    """The counts of the module docstring for one image.

    Args:
        gts (list[dict]): the image's non-crowd GT masks as COCO RLE.
        preds (list[dict]): the image's predicted masks as COCO RLE.
        scores (list[float]): the predictions' scores, in the order of ``preds``.
        iou_thresh (float): mask IoU that counts as found / matched, in (0, 1].

    Returns:
        dict with "gt", "missed", "missed_below_0.1", "missed_0.1_0.3", "missed_0.3_iou"
        (ints), "missed_areas", "areas" (lists of GT areas in pixels), "tp", "fp_duplicate",
        "fp_partial", "fp_background" (ints, over the top len(gts) predictions by score).
    """
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    preds = [preds[i] for i in order]
    areas = [float(a) for a in mask_util.area(gts)] if gts else []
    if gts and preds:
        iou = np.asarray(mask_util.iou(preds, gts, [0] * len(gts))).reshape(len(preds), len(gts))
    else:
        iou = np.zeros((len(preds), len(gts)))
    best = iou.max(0) if preds else np.zeros(len(gts))
    missed = best < iou_thresh
    out = {"gt": len(gts), "missed": int(missed.sum()),
           "missed_below_0.1": int((missed & (best < BANDS[0])).sum()),
           "missed_0.1_0.3": int((missed & (best >= BANDS[0]) & (best < BANDS[1])).sum()),
           "missed_0.3_iou": int((missed & (best >= BANDS[1])).sum()),
           "missed_areas": [a for a, m in zip(areas, missed) if m], "areas": areas,
           "tp": 0, "fp_duplicate": 0, "fp_partial": 0, "fp_background": 0}
    taken = np.zeros(len(gts), bool)
    for row in iou[:len(gts)]:  # the top len(gts) predictions, best score first
        free = np.where(taken, -1.0, row)
        j = int(np.argmax(free))
        if free[j] >= iou_thresh:
            taken[j] = True
            out["tp"] += 1
        elif row.max() >= iou_thresh:
            out["fp_duplicate"] += 1
        elif row.max() >= BANDS[0]:
            out["fp_partial"] += 1
        else:
            out["fp_background"] += 1
    return out


def analyse(gt: dict, results: list, iou_thresh: float = 0.5) -> dict:
    """Sum :func:`image_outcome` over the images of a COCO GT dict.

    Args:
        gt (dict): COCO GT ("images", "annotations"; crowd annotations are left out).
        results (list[dict]): COCO results ("image_id", "segmentation", "score").
        iou_thresh (float): see :func:`image_outcome`.

    Returns:
        the summed counts of :func:`image_outcome`, with "missed_areas" and "areas" replaced
        by "missed_median_area" and "median_area" (pixels; 0 when there are none).

    Raises:
        ValueError: a result names an image that the GT does not have or has no
        segmentation, or ``iou_thresh`` outside (0, 1].
    """
    if not 0 < iou_thresh <= 1:
        raise ValueError(f"--iou must be in (0, 1], got {iou_thresh}")
    images = {im["id"]: im for im in gt["images"]}
    gts = {i: [] for i in images}
    preds = {i: ([], []) for i in images}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            gts[a["image_id"]].append(_segmentation(a, images[a["image_id"]]))
    for r in results:
        if r["image_id"] not in images:
            raise ValueError(f"a result names image_id {r['image_id']}, which the GT json does "
                             f"not have: pass the GT json the results were evaluated on")
        if "segmentation" not in r:
            raise ValueError(f"the result of image_id {r['image_id']} has no segmentation: "
                             f"this needs the masks of an instance segmentation run")
        preds[r["image_id"]][0].append(_segmentation(r, images[r["image_id"]]))
        preds[r["image_id"]][1].append(r["score"])
    total = {"missed_areas": [], "areas": []}
    for i in images:
        for k, v in image_outcome(gts[i], *preds[i], iou_thresh).items():
            total[k] = total.get(k, 0) + v
    total["missed_median_area"] = float(np.median(total.pop("missed_areas") or [0]))
    total["median_area"] = float(np.median(total.pop("areas") or [0]))
    return total


def _line(path: str, t: dict) -> str:
    n = max(t["gt"], 1)
    return (f"{path}\n  GT {t['gt']}; missed (no prediction at mask IoU >= the threshold): "
            f"{t['missed']} ({100 * t['missed'] / n:.1f}%): best IoU < 0.1 "
            f"{t['missed_below_0.1']}, 0.1-0.3 {t['missed_0.1_0.3']}, 0.3 and above "
            f"{t['missed_0.3_iou']}; median area {t['missed_median_area']:.0f} px "
            f"(all GT {t['median_area']:.0f})\n  top-N by score (N = GT per image): TP "
            f"{t['tp']}, FP duplicate {t['fp_duplicate']}, partial {t['fp_partial']}, "
            f"background {t['fp_background']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="COCO GT json (e.g. a val split's)")
    parser.add_argument("--pred", nargs="+", required=True, help="COCO results json(s)")
    parser.add_argument("--iou", type=float, default=0.5, help="mask IoU threshold")
    parser.add_argument("--out", help="write {results json: counts} here as json")
    args = parser.parse_args(argv)
    gt = _load(args.gt, "GT")
    report = {}
    for path in args.pred:
        try:
            report[path] = analyse(gt, _load(path, "results"), args.iou)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(path) else f"{path}: {e}") from e
        print(_line(path, report[path]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"ERROR: {e}")
