#!/usr/bin/env python
"""Tune the online tracker of a trained QueryInst-VIS model without retraining.

The image model runs once over every frame of the given video datasets; its detections
(boxes, scores, classes, track embeddings, masks as compressed RLE) are kept. Each tracker
setting then only replays the tracker over the kept detections (``OnlineTracker.update``) and
scores the tracks with the YouTube-VIS metric and identity switches (docs/method.md §6.4), so
a grid of settings costs seconds per setting. Choose the settings on the training clip (or a
part of it), then confirm them once on the held-out clip.

Usage::

    python tools/tune_tracker.py --config-file configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml \\
        --datasets ctc_psc_video_train ctc_psc_video_val \\
        --grid MIN_IOU=0,0.1,0.3 NMS_THRESH=0,0.5 --out output/tune.json \\
        --opts MODEL.WEIGHTS output/ctc_psc_MNV2_vis/model_final.pth

It prints one line per (setting, dataset) and writes all of them to ``--out`` as json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "tools"))

import train_net  # noqa: E402,F401  (registers the model and the bundled datasets)
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from queryinst import add_queryinst_config, video  # noqa: E402
from queryinst.checkpoint import CheckpointError, QueryInstCheckpointer  # noqa: E402
from queryinst.config_loading import CONFIG_ERRORS, merge_config  # noqa: E402
from queryinst.video.evaluation.evaluator import load_json  # noqa: E402
from queryinst.video.evaluation.ytvis_metric import evaluate_ytvis, identity_switches  # noqa: E402

from choose_tracker import make_row  # noqa: E402  (the row format choose_tracker reads)

TRACKING_KEYS = ("SCORE_WEIGHT", "IOU_WEIGHT", "LABEL_WEIGHT", "DET_SCORE_THRESH",
                 "INIT_SCORE_THRESH", "MAX_MISSED", "MIN_IOU", "NMS_THRESH",
                 "COSINE_THRESH")


def detect_videos(model, cfg, dataset_name: str) -> list[dict]:
    """The image model's detections of every frame of every video of ``dataset_name``.

    Returns:
        list of {"video_id", "frames": list of Instances (no ``pred_masks``), "rles": list
        (per frame) of lists of compressed RLE dicts, one per detection row}.
    """
    out = []
    with torch.no_grad():
        for (inp,) in video.build_vis_test_loader(cfg, dataset_name):
            frames, rles = [], []
            for image in inp["image"]:
                det = model.detect_frame({"image": image, "height": inp["height"],
                                          "width": inp["width"]})
                rles.append([video.encode_mask(m) for m in det.pred_masks])
                det.remove("pred_masks")
                frames.append(det)
            out.append({"video_id": inp["video_id"], "frames": frames, "rles": rles})
    return out


def replay(tracker, videos: list[dict], to_dataset_id: dict | None) -> list[dict]:
    """Track the kept detections with ``tracker``; YouTube-VIS result rows (with track_id)."""
    results = []
    for v in videos:
        tracker.reset()
        T = len(v["frames"])
        segs: dict[int, list] = {}
        for t, (det, rles) in enumerate(zip(v["frames"], v["rles"])):
            row_of = {int(q): r for r, q in enumerate(det.query_indices.tolist())}
            out = tracker.update(det)
            for q, i in zip(out.query_indices.tolist(), out.track_ids.tolist()):
                segs.setdefault(i, [None] * T)[t] = rles[row_of[int(q)]]
        for tr in tracker.finish():
            category = int(tr.category)
            if to_dataset_id is not None:
                category = int(to_dataset_id[category])
            results.append({"video_id": int(v["video_id"]), "category_id": category,
                            "score": float(tr.score), "segmentations": segs[tr.track_id],
                            "track_id": tr.track_id})
    return results


def parse_grid(items: list[str]) -> list[dict]:
    """``KEY=v1,v2`` items -> every combination as {KEY: value}; keys of TRACKING_KEYS."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if key not in TRACKING_KEYS or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=v1,v2 with KEY one of "
                             f"{', '.join(TRACKING_KEYS)}")
        axes.append([(key, float(x)) for x in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def check_grid(grid: list[dict], cfg) -> None:
    """Refuse settings the kept detections cannot show.

    Raises:
        ValueError: a DET_SCORE_THRESH below the config's (the model keeps only detections
            at or above the config's value, so a lower one would silently act as it).
    """
    floor = cfg.MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH
    low = sorted({s["DET_SCORE_THRESH"] for s in grid if s.get("DET_SCORE_THRESH", floor) < floor})
    if low:
        raise ValueError(f"--grid DET_SCORE_THRESH {low} is below the config's {floor}: the "
                         f"detections are kept at that threshold; lower it with --opts "
                         f"MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH {min(low)}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--datasets", nargs="+", required=True, help="video datasets")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=v1,v2",
                        help="MODEL.QUERYINST_VIS.TRACKING keys and their values to try")
    parser.add_argument("--out", help="json file for all rows")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    grid = parse_grid(args.grid)
    check_grid(grid, cfg)
    for name in args.datasets:
        if name not in DatasetCatalog.list() or not video.is_video_dataset(name):
            raise ValueError(f"--datasets {name}: not a registered video dataset "
                             f"(e.g. ctc_psc_video_train, ctc_psc_video_val)")
    model = build_model(cfg).eval()
    QueryInstCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    data = {}
    for name in args.datasets:
        start = time.perf_counter()
        meta = MetadataCatalog.get(name)
        to_contiguous = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        data[name] = (detect_videos(model, cfg, name), load_json(meta.json_file, "GT json"),
                      {v: k for k, v in to_contiguous.items()} if to_contiguous else None)
        print(f"[tune] {name}: detections in {time.perf_counter() - start:.1f}s", flush=True)
    rows = []
    for setting in grid:
        c = cfg.clone()
        c.defrost()
        for key, value in setting.items():
            c.MODEL.QUERYINST_VIS.TRACKING[key] = (int(value) if key == "MAX_MISSED"
                                                   else value)
        tracker = video.build_tracker(c)
        for name, (videos, gt, to_dataset_id) in data.items():
            results = replay(tracker, videos, to_dataset_id)
            metrics, _ = evaluate_ytvis(gt, results)
            ids = identity_switches(gt, results)
            row = make_row(name, setting, AP=metrics["AP"], AP50=metrics["AP50"],
                           tracks=len(results), **{k: ids[k] for k in ("ID switches",
                                                                        "GT track-frames")})
            rows.append(row)
            print("[tune] " + json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    try:
        main()
    except (*CONFIG_ERRORS, CheckpointError, ValueError) as e:
        sys.exit(f"ERROR: {e}")
