#!/usr/bin/env python
"""MMDetection 3.3.0's MaskTrack R-CNN R50-FPN on the CPU, frame by frame: the video peer of
``tools/video_benchmark.py``.

Runs inside the reference's venv (``tools/reference/setup.sh``), not the project's. It

1. builds MaskTrack R-CNN (``mmdet/models/vis/masktrack_rcnn.py``: Mask R-CNN, the RoI track
   head and ``MaskTrackRCNNTracker``) from MMDetection's own config file in the mmdet wheel,
   ``configs/masktrack_rcnn/masktrack-rcnn_mask-rcnn_r50_fpn_8xb1-12e_youtubevis2019.py``,
   unchanged except that nothing is downloaded (no COCO-pretrained detector): random weights
   from ``torch.manual_seed(--seed)`` and MMDetection's ``init_weights()``, then the
   backbone's BatchNorm statistics set to those of its input on the first frame (activations
   at a trained network's scale; ``calibrate_backbone_bn`` of ``mmdet_queryinst.py``);
2. saves them in MMDetection's layout, ``{"state_dict", "meta"}`` (``--checkpoint``), loads
   them back with ``mmengine.runner.load_checkpoint`` and checks they are bit-identical;
3. serves ``--serve FRAMES.npy`` (uint8 (T, H, W, 3) BGR frames, run without any resize):
   writes one JSON line ``{"ready": ...}`` to stdout, then answers each line ``frame T`` on
   stdin with online inference of frame T (``model.test_step`` on that one frame, as
   MMDetection's video test loop feeds it: normalisation, padding, detector, mask pasting
   and the tracker, which restarts at frame 0) and a line ``{"seconds", "tracker_seconds",
   "detections", "tracked", "live_tracks"}``: the wall time of the call, the part spent in
   ``MaskTrackRCNNTracker.track`` (the track head's RoI features and embedding, matching,
   track memory), the detections and the tracked instances of the frame, and the tracks
   held. ``quit`` or end of input ends it. Everything else the process prints goes to stderr.

Every ``--threads`` (default 2) holds for all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcv_ext_standin  # noqa: E402
from mmdet_queryinst import (  # noqa: E402
    build_initialised,
    calibrate_backbone_bn,
    log,
    protocol_stdout,
    versions,
)

CONFIG = os.path.join("masktrack_rcnn",
                      "masktrack-rcnn_mask-rcnn_r50_fpn_8xb1-12e_youtubevis2019.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--checkpoint", required=True, help="MMDetection-layout .pth to write")
    p.add_argument("--serve", required=True, metavar="FRAMES.npy",
                   help="answer 'frame T' requests on stdin with frame T of this uint8 "
                        "(T, H, W, 3) BGR clip")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if not os.path.isfile(args.serve):
        p.error(f"--serve {args.serve}: no such file")
    return args


def build_and_save(cfg, seed: int, frame: np.ndarray, path: str):
    """MaskTrack R-CNN with random weights (BN statistics calibrated on ``frame``), saved to
    ``path`` and loaded back into a fresh model, which is returned in eval mode.

    Raises:
        SystemExit: if the loaded weights differ from the saved ones.
    """
    from mmengine.runner import load_checkpoint

    model = build_initialised(cfg, seed)
    # The detector's own normalisation of the frame, as its data preprocessor does it.
    prep = model.data_preprocessor
    image = torch.from_numpy(np.ascontiguousarray(frame[..., ::-1].transpose(2, 0, 1)))
    image = ((image.float() - prep.mean) / prep.std).reshape(1, *image.shape)
    calibrate_backbone_bn(model.detector.backbone, image)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"mmdet_config": CONFIG, "seed": seed, "versions": versions("stand-in"),
            "weights": "random: mmdet init_weights(), backbone BN statistics of frame 0 "
                       "(tools/reference/mmdet_masktrack.py)"}
    torch.save({"state_dict": state, "meta": meta}, path)
    log(f"checkpoint {path}: {len(state)} tensors, {os.path.getsize(path) / 2**20:.1f} MiB")
    model = build_initialised(cfg, seed)  # overwritten by the file
    load_checkpoint(model, path, map_location="cpu", logger="silent")
    loaded = model.state_dict()
    differ = [k for k in state if not torch.equal(state[k], loaded[k])]
    if list(loaded) != list(state) or differ:
        raise SystemExit(f"load_checkpoint did not load {path} exactly: {differ[:5]}")
    return model.eval()


class TimedTracker:
    """Wraps ``model.tracker.track`` to add up the seconds spent in it."""

    def __init__(self, tracker):
        self.seconds = 0.0
        self._track = tracker.track
        tracker.track = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._track(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def frame_batch(frames: np.ndarray, t: int) -> dict:
    """Frame ``t`` of the clip as MMDetection's video test loop gives it to ``test_step``:
    one TrackDataSample holding one frame (frame_id t, no resize: scale factor 1)."""
    from mmdet.datasets.transforms import PackTrackInputs

    h, w = frames.shape[1:3]
    packed = PackTrackInputs().transform({
        "img": [np.ascontiguousarray(frames[t])], "img_id": [t], "img_path": [f"frame{t}"],
        "frame_id": [t], "video_id": [0], "video_length": [len(frames)],
        "ori_shape": [(h, w)], "img_shape": [(h, w)], "scale_factor": [(1.0, 1.0)],
    })
    return {"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}


def serve(model, frames: np.ndarray, proto) -> None:
    """The benchmark's protocol on stdin / ``proto`` (see the module docstring)."""
    timer = TimedTracker(model.tracker)
    proto.write(json.dumps({"ready": True, "frames": len(frames),
                            "frame_size": list(frames.shape[1:3]),
                            "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] != "frame" or len(cmd) != 2 or not cmd[1].isdigit() \
                or int(cmd[1]) >= len(frames):
            proto.write(json.dumps({"error": f"unknown command {line.strip()!r}"}) + "\n")
            continue
        batch = frame_batch(frames, int(cmd[1]))
        timer.seconds = 0.0
        start = time.perf_counter()
        with torch.no_grad():
            out = model.test_step(batch)[0][0]
        seconds = time.perf_counter() - start
        proto.write(json.dumps({
            "seconds": seconds, "tracker_seconds": timer.seconds,
            "detections": len(out.pred_instances), "tracked": len(out.pred_track_instances),
            "live_tracks": len(model.tracker.ids)}) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    proto = protocol_stdout()  # MMEngine's logger prints to stdout
    torch.set_num_threads(args.threads)
    ops = mmcv_ext_standin.install()

    import mmdet
    from mmengine.config import Config

    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", CONFIG)
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"{cfg_path} is missing: is this mmdet 3.3.0 from its wheel?")
    cfg = Config.fromfile(cfg_path)
    cfg.model.detector.init_cfg = None  # no COCO download: the weights are random anyway
    cfg.model.detector.backbone.init_cfg = None  # nor ImageNet
    log(f"versions {json.dumps(versions(ops))}; config {CONFIG}")
    frames = np.load(args.serve)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise SystemExit(f"--serve: expected uint8 (T, H, W, 3), got {frames.dtype} "
                         f"{frames.shape}")
    model = build_and_save(cfg, args.seed, frames[0], args.checkpoint)
    serve(model, frames, proto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
