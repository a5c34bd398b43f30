#!/usr/bin/env python3
"""QueryInst-VIS on the held-out real time-lapse clip, compared with the field, per seed.

For each seed, on the held-out PhC-C2DL-PSC clip (``ctc_psc_video_val``, frames t035-t049)
and its frames as images (``ctc_psc_val``):

(a) Our tracks (the trained QueryInstVIS checkpoint of
    ``configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml``, tracked through the model's own
    online path) as Cell Tracking Challenge label images + ``res_track.txt``; the CTC
    measures DET, SEG, TRA and LNK against the clip's reference (traccuracy; SEG by
    py-ctcmetrics) and traccuracy's counts of the link errors behind TRA and LNK (links
    not in the reference, reference links missed, links of the wrong kind), next to
    ``YTVISEvaluator``'s VIS AP and identity switches.
(b) laptrack (LAP linking of centroids, gap closing) on the same model's per-frame masks,
    without our tracker: the same measures. Both take the detections scoring at least
    ``--score-threshold`` among those the tracker receives, so both have the same masks and
    differ only in linking. laptrack's link cut-off: ``--laptrack-distance`` pixels (default:
    the median radius of the training clip's cells); ``--laptrack-sweep`` also reports other
    cut-offs.
(c) Detectron2's Mask R-CNN with the same ImageNet MobileNetV2-FPN backbone, data and
    input size (``configs/bundled/mask_rcnn_MNV2_FPN_ctc_psc.yaml``; 330 iterations, as
    make demo's QueryInst; the results pages use shorter schedules of equal time): frame
    box / mask AP on the held-out frames
    (``COCOEvaluator``), next to QueryInst's.

Checkpoints: ``--queryinst-weights`` and ``--mask-rcnn-weights`` are paths with ``{seed}``;
a missing one is trained first (``train_net.py --resume``, ``SEED`` = the seed, so a run
stopped part-way continues) when ``--train`` is given, else the run stops with an ERROR line. "random" uses the untrained model (tests).

Writes ``OUT_DIR/seed<k>/`` (CTC folders ``ours``, ``laptrack``, ``results.json``),
``OUT_DIR/results.json`` and the Markdown report (``--markdown``, default
``OUT_DIR/real_video.md``) with mean ± std over the seeds, the commands and versions.

Example::

    python tools/compare_real_video.py --seeds 1 2 3 --train \\
        --markdown docs/results/real_video.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
sys.path[:0] = [_TOOLS, os.path.join(_REPO, "projects", "QueryInst")]

from qi_bench.real_video import EDGE_ERRORS  # noqa: E402  (numpy only; the rest is lazy)

QI_CONFIG = os.path.join("configs", "bundled", "queryinst_vis_MNV2_FPN_ctc_psc.yaml")
MRCNN_CONFIG = os.path.join("configs", "bundled", "mask_rcnn_MNV2_FPN_ctc_psc.yaml")
VIDEO, IMAGES, TRAIN_VIDEO = "ctc_psc_video_val", "ctc_psc_val", "ctc_psc_video_train"
CTC_KEYS = ("DET", "SEG", "TRA", "LNK")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--queryinst-config", default=QI_CONFIG)
    p.add_argument("--mask-rcnn-config", default=MRCNN_CONFIG)
    p.add_argument("--queryinst-weights", default="output/psc_seed{seed}/model_final.pth",
                   help='checkpoint path with {seed}, or "random"')
    p.add_argument("--mask-rcnn-weights", default="output/mrcnn_seed{seed}/model_final.pth",
                   help='checkpoint path with {seed}, "random", or "none" (no Mask R-CNN)')
    p.add_argument("--train", action="store_true",
                   help="train a missing checkpoint (OUTPUT_DIR = its folder)")
    p.add_argument("--queryinst-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="config overrides of QueryInst (training and test)")
    p.add_argument("--mask-rcnn-opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--max-frames", type=int, default=None,
                   help="only the first N held-out frames (short runs, tests)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="detections in the CTC label images score at least this "
                        "(the tracker's INIT_SCORE_THRESH and make demo's drawing rule)")
    p.add_argument("--laptrack-distance", type=float, default=None,
                   help="laptrack's largest link distance, pixels (default: the median "
                        "radius of the training clip's cells)")
    p.add_argument("--laptrack-sweep", type=float, nargs="*", default=[],
                   help="other laptrack distances, reported beside the default")
    p.add_argument("--out-dir", default="output/real_video")
    p.add_argument("--markdown", default=None, help="default: OUT_DIR/real_video.md")
    p.add_argument("--from-results", default=None, metavar="JSON",
                   help="only write the report again from an earlier run's OUT_DIR/results.json")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(1)


def checkpoint(pattern: str, seed: int, config_file: str, opts, train: bool) -> str:
    """The seed's checkpoint; trained with train_net.py when missing and ``train``."""
    if pattern in ("random", "none"):
        return pattern
    path = pattern.format(seed=seed)
    if os.path.isfile(path):
        return path
    if not train:
        fail(f"checkpoint {path} does not exist: pass --train to train it, or another "
             "--queryinst-weights / --mask-rcnn-weights")
    # --resume: a run stopped part-way continues from its last checkpoint
    cmd = [sys.executable, os.path.join(_REPO, "train_net.py"), "--config-file", config_file,
           "--resume", *opts, "SEED", str(seed), "OUTPUT_DIR", os.path.dirname(path) or "."]
    print("[compare] training:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not os.path.isfile(path):
        fail(f"training finished without {path}")
    return path


def median_cell_radius(gt: dict) -> float:
    """Median sqrt(area / pi) of the GT masks of a YouTube-VIS dict, pixels."""
    import numpy as np

    areas = [a for ann in gt["annotations"] for a in ann["areas"] if a]
    return float(np.median(np.sqrt(np.asarray(areas) / math.pi)))


def run_seed(args, seed: int, names, distances, out_dir: str) -> dict:
    """Parts (a)-(c) of the module docstring for one seed on the (video, image) datasets
    ``names``; laptrack at each of ``distances`` (pixels, the first is the default).

    Returns:
        dict (also written to ``out_dir/results.json``): "ours", "laptrack",
        "laptrack_<d>px" ({DET, SEG, TRA, LNK} in [0, 1] and ``YTVISEvaluator``'s metrics),
        "ours_all_tracks", "queryinst_frame", "mask_rcnn_frame" ({"bbox", "segm"} COCO AP in
        percent; absent with ``--mask-rcnn-weights none``), the checkpoints and
        "track_seconds" (wall seconds to track the clip).
    """
    from qi_bench import real_video as rv

    from detectron2.data import MetadataCatalog

    video_name, image_name = names
    qi_w = checkpoint(args.queryinst_weights, seed, args.queryinst_config,
                      args.queryinst_opts, args.train)
    mr_w = checkpoint(args.mask_rcnn_weights, seed, args.mask_rcnn_config,
                      args.mask_rcnn_opts, args.train)
    res = {"seed": seed, "queryinst_weights": qi_w, "mask_rcnn_weights": mr_w}

    cfg = rv.load_config(args.queryinst_config, [*args.queryinst_opts, "SEED", str(seed)])
    model = rv.load_model(cfg, qi_w)
    start = time.perf_counter()
    clip = rv.track_clip(model, cfg, video_name)
    res["track_seconds"] = time.perf_counter() - start
    H, W, vid = clip["height"], clip["width"], clip["video_id"]
    gt = rv.gt_ctc_tracks(rv.read_json(MetadataCatalog.get(video_name).json_file), vid)

    # (a) ours: all tracks (make demo's numbers), and the tracks' masks above the threshold
    res["ours_all_tracks"] = rv.ytvis_scores(video_name, vid, clip["tracks"])
    labels, identity, scores = rv.ours_labels(clip["tracks"], clip["num_frames"],
                                             args.score_threshold, H, W)
    ours = rv.split_at_gaps(labels)
    res["ours"] = {**rv.ctc_measures(os.path.join(out_dir, "ours"), gt, ours),
                   **rv.ytvis_scores(video_name, vid, rv.video_tracks(labels, identity, scores))}

    # (b) laptrack on the same detections
    det_labels, det_scores = rv.detection_labels(clip["detections"], args.score_threshold, H, W)
    for k, d in enumerate(distances):
        ident = rv.laptrack_identities(det_labels, d, cfg.MODEL.QUERYINST_VIS.TRACKING.MAX_MISSED)
        lap = rv.split_at_gaps(rv.relabel(det_labels, ident))
        key = "laptrack" if k == 0 else f"laptrack_{d:g}px"
        res[key] = {"distance": d,
                    **rv.ctc_measures(os.path.join(out_dir, key), gt, lap),
                    **rv.ytvis_scores(video_name, vid,
                                      rv.video_tracks(det_labels, ident, det_scores))}

    # (c) frame AP: QueryInst, then Mask R-CNN
    res["queryinst_frame"] = rv.frame_ap(model, cfg, image_name,
                                         os.path.join(out_dir, "queryinst_coco"))
    del model
    if mr_w != "none":
        mcfg = rv.load_config(args.mask_rcnn_config, [*args.mask_rcnn_opts, "SEED", str(seed)])
        res["mask_rcnn_frame"] = rv.frame_ap(rv.load_model(mcfg, mr_w), mcfg, image_name,
                                             os.path.join(out_dir, "mask_rcnn_coco"))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    return res


ROWS = [  # (label, result key, metric key, scale, digits)
    ("QueryInst frame mask AP", "queryinst_frame", ("segm", "AP"), 1, 1),
    ("Mask R-CNN frame mask AP", "mask_rcnn_frame", ("segm", "AP"), 1, 1),
    ("QueryInst frame box AP", "queryinst_frame", ("bbox", "AP"), 1, 1),
    ("Mask R-CNN frame box AP", "mask_rcnn_frame", ("bbox", "AP"), 1, 1),
]


def _get(res: dict, key: str, metric):
    v = res.get(key, {})
    for m in (metric if isinstance(metric, tuple) else (metric,)):
        v = v.get(m, math.nan) if isinstance(v, dict) else math.nan
    return float(v)


def _cell(values, digits: int) -> str:
    from qi_bench.results import summarise

    s = summarise(values)
    if s["n"] == 0:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def render(runs: list, command: str, env: dict, distances) -> str:
    """The Markdown report: per-seed and mean ± std tables, the command, the versions."""
    seeds = [r["seed"] for r in runs]
    head = "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    sep = "|---" * (len(seeds) + 2) + "|"

    def row(label, key, metric, scale=1.0, digits=4, mean_digits=None):
        vals = [_get(r, key, metric) * scale for r in runs]
        return (f"| {label} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.{digits}f}"
                                              for v in vals)
                + f" | {_cell(vals, digits if mean_digits is None else mean_digits)} |")

    track_rows = []
    methods = [("ours", "QueryInst-VIS (EmbeddingTracker)"),
               ("laptrack", f"laptrack ({distances[0]:.1f} px) on the same masks")]
    for key, name in methods:
        for m in CTC_KEYS:
            track_rows.append(row(f"{name}: {m}", key, m))
        for edges, what in EDGE_ERRORS.items():  # where two trackers differ
            track_rows.append(row(f"{name}: {what}", key, edges, digits=0, mean_digits=1))
        track_rows.append(row(f"{name}: VIS AP", key, "AP", digits=1))
        track_rows.append(row(f"{name}: ID switches", key, "ID switches", digits=0, mean_digits=1))
    track_rows.append(row("QueryInst-VIS, all tracks (make demo): VIS AP", "ours_all_tracks",
                          "AP", digits=1))
    track_rows.append(row("QueryInst-VIS, all tracks (make demo): ID switches",
                          "ours_all_tracks", "ID switches", digits=0, mean_digits=1))
    sweep = []
    for d in distances[1:]:
        key = f"laptrack_{d:g}px"
        for m in ("TRA", "LNK"):
            sweep.append(row(f"laptrack ({d:g} px): {m}", key, m))
        sweep.append(row(f"laptrack ({d:g} px): ID switches", key, "ID switches", digits=0,
                         mean_digits=1))
    det_rows = [row(label, key, metric, scale, digits)
                for label, key, metric, scale, digits in ROWS]
    gt_frames = next((int(_get(r, "ours", "GT track-frames")) for r in runs), 0)
    lines = [
        "# Real video compared with the field: CTC measures, laptrack, Mask R-CNN",
        "",
        "Written by `tools/compare_real_video.py`. Held-out clip `ctc_psc_video_val` (PSC "
        f"frames t035-t049, {gt_frames} GT track-frames) and its frames as images "
        "(`ctc_psc_val`). DET, SEG, TRA, LNK in [0, 1] (traccuracy: DET, TRA, LNK; "
        "py-ctcmetrics: SEG); VIS AP and identity switches by `YTVISEvaluator`; frame AP "
        "(percent) by `COCOEvaluator`. The CTC label images and the tracker comparison use "
        f"the detections scoring >= {runs[0].get('score_threshold', 0.3)}; both trackers "
        "link the same masks. \"All tracks\" is what `make demo` reports (every track, "
        "any score)." + (f" laptrack's default cut-off is the median radius of the training "
                         f"clip's cells ({distances[0]:.1f} px); 99% of the training cells' "
                         f"frame-to-frame moves are under {runs[0]['training_motion_p99_px']:.1f}"
                         " px." if "training_motion_p99_px" in runs[0] else ""),
        "",
        "## Tracking",
        "",
        head, sep, *track_rows, *sweep,
        "",
        "## Detection at the same budget",
        "",
        head, sep, *det_rows,
        "",
        "## Provenance",
        "",
        "```bash",
        command,
        "```",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Run the comparison (see the module docstring); returns {"runs", "markdown"}."""
    args = parse_args(argv)
    from qi_bench import real_video as rv
    from qi_bench.results import versions

    if args.from_results:
        done = rv.read_json(args.from_results)
        md_file = args.markdown or os.path.join(os.path.dirname(args.from_results),
                                                "real_video.md")
        with open(md_file, "w") as f:
            f.write(render(done["runs"], done["command"], done["env"], done["distances"]))
        print(f"[compare] wrote {md_file}")
        return {"runs": done["runs"], "markdown": md_file}

    try:
        import laptrack  # noqa: F401
        import traccuracy  # noqa: F401
        import ctc_metrics  # noqa: F401
    except ImportError as e:
        fail(f"{e.name} is not installed: pip install traccuracy==0.4.3 laptrack==0.17.1 "
             "py-ctcmetrics==1.3.3 (requirements-compare.txt; make test installs it)")
    import queryinst.data  # noqa: F401  (registers the bundled datasets)
    from detectron2.data import MetadataCatalog

    env = versions()  # the commit the run starts from
    for f in (args.queryinst_config, args.mask_rcnn_config):
        if not os.path.isfile(f):
            fail(f"config {f} does not exist")
    os.makedirs(args.out_dir, exist_ok=True)
    names = (VIDEO, IMAGES)
    if args.max_frames:
        names = rv.first_frames(VIDEO, IMAGES, args.max_frames, args.out_dir)
    train_gt = rv.read_json(MetadataCatalog.get(TRAIN_VIDEO).json_file)
    distances = [args.laptrack_distance or median_cell_radius(train_gt), *args.laptrack_sweep]
    motion = rv.linking_distance(train_gt)  # 99th percentile of real frame-to-frame moves
    runs = []
    for seed in args.seeds:
        out = os.path.join(args.out_dir, f"seed{seed}")
        os.makedirs(out, exist_ok=True)
        res = run_seed(args, seed, names, distances, out)
        res["score_threshold"] = args.score_threshold
        res["training_motion_p99_px"] = motion
        runs.append(res)
        o, lp = res["ours"], res["laptrack"]
        print(f"[compare] seed {seed}: ours TRA {o['TRA']:.3f} DET {o['DET']:.3f} "
              f"SEG {o['SEG']:.3f} LNK {o['LNK']:.3f} ID switches {o['ID switches']} | "
              f"laptrack TRA {lp['TRA']:.3f} LNK {lp['LNK']:.3f} ID switches "
              f"{lp['ID switches']} | frame mask AP QueryInst "
              f"{res['queryinst_frame']['segm']['AP']:.1f} Mask R-CNN "
              f"{_get(res, 'mask_rcnn_frame', ('segm', 'AP')):.1f}", flush=True)
    for dist in ("traccuracy", "laptrack", "py-ctcmetrics"):
        import importlib.metadata

        env[dist] = importlib.metadata.version(dist)
    env["torch threads"] = __import__("torch").get_num_threads()
    command = "python tools/compare_real_video.py " + shlex.join(argv if argv is not None
                                                                 else sys.argv[1:])
    md = render(runs, command, env, distances)
    md_file = args.markdown or os.path.join(args.out_dir, "real_video.md")
    os.makedirs(os.path.dirname(md_file) or ".", exist_ok=True)
    with open(md_file, "w") as f:
        f.write(md)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"runs": runs, "env": env, "distances": distances, "command": command}, f,
                  indent=1, default=float)
    print(f"[compare] wrote {md_file}")
    return {"runs": runs, "markdown": md_file}


if __name__ == "__main__":
    main()
