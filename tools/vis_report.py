#!/usr/bin/env python3
"""Tracking numbers of QueryInst-VIS on the held-out nuclei pseudo-video, for both trackers.

For each tracker, on ``nuclei_dsb_video_val`` (docs/method.md §6.5), frames at their own
192-px scale:

- ``QueryCosineTracker``: the image model of ``--image-config`` (``make demo``'s), no
  video training;
- ``EmbeddingTracker``: ``--vis-config``, that image model fine-tuned on the training
  pseudo-videos with a track head;

it reports YouTube-VIS AP and AP50, identity switches (and the GT track-frames they are out
of), the same model's COCO mask AP on the same frames segmented as images, and the tracking
overhead per frame: :meth:`QueryInstVIS.track_frame` against :meth:`detect_frame` (the image
model's part of it), timed side by side, frame after frame, ``--repeats`` times. The goals
of issue 12 are checked: VIS AP >= 0.8 x the frames' mask AP, identity switches < 5% of GT
track-frames, overhead < 10%. A last row tracks the VIS model's detections with the GT
identities as embeddings: the association is then perfect, so its identity switches are
those the detections alone cause.

Both models are trained first if their ``model_final.pth`` is missing (``train_net.py
--resume``; the image model ~8 min, the VIS fine-tuning ~9 min on 2 CPU cores). Run from
the repository root::

    python tools/vis_report.py [--repeats 3] [--json-out F.json] [--md-out F.md]

Exit status 1 if a goal is missed (the numbers are still written), 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # train_net.py (it puts the package of this checkout on the path)
sys.path.insert(0, os.path.join(_REPO, "tools"))  # run_demo.py

import numpy as np  # noqa: E402
import train_net  # noqa: E402  (registers the model and the datasets)
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import (  # noqa: E402
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402

from queryinst import QueryInstDatasetMapper, add_queryinst_config  # noqa: E402
from queryinst import video  # noqa: E402
from queryinst.config_loading import CONFIG_ERRORS, merge_config  # noqa: E402
from run_demo import pseudo_video_model  # noqa: E402  (tools/, this script's folder)

IMAGE_CONFIG = os.path.join("configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
VIS_CONFIG = os.path.join("configs", "bundled", "queryinst_vis_MNV2_FPN_nuclei.yaml")
DATASET = "nuclei_dsb_video_val"
GOALS = {"VIS AP / frame mask AP": 0.8, "ID switches / GT track-frames": 0.05,
         "tracking overhead": 0.10}


def load_cfg(config_file: str, opts=()):
    """A config with QueryInst's keys, ``config_file`` and ``opts`` merged (not frozen)."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    return merge_config(cfg, config_file, opts)


def trained_weights(config_file: str, opts=()) -> str:
    """``OUTPUT_DIR/model_final.pth`` of a config, trained (or resumed) first if missing."""
    cfg = load_cfg(config_file, opts)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(final):
        args = default_argument_parser().parse_args(
            ["--config-file", config_file, "--resume", *opts])
        train_net.main(args)
    return final


def frame_dataset(name: str) -> str:
    """Register (once) the frames of a video dataset as an image dataset; returns its name."""
    frames_name = name + "_frames"
    if frames_name not in DatasetCatalog.list():
        def records():
            out = []
            for v in DatasetCatalog.get(name):
                for t, file_name in enumerate(v["file_names"]):
                    out.append({"file_name": file_name, "height": v["height"],
                                "width": v["width"], "image_id": len(out),
                                "annotations": v["annotations"][t]})
            return out

        DatasetCatalog.register(frames_name, records)
        meta = MetadataCatalog.get(name)
        MetadataCatalog.get(frames_name).set(
            thing_classes=meta.thing_classes,
            thing_dataset_id_to_contiguous_id=meta.thing_dataset_id_to_contiguous_id)
    return frames_name


def frame_mask_ap(model, cfg, name: str, out_dir: str) -> float:
    """COCO mask AP of the model's image path on every frame of a video dataset
    (``COCOEvaluator`` writes the frames' COCO json into ``out_dir`` once and reuses it)."""
    frames = frame_dataset(name)
    loader = build_detection_test_loader(cfg, frames, mapper=QueryInstDatasetMapper(cfg, False))
    evaluator = COCOEvaluator(frames, tasks=("segm",), distributed=False, output_dir=out_dir)
    return inference_on_dataset(model, loader, evaluator)["segm"]["AP"]


def overhead(model, video_input: dict, repeats: int) -> dict:
    """Seconds per frame of ``detect_frame`` and ``track_frame``, timed side by side."""
    frames = [{"image": image, "height": video_input["height"], "width": video_input["width"]}
              for image in video_input["image"]]
    detect, track = [], []
    with torch.no_grad():
        for _ in range(repeats):
            model.start_video()
            for frame in frames:
                start = time.perf_counter()
                model.detect_frame(frame)
                middle = time.perf_counter()
                model.track_frame(frame)
                detect.append(middle - start)
                track.append(time.perf_counter() - middle)
    d, t = statistics.median(detect), statistics.median(track)
    return {"detect_s": d, "track_s": t, "overhead": (t - d) / d}


def measure(tracker: str, cfg, weights: str, repeats: int, out_dir: str) -> dict:
    """One row of the table: VIS AP, AP50, identity switches, the frame mask AP and the
    timing of ``cfg``'s model (``weights``) on the held-out pseudo-video; the evaluator's
    files go to ``out_dir/<tracker>``."""
    cfg, model = pseudo_video_model(cfg, weights)
    results, kept = video.track_dataset(
        model, video.build_vis_test_loader(cfg, DATASET),
        video.YTVISEvaluator(DATASET, output_dir=os.path.join(out_dir, tracker),
                             distributed=False))
    segm = results["segm"]
    row = {"tracker": tracker, "weights": weights, "VIS AP": segm["AP"],
           "VIS AP50": segm["AP50"], "ID switches": segm["ID switches"],
           "GT track-frames": segm["GT track-frames"],
           "frame mask AP": frame_mask_ap(model, cfg, DATASET, os.path.join(out_dir, tracker))}
    row.update(overhead(model, kept[0][0], repeats))
    return row


def gt_identity_embeddings(masks: torch.Tensor, objects: list, index: dict) -> torch.Tensor:
    """One-hot embeddings (width ``len(index)``, position ``index[track id]``) of the GT
    identity each detection's mask overlaps most (mask IoU >= 0.5); a random unit vector for
    detections of no GT object."""
    dim = max(len(index), 1)
    from pycocotools import mask as mask_util

    emb = torch.nn.functional.normalize(torch.randn(len(masks), dim), dim=1)
    if not objects or not len(masks):
        return emb
    gt = torch.as_tensor(np.stack([mask_util.decode(o["segmentation"]) for o in objects]),
                         dtype=torch.bool)
    pred = masks.cpu().flatten(1).float()
    inter = pred @ gt.flatten(1).float().T
    union = pred.sum(1, keepdim=True) + gt.flatten(1).sum(1) - inter
    iou = inter / union.clamp(min=1)
    best, which = iou.max(1)
    for i in torch.nonzero(best >= 0.5).flatten().tolist():
        emb[i] = 0
        emb[i, index[objects[which[i]]["id"]]] = 1
    return emb


def gt_identity_row(cfg, weights: str, out_dir: str) -> dict:
    """Identity switches with the GT identities as embeddings: the model's own detections and
    tracking rules, gates included (QueryCosineTracker at cosine >= 0.99, so only detections
    of one GT object link up), so association by identity is perfect wherever the gates
    allow a link. The switches left are due to the detections: frames
    where an object has no mask at IoU >= 0.5, duplicates. (Detections of no GT object get
    random embeddings and short tracks, so this row's AP means nothing and is not reported.)"""
    cfg = cfg.clone()  # the track head stays in the model, unused by this tracker
    cfg.MODEL.QUERYINST_VIS.TRACKER = "QueryCosineTracker"
    cfg.MODEL.QUERYINST_VIS.TRACKING.COSINE_THRESH = 0.99
    cfg, model = pseudo_video_model(cfg, weights)
    videos = {v["video_id"]: v for v in DatasetCatalog.get(DATASET)}
    evaluator = video.YTVISEvaluator(DATASET, output_dir=os.path.join(out_dir, "gt_identity"),
                                     distributed=False)
    with torch.no_grad():
        for (inp,) in video.build_vis_test_loader(cfg, DATASET):
            record = videos[inp["video_id"]]
            ids = sorted({o["id"] for frame in record["annotations"] for o in frame})
            index = {track_id: i for i, track_id in enumerate(ids)}
            model.start_video()
            for t, image in enumerate(inp["image"]):
                det = model.detect_frame(
                    {"image": image, "height": inp["height"], "width": inp["width"]})
                det.track_embeddings = gt_identity_embeddings(
                    det.pred_masks, record["annotations"][t], index)
                model.tracker.update(det)
            evaluator.process([inp], [{"tracks": model.finish_video()}])
    segm = evaluator.evaluate()["segm"]
    return {"tracker": "GT identities as embeddings (same detections and gates), "
                       "EmbeddingTracker model",
            "ID switches": segm["ID switches"], "GT track-frames": segm["GT track-frames"]}


def goals(row: dict) -> dict:
    """Each goal of issue 12 (``GOALS``): {name: {"value", "goal", "met"}} for one row."""
    values = {"VIS AP / frame mask AP": row["VIS AP"] / max(row["frame mask AP"], 1e-9),
              "ID switches / GT track-frames": row["ID switches"] / row["GT track-frames"],
              "tracking overhead": row["overhead"]}
    return {k: {"value": v, "goal": GOALS[k],
                "met": v >= GOALS[k] if k.startswith("VIS") else v < GOALS[k]}
            for k, v in values.items()}


def markdown(rows: list, command: str) -> str:
    """The rows as a markdown table, then the command that measured them."""
    lines = [
        "| tracker | VIS AP | AP50 | ID switches / GT track-frames | frame mask AP | "
        "VIS AP / mask AP | detect ms/frame | track ms/frame | overhead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "frame mask AP" not in r:  # GT identities: the switches the detections cause
            lines.append(f"| {r['tracker']} | | | {r['ID switches']} / {r['GT track-frames']}"
                         " | | | | | |")
            continue
        lines.append(
            f"| {r['tracker']} | {r['VIS AP']:.1f} | {r['VIS AP50']:.1f} | "
            f"{r['ID switches']} / {r['GT track-frames']} | {r['frame mask AP']:.1f} | "
            f"{r['VIS AP'] / max(r['frame mask AP'], 1e-9):.2f} | {1e3 * r['detect_s']:.1f} | "
            f"{1e3 * r['track_s']:.1f} | {100 * r['overhead']:+.1f}% |")
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-config", default=IMAGE_CONFIG, metavar="FILE")
    parser.add_argument("--vis-config", default=VIS_CONFIG, metavar="FILE")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes over the video")
    parser.add_argument("--json-out", metavar="FILE")
    parser.add_argument("--md-out", metavar="FILE")
    args = parser.parse_args(argv)
    for path in (args.image_config, args.vis_config):  # both read, before anything is trained
        load_cfg(path)  # a missing file, a python tag, a misspelled key: one ERROR line

    image_weights = trained_weights(args.image_config)
    vis_opts = ["MODEL.WEIGHTS", image_weights]
    vis_weights = trained_weights(args.vis_config, vis_opts)
    image_cfg = load_cfg(args.image_config)
    vis_cfg = load_cfg(args.vis_config, vis_opts)
    out_dir = os.path.join(vis_cfg.OUTPUT_DIR, "vis_report")
    rows = [measure("QueryCosineTracker", video.use_query_tracker(image_cfg), image_weights,
                    args.repeats, out_dir),
            measure("EmbeddingTracker", vis_cfg, vis_weights, args.repeats, out_dir)]
    for row in rows:
        row["goals"] = goals(row)
    rows.append(gt_identity_row(vis_cfg, vis_weights, out_dir))
    command = "python tools/vis_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, command.strip())
    print(table)
    print(json.dumps({"dataset": DATASET, "rows": rows}))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"dataset": DATASET, "rows": rows}, f, indent=1)
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(table)
    missed = [f"{r['tracker']}: {k}" for r in rows for k, g in r.get("goals", {}).items()
              if not g["met"]]
    for m in missed:
        print(f"[vis_report] goal missed: {m}")
    return 1 if missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CONFIG_ERRORS as e:  # a missing --config-file, a misspelled key: one line
        sys.exit(f"ERROR: {e}")
