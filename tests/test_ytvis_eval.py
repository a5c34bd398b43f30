"""YouTube-VIS evaluation (docs/method.md §6.4): hand-computed cases, a brute-force check on
random cases, identity switches, the submission zip, the evaluator and tools/ytvis_eval.py."""
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import load_script, uncompressed_rle

from queryinst.video.evaluation.evaluator import (YTVISEvaluator, results_from_tracks,
                                        write_submission)
from queryinst.video.structures import VideoTrack
from queryinst.video.evaluation.ytvis_metric import (evaluate_ytvis, identity_switches,
                                          rle_areas, spatio_temporal_iou, to_rle)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10"]


# ---------------------------------------------------------------- building blocks
def rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask):
    """Compressed RLE with str counts (what results.json holds), or None."""
    if mask is None:
        return None
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def make_gt(videos, tracks, categories=(1, 2), encode=rle):
    """videos: {video_id: (T, H, W)}; tracks: list of (video_id, category_id, [mask|None]*T[,
    iscrowd])."""
    anns = []
    for i, tr in enumerate(tracks):
        vid, cat, masks = tr[:3]
        anns.append({"id": i + 1, "video_id": vid, "category_id": cat,
                     "iscrowd": tr[3] if len(tr) > 3 else 0,
                     "segmentations": [None if m is None else encode(m) for m in masks],
                     "areas": [None if m is None else int(m.sum()) for m in masks]})
    return {"videos": [{"id": v, "length": T, "height": H, "width": W,
                        "file_names": [f"v{v}/{t:05d}.jpg" for t in range(T)]}
                       for v, (T, H, W) in videos.items()],
            "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}


def make_results(preds):
    """preds: list of (video_id, category_id, score, [mask|None]*T)."""
    return [{"video_id": v, "category_id": c, "score": s,
             "segmentations": [rle(m) for m in masks]} for v, c, s, masks in preds]


SQ = rect(40, 40, 5, 5, 15, 15)  # a 10x10 square, area 100


def check(metrics, **expected):
    for k, v in expected.items():
        if v is None:
            assert math.isnan(metrics[k]), (k, metrics)
        else:
            assert metrics[k] == pytest.approx(v, abs=1e-9), (k, metrics[k], v)


# ---------------------------------------------------------------- hand-computed AP
def test_perfect_tracks_give_100_and_undefined_areas_are_nan():
    other = rect(40, 40, 20, 20, 30, 35)
    gt = make_gt({1: (4, 40, 40)}, [(1, 1, [SQ] * 4), (1, 2, [other, other, None, other])])
    res = make_results([(1, 1, 0.9, [SQ] * 4), (1, 2, 0.8, [other, other, None, other])])
    m, table = evaluate_ytvis(gt, res)
    check(m, AP=100, AP50=100, AP75=100, APs=100, APm=None, APl=None, AR1=100, AR10=100)
    assert "maxDets=  1" in table and "area=medium" in table


def test_track_present_in_half_the_frames():
    # GT in 4 frames, prediction equal in frames 0-1 and absent in 2-3:
    # ST-IoU = (100+100) / (100+100+100+100) = 0.5 -> only the 0.50 threshold passes (1/10).
    gt = make_gt({1: (4, 40, 40)}, [(1, 1, [SQ] * 4)])
    res = make_results([(1, 1, 0.9, [SQ, SQ, None, None])])
    m, _ = evaluate_ytvis(gt, res)
    check(m, AP=10, AP50=100, AP75=0, APs=10, AR1=10, AR10=10)


def test_prediction_in_frames_without_gt_adds_to_the_union():
    # GT present in frames 0, 1 (None in 2); prediction also in frame 2:
    # ST-IoU = 200 / 300 = 2/3 -> thresholds .50 .55 .60 .65 pass (4/10).
    gt = make_gt({1: (3, 40, 40)}, [(1, 1, [SQ, SQ, None])])
    res = make_results([(1, 1, 0.9, [SQ, SQ, SQ])])
    m, _ = evaluate_ytvis(gt, res)
    check(m, AP=40, AP50=100, AP75=0)


def test_shifted_mask_known_spatio_temporal_iou():
    # Frame 0 shifted by 4 px: intersection 60, union 140; frame 1 exact: 100 / 100.
    # ST-IoU = 160 / 240 = 2/3 (the mean of per-frame IoUs, 0.714, would pass 5 thresholds).
    shifted = np.roll(SQ, 4, axis=1)
    assert (shifted & SQ).sum() == 60 and (shifted | SQ).sum() == 140
    iou = spatio_temporal_iou([[rle(shifted), rle(SQ)]], [[rle(SQ), rle(SQ)]])
    assert iou.shape == (1, 1) and iou[0, 0] == pytest.approx(160 / 240, abs=1e-12)
    gt = make_gt({1: (2, 40, 40)}, [(1, 1, [SQ, SQ])])
    m, _ = evaluate_ytvis(gt, make_results([(1, 1, 0.9, [shifted, SQ])]))
    check(m, AP=40, AP50=100, AP75=0)


def test_two_categories_average():
    # Category 1 perfect (AP 100); category 2 at ST-IoU 0.5 (AP 10): mean 55.
    # A prediction of the wrong category is a false positive there, not a match.
    b = rect(40, 40, 20, 20, 30, 30)
    gt = make_gt({1: (4, 40, 40)}, [(1, 1, [SQ] * 4), (1, 2, [b] * 4)])
    res = make_results([(1, 1, 0.9, [SQ] * 4), (1, 2, 0.8, [b, b, None, None])])
    check(evaluate_ytvis(gt, res)[0], AP=55, AP50=100, AP75=50, AR1=55)
    res_wrong = make_results([(1, 1, 0.9, [SQ] * 4), (1, 1, 0.8, [b] * 4)])
    check(evaluate_ytvis(gt, res_wrong)[0], AP=50, AR10=50)


def test_video_without_predictions():
    # Two videos with one GT track each; only video 1 predicted (perfectly): recall 1/2,
    # precision 1 up to it -> 51 of the 101 recall points have precision 1.
    gt = make_gt({1: (2, 40, 40), 2: (2, 40, 40)}, [(1, 1, [SQ] * 2), (2, 1, [SQ] * 2)])
    m, _ = evaluate_ytvis(gt, make_results([(1, 1, 0.9, [SQ] * 2)]))
    check(m, AP=100 * 51 / 101, AR1=50, AR10=50)
    check(evaluate_ytvis(gt, [])[0], AP=0, AR10=0)


def test_area_ranges_use_mean_area_over_present_frames():
    H = W = 300
    small = rect(H, W, 0, 0, 100, 100)  # 10000 < 128^2
    mid = rect(H, W, 0, 0, 150, 150)  # 22500
    large = rect(H, W, 0, 0, 260, 260)  # 67600 > 256^2
    mid_mean = rect(H, W, 0, 0, 100, 200)  # 20000, present in 1 of 2 frames: mean 20000
    gt = make_gt({1: (2, H, W), 2: (2, H, W), 3: (2, H, W), 4: (2, H, W)},
                 [(1, 1, [small, small]), (2, 1, [mid, mid]), (3, 1, [large, large]),
                  (4, 1, [mid_mean, None])])
    # Only the track whose mean area is medium over its present frames (it would be small if
    # absent frames counted as 0 area) is predicted.
    m, _ = evaluate_ytvis(gt, make_results([(4, 1, 0.9, [mid_mean, None])]))
    check(m, APs=0, APm=100 * 51 / 101, APl=0, AR10=25)
    perfect = make_results([(1, 1, .9, [small] * 2), (2, 1, .8, [mid] * 2),
                            (3, 1, .7, [large] * 2), (4, 1, .6, [mid_mean, None])])
    check(evaluate_ytvis(gt, perfect)[0], AP=100, APs=100, APm=100, APl=100)


def test_ar1_against_ar10_with_several_predictions():
    masks = [rect(40, 40, 0, 0, 10, 10), rect(40, 40, 20, 0, 30, 10),
             rect(40, 40, 0, 20, 10, 30)]
    gt = make_gt({1: (2, 40, 40)}, [(1, 1, [m, m]) for m in masks])
    res = make_results([(1, 1, s, [m, m]) for s, m in zip((0.9, 0.8, 0.7), masks)])
    check(evaluate_ytvis(gt, res)[0], AP=100, AR1=100 / 3, AR10=100)


def test_gt_formats_uncompressed_rle_polygon_and_crowd():
    sq_poly = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]]
    poly_rle = to_rle(sq_poly, 40, 40)
    assert mask_util.area(poly_rle) > 0
    assert to_rle(None, 40, 40) is None
    assert (mask_util.decode(to_rle(uncompressed_rle(SQ), 40, 40)) == SQ).all()
    gt = make_gt({1: (2, 40, 40)}, [(1, 1, [SQ, SQ])], encode=uncompressed_rle)
    gt["annotations"].append({"id": 9, "video_id": 1, "category_id": 1, "iscrowd": 0,
                              "segmentations": [sq_poly, None]})
    poly_mask = mask_util.decode(poly_rle).astype(bool)
    res = make_results([(1, 1, 0.9, [SQ, SQ]), (1, 1, 0.8, [poly_mask, None])])
    check(evaluate_ytvis(gt, res)[0], AP=100)
    # A crowd GT track is ignored: neither a miss nor does its match count as a false positive.
    corner = rect(40, 40, 30, 30, 40, 40)
    crowd = make_gt({1: (2, 40, 40)}, [(1, 1, [SQ, SQ]), (1, 1, [corner, corner], 1)])
    check(evaluate_ytvis(crowd, make_results([(1, 1, 0.9, [SQ, SQ])]))[0], AP=100, AR10=100)
    with pytest.raises(ValueError, match="segmentation"):
        to_rle("bad", 40, 40)


def test_malformed_results_raise_naming_the_row():
    gt = make_gt({1: (2, 40, 40)}, [(1, 1, [SQ, SQ])])
    with pytest.raises(ValueError, match="result 0 .*3 segmentations.*2 frames"):
        evaluate_ytvis(gt, make_results([(1, 1, 0.9, [SQ, SQ, SQ])]))
    with pytest.raises(ValueError, match="video 7"):
        evaluate_ytvis(gt, make_results([(7, 1, 0.9, [SQ, SQ])]))
    with pytest.raises(ValueError, match="result 0 .*size \\[20, 20\\].*40x40"):
        evaluate_ytvis(gt, make_results([(1, 1, 0.9, [np.ones((20, 20), bool)] * 2)]))
    with pytest.raises(ValueError, match="'score'|'segmentations'"):
        evaluate_ytvis(gt, [{"video_id": 1, "category_id": 1, "score": 1.0}])
    no_size = {"counts": rle(SQ)["counts"]}
    for counts in (no_size["counts"], [0, 16]):  # compressed, uncompressed
        row = {"video_id": 1, "category_id": 1, "score": 1.0,
               "segmentations": [{"counts": counts}, None]}
        with pytest.raises(ValueError, match="result 0 .*needs 'size'"):
            evaluate_ytvis(gt, [row])


# ---------------------------------------------------------------- brute force
IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)
AREAS = {"all": (0, 1e10), "small": (0, 128 ** 2), "medium": (128 ** 2, 256 ** 2),
         "large": (256 ** 2, 1e10)}


def brute_st_iou(d, g):
    inter = union = 0
    for dm, gm in zip(d, g):
        dm = np.zeros(1, bool) if dm is None else dm
        gm = np.zeros(1, bool) if gm is None else gm
        inter += np.logical_and(dm, gm).sum()
        union += np.logical_or(dm, gm).sum()
    return inter / union if union else 0.0


def brute_area(masks):
    present = [m.sum() for m in masks if m is not None]
    return float(np.mean(present)) if present else 0.0


def brute_force(gt_tracks, preds, videos, categories):
    """Independent YouTube-VIS AP/AR from the definitions (plain numpy on decoded masks).

    gt_tracks: (video, cat, masks, crowd); preds: (video, cat, score, masks).
    """
    def match(v, c, t, rng, max_det):
        """Greedy matching by score at threshold t -> (scores, tp, ignored) of kept dets,
        number of non-ignored GT."""
        gts = [g for g in gt_tracks if g[0] == v and g[1] == c]
        g_ign = [bool(g[3]) or not rng[0] <= brute_area(g[2]) <= rng[1] for g in gts]
        dts = sorted([p for p in preds if p[0] == v and p[1] == c], key=lambda p: -p[2])
        dts = dts[:max_det]  # stable sort: ties keep input order
        taken = [False] * len(gts)
        out = []
        for d in dts:
            # GT tracks still free (a crowd one stays free) at IoU >= t; a non-ignored one is
            # preferred, then the highest IoU.
            free = [(j, brute_st_iou(d[3], g[2])) for j, g in enumerate(gts)
                    if not taken[j] or g[3]]
            cands = [(j, iou) for j, iou in free if iou >= min(t, 1 - 1e-10)]
            pool = [c for c in cands if not g_ign[c[0]]] or cands
            if pool:
                best = max(pool, key=lambda c: c[1])[0]
                taken[best] = True
                out.append((d[2], True, g_ign[best]))
            else:  # a false positive, ignored outside the area range
                out.append((d[2], False, not rng[0] <= brute_area(d[3]) <= rng[1]))
        return out, sum(not i for i in g_ign)

    def ap_ar(rng, max_det, thrs=IOU_THRS):
        aps, ars = [], []
        for c in categories:
            if not any(g[1] == c for g in gt_tracks):
                continue
            cat_ap, cat_ar, n_gt_any = [], [], 0
            for t in thrs:
                dets, n_gt = [], 0
                for v in videos:
                    d, n = match(v, c, t, rng, max_det)
                    dets += d
                    n_gt += n
                n_gt_any = n_gt
                if n_gt == 0:
                    break
                dets = [d for d in sorted(dets, key=lambda d: -d[0]) if not d[2]]
                tp = np.cumsum([d[1] for d in dets]).astype(float)
                fp = np.cumsum([not d[1] for d in dets]).astype(float)
                rc = tp / n_gt
                pr = tp / np.maximum(tp + fp, np.spacing(1))
                prec = [max([p for p, r in zip(pr, rc) if r >= rt], default=0.0)
                        for rt in REC_THRS]
                cat_ap.append(np.mean(prec))
                cat_ar.append(rc[-1] if len(rc) else 0.0)
            if n_gt_any:
                aps.append(np.mean(cat_ap))
                ars.append(np.mean(cat_ar))
        return (100 * np.mean(aps) if aps else float("nan"),
                100 * np.mean(ars) if ars else float("nan"))

    return {"AP": ap_ar(AREAS["all"], 100)[0], "AP50": ap_ar(AREAS["all"], 100, [0.5])[0],
            "AP75": ap_ar(AREAS["all"], 100, [0.75])[0],
            "APs": ap_ar(AREAS["small"], 100)[0], "APm": ap_ar(AREAS["medium"], 100)[0],
            "APl": ap_ar(AREAS["large"], 100)[0], "AR1": ap_ar(AREAS["all"], 1)[1],
            "AR10": ap_ar(AREAS["all"], 10)[1]}


def random_case(rng):
    H, W = 400, 400  # rectangles of 20..400 px sides: all three area ranges occur
    videos = {v: (int(rng.integers(2, 5)), H, W) for v in (1, 2, 3)}
    categories = [1, 2, 3]

    def random_masks(T):
        out = []
        for _ in range(T):
            if rng.random() < 0.25:
                out.append(None)
                continue
            h, w = rng.integers(20, 401, size=2)
            y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            out.append(rect(H, W, y, x, y + h, x + w))
        return out

    gt_tracks, preds = [], []
    for v, (T, _, _) in videos.items():
        for _ in range(rng.integers(0, 5)):
            gt_tracks.append((v, int(rng.choice(categories[:2])), random_masks(T),
                              int(rng.random() < 0.1)))
        for g in [g for g in gt_tracks if g[0] == v]:  # perturbed copies of the GT
            for _ in range(rng.integers(0, 3)):
                masks = [None if m is None or rng.random() < 0.15 else
                         np.roll(m, int(rng.integers(-30, 31)), axis=int(rng.integers(0, 2)))
                         for m in g[2]]
                cat = g[1] if rng.random() < 0.85 else int(rng.choice(categories))
                preds.append((v, cat, float(rng.random()), masks))
        for _ in range(rng.integers(0, 3)):  # pure false positives
            preds.append((v, int(rng.choice(categories)), float(rng.random()), random_masks(T)))
    return videos, categories, gt_tracks, preds


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_brute_force_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    videos, categories, gt_tracks, preds = random_case(rng)
    gt = make_gt(videos, gt_tracks, categories,
                 encode=uncompressed_rle if seed % 2 else rle)
    m, _ = evaluate_ytvis(gt, make_results(preds))
    expected = brute_force(gt_tracks, preds, list(videos), categories)
    for k in KEYS:
        if math.isnan(expected[k]):
            assert math.isnan(m[k]), (k, m[k])
        else:
            assert m[k] == pytest.approx(expected[k], abs=1e-6), (k, m[k], expected[k])


def test_brute_force_iou_equals_spatio_temporal_iou():
    rng = np.random.default_rng(7)
    _, _, gt_tracks, preds = random_case(rng)
    for v in (1, 2, 3):
        g = [t[2] for t in gt_tracks if t[0] == v]
        d = [p[3] for p in preds if p[0] == v]
        ious = spatio_temporal_iou([[rle(m) for m in x] for x in d],
                                   [[rle(m) for m in x] for x in g])
        want = np.array([[brute_st_iou(a, b) for b in g] for a in d]).reshape(len(d), len(g))
        np.testing.assert_allclose(ious, want, atol=1e-12)


def test_dense_frames_beyond_255_masks():
    """A frame with 300 tracks on each side (the E. coli colony has 358 cells): pycocotools'
    area() of > 255 masks at once fails under NumPy 2; the IoUs still equal brute force."""
    rng = np.random.default_rng(11)
    n, frames, h, w = 300, 2, 48, 64

    def random_tracks():
        masks = np.zeros((n, frames, h, w), dtype=bool)
        for i in range(n):
            for t in range(frames):
                y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
                masks[i, t, y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = True
        return masks

    d, g = random_tracks(), random_tracks()
    np.testing.assert_array_equal(rle_areas([rle(m) for m in d[:, 0]]), d[:, 0].sum((1, 2)))
    ious = spatio_temporal_iou([[rle(m) for m in x] for x in d], [[rle(m) for m in x] for x in g])
    df, gf = d.reshape(n, -1).astype(np.int64), g.reshape(n, -1).astype(np.int64)
    inter = df @ gf.T
    union = df.sum(1)[:, None] + gf.sum(1)[None, :] - inter
    np.testing.assert_allclose(ious, inter / union, atol=1e-12)


# ---------------------------------------------------------------- identity switches
def test_identity_switch_count_on_a_swap_in_the_middle():
    left, right = rect(40, 40, 0, 0, 20, 10), rect(40, 40, 0, 25, 20, 35)
    gt = make_gt({1: (5, 40, 40)}, [(1, 1, [left] * 5), (1, 1, [right] * 5)])
    # P follows left in frames 0-1, right in 2-4; Q the other way: one switch per GT track.
    res = make_results([(1, 1, 0.9, [left, left, right, right, right]),
                        (1, 1, 0.8, [right, right, left, left, left])])
    ids = identity_switches(gt, res)
    assert ids["ID switches"] == 2 and ids["GT track-frames"] == 10
    # An unmatched frame (prediction missing) is no switch when the same track comes back;
    # a new track taking over the GT is.
    res = make_results([(1, 1, 0.9, [left, left, None, left, None]),
                        (1, 1, 0.8, [right] * 5), (1, 1, 0.7, [None, None, None, None, left])])
    ids = identity_switches(gt, res)
    assert ids["ID switches"] == 1 and ids["per_video"][1] == (1, 10)
    # Identity from track_id when the rows carry it: the same id in two rows is no switch.
    res = make_results([(1, 1, 0.9, [left, left, None, None, None]),
                        (1, 1, 0.9, [None, None, left, left, left])])
    res[0]["track_id"] = res[1]["track_id"] = 4
    assert identity_switches(gt, res)["ID switches"] == 0


# ---------------------------------------------------------------- submission and evaluator
def _tracks_for(masks_per_track, categories, scores):
    tracks = []
    for i, (masks, c, s) in enumerate(zip(masks_per_track, categories, scores)):
        tm = [None if m is None else torch.from_numpy(m) for m in masks]
        boxes = [None if m is None else torch.zeros(4) for m in masks]
        tracks.append(VideoTrack(i, c, s, boxes, tm, [None if m is None else s for m in masks]))
    return tracks


def test_results_from_tracks_and_zip_round_trip(tmp_path):
    tracks = _tracks_for([[SQ, None, SQ], [None, None, None]], [0, 1], [0.7, 0.6])
    rows = results_from_tracks(5, tracks, {0: 3, 1: 8})
    assert len(rows) == 1  # the mask-less track is left out
    assert rows[0]["video_id"] == 5 and rows[0]["category_id"] == 3
    assert rows[0]["score"] == pytest.approx(0.7)
    assert rows[0]["segmentations"][1] is None
    assert isinstance(rows[0]["segmentations"][0]["counts"], str)
    assert (mask_util.decode(rows[0]["segmentations"][2]) == SQ).all()
    rows[0]["track_id"] = 0  # extra keys are not written
    json_path, zip_path = write_submission(rows, str(tmp_path / "out"))
    with zipfile.ZipFile(zip_path) as z:
        assert z.namelist() == ["results.json"]
        loaded = json.loads(z.read("results.json"))
    with open(json_path) as f:
        assert json.load(f) == loaded
    del rows[0]["track_id"]
    assert loaded == rows


def test_evaluator_on_a_registered_dataset(tmp_path):
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import print_csv_format

    b = rect(40, 40, 20, 20, 30, 30)
    gt = make_gt({1: (3, 40, 40), 2: (2, 40, 40)},
                 [(1, 3, [SQ] * 3), (1, 8, [b, b, None]), (2, 3, [b, b])], categories=(3, 8))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    name = "test_ytvis_eval_tiny"
    MetadataCatalog.get(name).set(json_file=str(gt_path), evaluator_type="ytvis",
                                  thing_classes=["c3", "c8"],
                                  thing_dataset_id_to_contiguous_id={3: 0, 8: 1})
    ev = YTVISEvaluator(name, output_dir=str(tmp_path / "inference"))
    ev.reset()
    ev.process([{"video_id": 1}], [{"tracks": _tracks_for([[SQ] * 3, [b, b, None]], [0, 1],
                                                           [0.9, 0.8]),
                                     "image_size": (40, 40), "num_frames": 3}])
    ev.process([{"video_id": 2}], [{"tracks": _tracks_for([[b, b]], [0], [0.9]),
                                     "image_size": (40, 40), "num_frames": 2}])
    out = ev.evaluate()
    segm = out["segm"]
    check(segm, AP=100, AP50=100, AR1=100, APm=None)
    assert segm["ID switches"] == 0 and segm["GT track-frames"] == 7
    print_csv_format(out)
    with zipfile.ZipFile(tmp_path / "inference" / "results.zip") as z:
        assert len(json.loads(z.read("results.json"))) == 3
    # A split without GT annotations (server-only): the submission, no metrics.
    gt_path.write_text(json.dumps(dict(gt, annotations=[])))
    assert ev.evaluate() == {}


# ---------------------------------------------------------------- command line
def _run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "ytvis_eval.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_tool_prints_table_and_json_last_line(tmp_path):
    """The command as a user runs it, on the submission zip; a missing file exits non-zero
    naming it."""
    gt = make_gt({1: (4, 40, 40)}, [(1, 1, [SQ] * 4)])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _, zip_path = write_submission(make_results([(1, 1, 0.9, [SQ, SQ, None, None])]),
                                   str(tmp_path))
    run = _run_tool("--gt-json", str(tmp_path / "gt.json"), "--results-json", zip_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert "Average Precision" in run.stdout and "ID switches 0 over 4" in run.stdout
    last = json.loads(lines[-1])
    assert list(last) == KEYS
    assert last["AP"] == pytest.approx(10) and last["AP50"] == pytest.approx(100)
    assert last["APm"] is None
    missing = tmp_path / "nope.json"
    run = _run_tool("--gt-json", str(missing), "--results-json", zip_path)
    assert run.returncode == 1 and str(missing) in run.stderr


def test_tool_errors_name_the_file(tmp_path, capsys):
    # In process (the same main() the command runs; a subprocess costs seconds of imports).
    tool = load_script("tools/ytvis_eval.py", "ytvis_eval_tool")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(make_gt({1: (2, 40, 40)}, [(1, 1, [SQ] * 2)])))
    missing = tmp_path / "nope.json"
    assert tool.main(["--gt-json", str(gt), "--results-json", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert tool.main(["--gt-json", str(bad), "--results-json", str(gt)]) == 1
    assert str(bad) in capsys.readouterr().err
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(make_results([(1, 1, 0.9, [SQ, None])])))
    assert tool.main(["--gt-json", str(gt), "--results-json", str(ok)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["AP"] == pytest.approx(10)
    wrong_len = tmp_path / "res.json"
    wrong_len.write_text(json.dumps(make_results([(1, 1, 0.9, [SQ] * 3)])))
    assert tool.main(["--gt-json", str(gt), "--results-json", str(wrong_len)]) == 1
    assert str(wrong_len) in capsys.readouterr().err
