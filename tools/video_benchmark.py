#!/usr/bin/env python
"""Per-frame online video inference: QueryInst-VIS side by side with MMDetection 3.3.0's
MaskTrack R-CNN, on the same real frames, timed frame by frame in interleaved rounds.

Candidates, all on the CPU with the same threads:

- ``queryinst-vis fp32``: QueryInstVIS (default ``configs/youtube_vis/
  queryinst_vis_R50_FPN_ytvis2019.yaml``, R50-FPN, its ``EmbeddingTracker``) in its default
  inference (folded BatchNorm, channels-last), ``track_frame`` per frame;
- ``queryinst-vis bf16``: the same with ``MODEL.QUERYINST.INFERENCE_DTYPE bfloat16``;
- ``queryinst-vis onnx``: the same model exported with ``queryinst.export`` (its per-frame
  graph, with the track embeddings) and run by onnxruntime; one detection per query, mask
  pasting and the tracker in Python;
- the peer, ``mmdet 3.3.0 MaskTrack R-CNN``: R50-FPN from MMDetection's own config
  (``masktrack-rcnn_mask-rcnn_r50_fpn_8xb1-12e_youtubevis2019.py``) with its
  ``MaskTrackRCNNTracker``, in the reference venv of ``tools/reference/setup.sh``, in its
  own process (``tools/reference/mmdet_masktrack.py``). Where that venv is missing the peer
  is skipped and the report says why (``--setup-peer`` builds it: a download of torch).

Weights are random, saved in each side's own layout from the same ``--seed`` (ours a project
checkpoint, the peer an MMDetection state_dict); each side's backbone normalisation takes
its statistics from frame 0. As in the image benchmark's fair-comparison rules, ours tracks
every query's best detection (score thresholds 0; its random classifiers score everything
near the prior), while MaskTrack R-CNN's own config passes its 100 detections a frame.

The clip: the bundled real time-lapse (``ctc_psc_video_train`` then ``ctc_psc_video_val``,
50 frames of 536x700) resized to YouTube-VIS's test size, 360x640 (``--keep-aspect``:
Detectron2's ``ResizeShortestEdge(360, 640)``, 360x470). Each candidate plays it online,
frame 0 starting a new video; after ``--warmup`` untimed frames each, ``--iters`` passes
are timed, the candidates taking turns frame by frame.

Reported per candidate: median and p90 per-frame latency, frames per second (frames over
their total time), the tracker's median time and its share of the frame time (its seconds
over the frames' total, both measured around each frame), detections and tracked instances
per frame; against the peer, the median of the per-frame latency ratios; and the goals
(fp32 at most 0.7x the peer, tracker under 5% of a frame). A table, then one JSON line
(also written to ``--json-out``).

    python tools/video_benchmark.py --frames 30 --iters 1 --warmup 2 --threads 2

Extra ``KEY VALUE`` pairs override the QueryInst-VIS config.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
import queryinst.video  # noqa: E402,F401  (registers QueryInstVIS and the video datasets)
from queryinst.config_loading import CONFIG_ERRORS  # noqa: E402
import torch  # noqa: E402

from qi_bench.video import (  # noqa: E402
    DEFAULT_CONFIG,
    DEFAULT_DATASETS,
    OURS,
    YTVIS_SIZE,
    print_video_report,
    run_video,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG,
                   help=f"QueryInst-VIS config (default {DEFAULT_CONFIG})")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                   help="registered video datasets whose frames make the clip, in order "
                        "(default: the bundled real time-lapse, train then val split)")
    p.add_argument("--frames", type=int, default=None,
                   help="the clip's first N frames (default: all; the default clip has 50)")
    p.add_argument("--frame-size", nargs=2, type=int, default=list(YTVIS_SIZE),
                   metavar=("H", "W"), help="resize every frame to H x W (default 360 640)")
    p.add_argument("--keep-aspect", action="store_true",
                   help="resize with ResizeShortestEdge(H, W) instead (shorter side H, "
                        "longer side at most W)")
    p.add_argument("--no-resize", action="store_true", help="run the frames at their size")
    p.add_argument("--ours", default=",".join(OURS),
                   help=f"our candidates, comma-separated from {','.join(OURS)} "
                        "(default: all; 'none' for the peer alone)")
    p.add_argument("--no-peer", action="store_true", help="do not run MaskTrack R-CNN")
    p.add_argument("--setup-peer", action="store_true",
                   help="run tools/reference/setup.sh first (builds the reference venv: "
                        "downloads torch, mmdet 3.3.0, ...; a no-op once done)")
    p.add_argument("--venv", default=None,
                   help="the reference venv (default: $QUERYINST_REFERENCE_VENV or "
                        "$QUERYINST_CACHE/mmdet_reference)")
    p.add_argument("--iters", type=int, default=1, help="timed passes over the clip")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames first, each")
    p.add_argument("--threads", type=int, default=2,
                   help="torch (and onnxruntime, and the peer's) threads")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides' random weights")
    p.add_argument("--json-out", default=None, help="also write the JSON to this file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="QueryInst-VIS overrides: KEY VALUE")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--iters and --threads must be >= 1, --warmup >= 0")
    if args.frames is not None and args.frames < 1:
        p.error("--frames must be >= 1")
    if min(args.frame_size) < 32:
        p.error("--frame-size must be at least 32 x 32 pixels")
    args.ours = [] if args.ours in ("", "none") else args.ours.split(",")
    unknown = sorted(set(args.ours) - set(OURS))
    if unknown:
        p.error(f"--ours {','.join(unknown)}: choose from {','.join(OURS)}")
    if not args.ours and args.no_peer:
        p.error("nothing to time: --ours none with --no-peer")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        report = run_video(args, stack)
    print_video_report(report, args.json_out)
    return report


if __name__ == "__main__":
    try:
        main()
    except CONFIG_ERRORS as e:  # a missing --config-file, a misspelled key: one line
        sys.exit(f"ERROR: {e}")
    except (KeyError, ValueError) as e:  # an unknown dataset, too few frames
        sys.exit(f"ERROR: {e}")
