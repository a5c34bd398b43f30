"""The run of tools/video_benchmark.py: per-frame online video inference of QueryInst-VIS (its
image model, then its tracker) and of MMDetection 3.3.0's MaskTrack R-CNN, timed frame by
frame in interleaved rounds on the same real clip (the script's docstring describes the
options and the JSON).

Each candidate is a clip player: ``step()`` runs the clip's next frame (frame 0 restarts the
tracker), ``tracker_s`` collects the seconds its tracker took on each frame. The players
take turns frame by frame (``measure.interleaved_times``), so every candidate sees the
machine in the same state on the same frame.
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .measure import calibrate_frozen_bn, interleaved_times, machine_info
from .models import log, queryinst_cfg
from .reference import (
    ReferenceError,
    ServedProcess,
    default_venv,
    reference_python,
    setup_reference,
)
from .runner import summarise

TOOLS = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/youtube_vis/queryinst_vis_R50_FPN_ytvis2019.yaml"
# The bundled real time-lapse, whole: its train split then its held-out split, in time order.
DEFAULT_DATASETS = ("ctc_psc_video_train", "ctc_psc_video_val")
# YouTube-VIS's test size: shorter side 360, longer side 640 (MaskTrack R-CNN's and ours).
YTVIS_SIZE = (360, 640)
OURS = ("fp32", "bf16", "onnx")  # our candidates, in the order they run in a round
PEER_NAME = "mmdet 3.3.0 MaskTrack R-CNN"
PEER_SCRIPT = TOOLS / "reference" / "mmdet_masktrack.py"
# Ours with random weights scores every detection near the classifiers' prior (~0.01): at the
# config's thresholds it would track and paste nothing. Like the image benchmark's baselines
# (score threshold 0), every query's best detection is tracked and pasted, and may start a
# track; MaskTrack R-CNN's config (score_thr 0.01) already passes its 100 detections.
FAIR_OPTS = ["MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0.0",
             "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH", "0.0"]


# ----------------------------------------------------------------------------- the clip


def load_clip(datasets, num_frames: int | None, size: tuple[int, int] | None = YTVIS_SIZE,
              keep_aspect: bool = False) -> tuple[np.ndarray, dict]:
    """The first ``num_frames`` frames of the datasets' videos, in order, resized.

    Args:
        datasets: registered video datasets (YouTube-VIS dicts with "file_names"), e.g.
            ``ctc_psc_video_train``; their videos are concatenated in the order given.
        num_frames: how many frames (None: all).
        size: (H, W) of the resized frames; with ``keep_aspect``, (shorter side, longest
            allowed longer side) of Detectron2's ``ResizeShortestEdge``; None: no resize.
        keep_aspect: resize as the test transform does instead of to exactly ``size``.

    Returns:
        (frames, info): uint8 (T, H, W, 3) BGR, and the frames' files and sizes.

    Raises:
        ValueError: if the datasets hold fewer than ``num_frames`` frames, or frames of
            different sizes after resizing.
        KeyError: an unregistered dataset name (Detectron2's message lists the known ones).
    """
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image

    files = [f for name in datasets for video in DatasetCatalog.get(name)
             for f in video["file_names"]]
    if num_frames is not None:
        if len(files) < num_frames:
            raise ValueError(f"--frames {num_frames}: {', '.join(datasets)} hold only "
                             f"{len(files)} frames")
        files = files[:num_frames]
    frames = []
    original = None
    for f in files:
        image = read_image(f, format="BGR")
        original = original or image.shape[:2]
        if size is not None:
            aug = (T.ResizeShortestEdge(size[0], size[1]) if keep_aspect
                   else T.Resize(tuple(size)))
            image = aug.get_transform(image).apply_image(image)
        frames.append(image)
    if len({im.shape for im in frames}) != 1:
        raise ValueError(f"frames of different sizes: {sorted({im.shape for im in frames})}")
    info = {"datasets": list(datasets), "frames": len(frames), "first_file": files[0],
            "last_file": files[-1], "original_size": list(original),
            "frame_size": list(frames[0].shape[:2]),
            "resize": ("none" if size is None else
                       f"ResizeShortestEdge({size[0]}, {size[1]})" if keep_aspect
                       else f"Resize to {size[0]}x{size[1]}")}
    return np.stack(frames), info


def to_model_input(frame_bgr: np.ndarray, input_format: str) -> torch.Tensor:
    """uint8 (H, W, 3) BGR -> uint8 (3, H, W) in ``INPUT.FORMAT`` ("RGB" or "BGR")."""
    image = frame_bgr[:, :, ::-1] if input_format == "RGB" else frame_bgr
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def save_random_checkpoint(cfg, seed: int, frame: torch.Tensor, path: str) -> int:
    """QueryInst-VIS with random weights, saved as a project checkpoint at ``path``.

    ``torch.manual_seed(seed)``, Detectron2's initialisation, then the FrozenBN statistics
    of the backbone set to those of its input on ``frame`` (``calibrate_frozen_bn``; the
    peer's BatchNorm gets the same treatment on the same frame).

    Returns:
        int: the number of FrozenBN layers calibrated.
    """
    from detectron2.modeling import build_model

    from queryinst.checkpoint import QueryInstCheckpointer

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    h, w = frame.shape[1:]
    calibrated = calibrate_frozen_bn(model, [{"image": frame, "height": h, "width": w}])
    folder, name = os.path.split(path)
    QueryInstCheckpointer(model, folder).save(os.path.splitext(name)[0])
    return calibrated


# ----------------------------------------------------------------------------- players


class TimedCall:
    """Replaces ``obj.<name>`` by itself: calls the original and adds up its seconds in
    ``seconds``; ``last_args`` keeps the last call's positional arguments."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        self.last_args: tuple = ()
        self._fn = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        self.last_args = args
        start = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class ClipPlayer:
    """One candidate playing the clip online; subclasses define ``_frame(t)``.

    ``step()`` runs the next frame (after the last one, frame 0 again: a new video) and
    appends the tracker's seconds of that frame to ``tracker_s`` and its counts to
    ``tracked`` (instances that belong to a track) and ``detections`` (before tracking).
    """

    def __init__(self, name: str, num_frames: int):
        self.name, self.num_frames = name, num_frames
        self.next = 0
        self.tracker_s: list[float] = []
        self.tracked: list[int] = []
        self.detections: list[int] = []
        self.result: dict = {"name": name}

    def step(self) -> None:
        tracker_s, detections, tracked = self._frame(self.next)
        self.tracker_s.append(tracker_s)
        self.detections.append(detections)
        self.tracked.append(tracked)
        self.next = (self.next + 1) % self.num_frames

    def restart(self) -> None:
        """Back to frame 0 with the records emptied (after the warm-up)."""
        self.next = 0
        self.tracker_s, self.detections, self.tracked = [], [], []

    def _frame(self, t: int) -> tuple[float, int, int]:
        """Run frame ``t``; (tracker seconds, detections, tracked instances)."""
        raise NotImplementedError


class TorchPlayer(ClipPlayer):
    """QueryInst-VIS in PyTorch: ``track_frame`` per frame (``start_video`` at frame 0); the
    tracker's time is that of ``tracker.update`` (association, track memory and the RLE
    encoding of the frame's masks).

    Args:
        name: the row's name.
        cfg: a QueryInstVIS config whose MODEL.WEIGHTS is the checkpoint to load.
        frames: uint8 (3, H, W) tensors in ``INPUT.FORMAT``.
    """

    def __init__(self, name: str, cfg, frames: list[torch.Tensor]):
        from detectron2.modeling import build_model

        from queryinst.checkpoint import QueryInstCheckpointer

        super().__init__(name, len(frames))
        self.cfg, self.frames = cfg, frames
        self.model = build_model(cfg).eval()
        QueryInstCheckpointer(self.model, strict=True).load(cfg.MODEL.WEIGHTS)
        self.update = TimedCall(self.model.tracker, "update")
        h, w = frames[0].shape[1:]
        self.size = (h, w)
        self.result.update(inference_dtype=cfg.MODEL.QUERYINST.INFERENCE_DTYPE,
                           tracker=type(self.model.tracker).__name__)

    def _frame(self, t):
        if t == 0:
            self.model.start_video()
        h, w = self.size
        self.update.seconds = 0.0
        with torch.no_grad():
            out = self.model.track_frame({"image": self.frames[t], "height": h, "width": w})
        return self.update.seconds, len(self.update.last_args[0]), len(out)

    def first_frame_detections(self):
        """The image model's top-k of frame 0 with track embeddings (what the exported
        graph is compared with)."""
        with torch.no_grad():
            return self.model.frame_detections({"image": self.frames[0]})


class ExportedPlayer(ClipPlayer):
    """QueryInst-VIS exported to ONNX (``queryinst.export``, its per-frame graph with
    ``query_indices`` and ``track_embeddings``) and run by onnxruntime through
    ``ExportedPredictor``; then in Python, as ``QueryInstVIS.detect_frame`` does, one
    detection per query above the score threshold and masks pasted, and the same tracker
    class (``tracker.update``, timed as the tracker).

    Args:
        source: the fp32 ``TorchPlayer`` whose model is exported (traced on frame 0).
        out_dir: where the graph is written.
        threads: onnxruntime's intra-op threads.
    """

    def __init__(self, source: TorchPlayer, out_dir: str, threads: int):
        from queryinst.export import ExportedPredictor, export_model
        from queryinst.video import build_tracker

        super().__init__("queryinst-vis onnx", source.num_frames)
        model, cfg = source.model, source.cfg
        start = time.perf_counter()
        from detectron2.data import MetadataCatalog

        classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") \
            if cfg.DATASETS.TEST else None
        path = export_model(model, cfg, "onnx", out_dir, source.frames[0].float(),
                            thing_classes=classes)
        self.result["export_s"] = round(time.perf_counter() - start, 1)
        self.predictor = ExportedPredictor(path, num_threads=threads)
        self.frames = [f.numpy().astype(np.float32) for f in source.frames]
        self.size = source.size
        self.det_score_thresh = model.det_score_thresh
        self.tracker = build_tracker(cfg)
        self.update = TimedCall(self.tracker, "update")
        self.result.update(tracker=type(self.tracker).__name__, threads=threads,
                           **self._differences(source))

    def graph_detections(self, t: int):
        """Frame ``t``'s top-k from the graph, as ``QueryInstVIS.frame_detections``."""
        from detectron2.structures import Boxes, Instances

        out = self.predictor.run_graph(self.frames[t])
        result = Instances(self.size, pred_boxes=Boxes(out.pop("pred_boxes")))
        for key, value in out.items():
            result.set(key, value)
        return result

    def _differences(self, source: TorchPlayer) -> dict:
        """Agreement with the PyTorch model on frame 0, before filtering: the share of the
        graph's top-k rows (query, class) that PyTorch's top-k holds too, and the largest
        score and embedding differences over those rows. (Not a parity test, which
        tests/test_export.py is: the PyTorch side runs its folded, channels-last inference,
        and random weights score many rows alike, so the last top-k places may swap.)"""
        truth, ours = source.first_frame_detections(), self.graph_detections(0)
        row = {(q, c): i for i, (q, c) in enumerate(zip(truth.query_indices.tolist(),
                                                        truth.pred_classes.tolist()))}
        pairs = [(i, row[key]) for i, key in enumerate(zip(ours.query_indices.tolist(),
                                                           ours.pred_classes.tolist()))
                 if key in row]
        if not pairs:
            return {"frame0_shared_topk": 0.0}
        mine, theirs = (torch.as_tensor(x) for x in zip(*pairs))
        return {
            "frame0_shared_topk": round(len(pairs) / max(len(ours), 1), 3),
            "frame0_max_score_diff": float(
                (ours.scores[mine] - truth.scores[theirs]).abs().max()),
            "frame0_max_embedding_diff": float(
                (ours.track_embeddings[mine] - truth.track_embeddings[theirs]).abs().max()),
        }

    def _frame(self, t):
        from queryinst.modeling.meta_arch.queryinst import queryinst_postprocess
        from queryinst.video.modeling.meta_arch import one_detection_per_query

        if t == 0:
            self.tracker.reset()
        h, w = self.size
        kept = one_detection_per_query(self.graph_detections(t), self.det_score_thresh)
        frame = queryinst_postprocess(kept, h, w, self.predictor.info["mask_threshold"])
        self.update.seconds = 0.0
        out = self.tracker.update(frame)
        return self.update.seconds, len(frame), len(out)


class PeerPlayer(ClipPlayer):
    """MMDetection 3.3.0's MaskTrack R-CNN in the reference venv
    (tools/reference/mmdet_masktrack.py), one ``frame T`` request per frame. Its tracker's
    time, measured in that process, is that of ``MaskTrackRCNNTracker.track``.

    Args:
        python: the reference venv's interpreter.
        frames_npy: the clip, uint8 (T, H, W, 3) BGR.
        checkpoint: where the peer writes its MMDetection-layout weights.
        seed, threads: of the peer's weights and torch.
    """

    def __init__(self, python: str, frames_npy: str, checkpoint: str, seed: int,
                 threads: int):
        server = ServedProcess([python, str(PEER_SCRIPT), "--seed", str(seed), "--threads",
                                str(threads), "--checkpoint", checkpoint,
                                "--serve", frames_npy])
        super().__init__(PEER_NAME, server.ready["frames"])
        self.server = server
        self.self_s: list[float] = []
        self.live_tracks: list[int] = []
        self.result.update(tracker="MaskTrackRCNNTracker", threads=server.ready["threads"],
                           config="masktrack-rcnn_mask-rcnn_r50_fpn_8xb1-12e_youtubevis2019")

    def restart(self) -> None:
        super().restart()
        self.self_s, self.live_tracks = [], []

    def _frame(self, t):
        reply = self.server.request(f"frame {t}", "seconds")
        self.self_s.append(reply["seconds"])
        self.live_tracks.append(reply["live_tracks"])
        return reply["tracker_seconds"], reply["detections"], reply["tracked"]


# ----------------------------------------------------------------------------- the run


def player_summary(player: ClipPlayer, times: list[float]) -> dict:
    """The numbers of one candidate from its timed frames' wall seconds ``times``.

    ``frames_per_s`` is frames over their total time; ``tracker_share`` the tracker's total
    seconds over the frames' total (a share of the wall time that was measured, frame by
    frame, around the whole frame); ``tracker_share_median`` the median of the per-frame
    shares.
    """
    total = math.fsum(times)
    shares = [tr / t for tr, t in zip(player.tracker_s, times)]
    out = {
        **summarise(times, "frame"),
        "frame_mean_s": round(total / len(times), 4),
        "frames_per_s": round(len(times) / total, 3),
        "tracker_median_ms": round(1000 * statistics.median(player.tracker_s), 2),
        "tracker_share": round(math.fsum(player.tracker_s) / total, 4),
        "tracker_share_median": round(statistics.median(shares), 4),
        "detections_per_frame": round(statistics.mean(player.detections), 1),
        "tracked_per_frame": round(statistics.mean(player.tracked), 1),
    }
    if isinstance(player, PeerPlayer):
        out["peer_self_times_s"] = [round(x, 4) for x in player.self_s]
        out["live_tracks_last"] = player.live_tracks[-1]
    return out


def compare(ours: dict, peer: dict) -> dict:
    """Ours against the peer: the median over frames of the per-frame latency ratios (the
    same frame, in the same round), and the ratio of the medians."""
    per_frame = [o / p for o, p in zip(ours["frame_times_s"], peer["frame_times_s"])]
    return {"per_frame_ratio_median": round(statistics.median(per_frame), 3),
            "ratio_of_medians": round(ours["frame_median_s"] / peer["frame_median_s"], 3)}


def start_peer(args, frames: np.ndarray, workdir: str):
    """The peer's player, or (None, reason) where it cannot be set up or started."""
    try:
        venv = args.venv or default_venv()
        if args.setup_peer:
            log("setting up the reference venv (tools/reference/setup.sh; quick once done)")
            python = setup_reference(venv, quiet=True)
        else:
            python = reference_python(venv)
        npy = os.path.join(workdir, "frames.npy")
        np.save(npy, frames)
        log("starting MaskTrack R-CNN (builds and saves its checkpoint)")
        player = PeerPlayer(python, npy, os.path.join(workdir, "masktrack_rcnn_random.pth"),
                            args.seed, torch.get_num_threads())
        return player, None
    except (ReferenceError, OSError) as e:
        return None, f"the MMDetection peer could not be set up or started: {e}"


def run_video(args, stack) -> dict:
    """Build every candidate of ``args`` (tools/video_benchmark.py's options) and time them.

    Args:
        args: the parsed options.
        stack: an ``ExitStack`` that ends the peer process and removes the work directory.

    Returns:
        dict: the report (date, machine, clip, settings, candidates, ours against the peer,
        the goals); ``peer_skipped`` holds the reason where the peer did not run.
    """
    workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="queryinst_vidbench_"))
    size = None if args.no_resize else tuple(args.frame_size)
    frames, clip = load_clip(args.datasets, args.frames, size, args.keep_aspect)
    log(f"clip: {clip['frames']} frames {clip['frame_size']} from {', '.join(args.datasets)}")
    cfg = queryinst_cfg(args.config_file, FAIR_OPTS + args.opts, "cpu")
    inputs = [to_model_input(f, cfg.INPUT.FORMAT) for f in frames]
    ckpt = os.path.join(workdir, "queryinst_vis_random.pth")
    calibrated = save_random_checkpoint(cfg, args.seed, inputs[0], ckpt)
    players: list[ClipPlayer] = []
    fp32 = None
    for name in args.ours:
        if name == "onnx":
            continue
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[name]
        cfg_i = queryinst_cfg(args.config_file, FAIR_OPTS + args.opts + [
            "MODEL.QUERYINST.INFERENCE_DTYPE", dtype], "cpu", weights=ckpt)
        log(f"building queryinst-vis {name}")
        player = TorchPlayer(f"queryinst-vis {name}", cfg_i, inputs)
        fp32 = fp32 or (player if name == "fp32" else None)
        players.append(player)
    if "onnx" in args.ours:
        source = fp32 or TorchPlayer("queryinst-vis fp32", queryinst_cfg(
            args.config_file, FAIR_OPTS + args.opts, "cpu", weights=ckpt), inputs)
        log("exporting queryinst-vis to ONNX")
        players.append(ExportedPlayer(source, os.path.join(workdir, "onnx"),
                                      torch.get_num_threads()))
    if args.no_peer:
        peer, skipped = None, "not asked for (--no-peer)"
    else:
        peer, skipped = start_peer(args, frames, workdir)
    if peer is not None:
        stack.callback(peer.server.close)
        players.append(peer)
    else:
        log(f"peer skipped: {skipped}")
    if not players:
        raise SystemExit("video_benchmark.py: error: nothing to time (no --ours and no peer)")

    log(f"warm-up: {args.warmup} frame(s) each, then {args.iters} timed pass(es) over "
        f"{len(frames)} frames, the candidates taking turns frame by frame")
    for _ in range(args.warmup):
        for p in players:
            p.step()
    for p in players:
        p.restart()
    times = interleaved_times([p.step for p in players], args.iters * len(frames), 0, "cpu")
    results = []
    for p, t in zip(players, times):
        p.result.update(player_summary(p, t))
        results.append(p.result)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info("cpu"),
        "clip": clip,
        "settings": {"config": args.config_file, "opts": FAIR_OPTS + args.opts,
                     "threads": torch.get_num_threads(), "iters": args.iters,
                     "warmup_frames": args.warmup, "seed": args.seed,
                     "ours_frozen_bn_calibrated": calibrated},
        "candidates": results,
    }
    if peer is not None:
        report["vs_peer"] = {r["name"]: compare(r, peer.result) for r in results[:-1]}
    else:
        report["peer_skipped"] = skipped
    report["goals"] = goals(report)
    return report


def goals(report: dict) -> dict:
    """The issue's goals, checked: ours fp32 at most 0.7x the peer's per-frame time (per-frame
    ratio median), every candidate's tracker under 5% of a frame (None: not measured)."""
    fp32 = report.get("vs_peer", {}).get("queryinst-vis fp32")
    return {
        "fp32_vs_peer_at_most_0.7": None if fp32 is None
        else fp32["per_frame_ratio_median"] <= 0.7,
        "tracker_share_under_5pct": {r["name"]: r["tracker_share"] < 0.05
                                     for r in report["candidates"]},
    }


COLUMNS = [  # (header, key, format) for report.format_table
    ("candidate", "name", "{}"),
    ("median (s)", "frame_median_s", "{:.3f}"),
    ("p90 (s)", "frame_p90_s", "{:.3f}"),
    ("frames/s", "frames_per_s", "{:.2f}"),
    ("tracker (ms)", "tracker_median_ms", "{:.1f}"),
    ("tracker share", "tracker_share", lambda v: f"{100 * v:.1f}%"),
    ("dets/frame", "detections_per_frame", "{:.1f}"),
    ("tracked/frame", "tracked_per_frame", "{:.1f}"),
    ("vs peer", "vs_peer", lambda v: f"{v['per_frame_ratio_median']:.2f}x"),
]


def print_video_report(report: dict, json_out: str | None = None) -> None:
    """The settings line, the table, the goals and the JSON line (also to ``json_out``)."""
    import json

    from .report import format_table

    clip, s = report["clip"], report["settings"]
    print(f"cpu ({report['machine']['cpu']}), {s['threads']} threads, {clip['frames']} frames "
          f"{clip['frame_size'][0]}x{clip['frame_size'][1]} ({clip['resize']} of "
          f"{', '.join(clip['datasets'])}), {s['iters']} timed pass(es) + {s['warmup_frames']} "
          f"warm-up frame(s), torch {torch.__version__}, {report['date']}")
    rows = [dict(r, vs_peer=report.get("vs_peer", {}).get(r["name"])) for r in
            report["candidates"]]
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    print(format_table(rows, COLUMNS))
    if "peer_skipped" in report:
        print(f"  peer skipped: {report['peer_skipped']}")
    g = report["goals"]
    print(f"  goal fp32 <= 0.7x MaskTrack R-CNN: {g['fp32_vs_peer_at_most_0.7']}; tracker < 5% "
          "of a frame: " + ", ".join(f"{k} {v}" for k, v in g["tracker_share_under_5pct"].items()))
    line = json.dumps(report)
    if json_out:
        Path(json_out).write_text(line + "\n")
    print(line)
