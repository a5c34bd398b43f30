#!/usr/bin/env python3
"""``make demo``: train QueryInst-VIS on real time-lapse video, evaluate the held-out clip, draw it.

1. Trains a bundled config with ``train_net.main`` in this process. The default,
   ``configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml``, is QueryInstVIS (MobileNetV2-FPN
   from ImageNet weights, track head, ``EmbeddingTracker``) on frame pairs of the Cell
   Tracking Challenge PhC-C2DL-PSC sequence's first 35 frames (``ctc_psc_video_train``). A
   re-run resumes from ``OUTPUT_DIR/last_checkpoint`` (Detectron2's
   ``resume_or_load(resume=True)``); a finished run (``last_checkpoint`` naming
   ``model_final.pth``) is only evaluated again, and the run says which trained model it
   reused instead of a training time.
2. Evaluates the config's image test set (``ctc_psc_val``: the 15 held-out frames, never
   trained on) after the last iteration: COCO box and mask AP (``COCOEvaluator``).
3. Writes ``OUTPUT_DIR/val_predictions.png``: ground truth (left) and the detections with
   score >= ``--score-threshold`` (right) on its first image, drawn by Detectron2's
   ``Visualizer`` as ``demo/demo.py`` draws (``predictor.draw_scale``). The default
   threshold, 0.3, is lower than ``demo/demo.py``'s 0.5 (Detectron2's, for COCO-trained
   models) because these briefly trained models score many true cells between 0.3 and 0.6;
   the run prints the ``demo/demo.py`` command that draws the same detections.
4. Writes ``OUTPUT_DIR/losses.png``: total training loss and each stage's loss (the sum of
   its cls, bbox, giou and mask terms) against iteration, from ``OUTPUT_DIR/metrics.json``.
5. Video (docs/method.md §6): tracks the config's video test set (``ctc_psc_video_val``, the
   same held-out frames as a clip) with the trained model and its tracker, prints its
   YouTube-VIS AP, AP50 and identity switches (``YTVISEvaluator``), and writes
   ``OUTPUT_DIR/video/tracks.mp4`` and ``tracks.gif``: every frame with the tracked
   detections scoring >= ``--score-threshold``, each track in its own colour with its id
   (and the submission files, ``results.json``/``.zip``). A config without a video test set
   (an image model, e.g. ``configs/bundled/queryinst_MNV2_FPN_nuclei.yaml``, the former
   demo) tracks the held-out nuclei pseudo-video (``nuclei_dsb_video_val``, frames at their
   192-px scale) with the training-free ``QueryCosineTracker`` instead.

Run from the repository root (dataset and output paths are relative to it)::

    python tools/run_demo.py [--config-file FILE] [--score-threshold 0.3] [KEY VALUE ...]

Trailing ``KEY VALUE`` pairs override the config (e.g. ``SOLVER.MAX_ITER 10``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # train_net.py (it puts the package of this checkout on the path)
sys.path.insert(0, os.path.join(_REPO, "demo"))  # predictor.py: the demo's drawing rule

import train_net  # noqa: E402  (registers the model and the bundled datasets)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402

from predictor import draw_scale  # noqa: E402

from queryinst import add_queryinst_config  # noqa: E402
from queryinst.checkpoint import QueryInstCheckpointer  # noqa: E402
from queryinst.config_loading import CONFIG_ERRORS, merge_config  # noqa: E402
from queryinst import video  # noqa: E402
from queryinst.video.data.pseudo_video import NUCLEI_VIDEO_FRAME  # noqa: E402

DEFAULT_CONFIG = os.path.join("configs", "bundled", "queryinst_vis_MNV2_FPN_ctc_psc.yaml")
PSEUDO_VIDEO_DATASET = "nuclei_dsb_video_val"  # image configs: the held-out pseudo-video
_STAGE_LOSS = re.compile(r"^s(\d+)_loss_")


def read_loss_curves(metrics_file: str) -> tuple[list[int], dict[str, list[float]]]:
    """Read the training losses that Detectron2's ``JSONWriter`` logged.

    Args:
        metrics_file: ``OUTPUT_DIR/metrics.json``, one json object per line. Lines without
            "total_loss" (evaluation results) are skipped; when a resumed run logged an
            iteration again, its last line wins.

    Returns:
        (iterations, curves): sorted iterations, and per curve name ("total", "s0", "s1",
        ...) the values at those iterations. A stage's value is the sum of its
        ``s{t}_loss_*`` terms (already weighted by the model).
    """
    by_iter = {}
    with open(metrics_file) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            if "total_loss" in record:
                by_iter[record["iteration"]] = record
    iterations = sorted(by_iter)
    curves: dict[str, list[float]] = defaultdict(list)
    for it in iterations:
        record = by_iter[it]
        curves["total"].append(record["total_loss"])
        stages = defaultdict(float)
        for key, value in record.items():
            match = _STAGE_LOSS.match(key)
            if match:
                stages[int(match.group(1))] += value
        for t in sorted(stages):
            curves[f"s{t}"].append(stages[t])
    return iterations, dict(curves)


def plot_losses(metrics_file: str, out_file: str) -> bool:
    """Plot :func:`read_loss_curves` to ``out_file`` (PNG, matplotlib Agg, log y axis).

    Returns:
        bool: False (and no file) when ``metrics_file`` is missing or has no loss lines.
    """
    if not os.path.isfile(metrics_file):
        return False
    iterations, curves = read_loss_curves(metrics_file)
    if not iterations:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        ax.plot(iterations, values, label=name, marker=".",
                linewidth=2.5 if name == "total" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (smoothed, weighted)")
    ax.set_title("QueryInst training losses: total and per stage")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(out_file, dpi=120)
    plt.close(fig)
    return True


def draw_val_predictions(cfg, weights: str, dataset_name: str, out_file: str,
                         score_threshold: float) -> tuple[int, str]:
    """Draw ground truth and predictions on the first image of ``dataset_name``.

    Args:
        cfg: the training config.
        weights: checkpoint to load.
        dataset_name: a registered dataset (its metadata gives ``thing_classes``).
        out_file: PNG path; the image is [ground truth | predictions], each enlarged by
            ``draw_scale`` (as demo/demo.py draws).
        score_threshold: only detections with score >= this are drawn.

    Returns:
        (int, str): the number of detections drawn, and the file of the drawn image.
    """
    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import Visualizer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    predictor = DefaultPredictor(cfg)
    record = DatasetCatalog.get(dataset_name)[0]
    metadata = MetadataCatalog.get(dataset_name)
    image_bgr = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)
    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= score_threshold]
    rgb = image_bgr[:, :, ::-1]
    scale = draw_scale(*rgb.shape[:2])
    gt = Visualizer(rgb, metadata=metadata, scale=scale).draw_dataset_dict(record).get_image()
    pred = Visualizer(rgb, metadata=metadata, scale=scale).draw_instance_predictions(instances)
    gap = np.full((gt.shape[0], 8, 3), 255, dtype=np.uint8)
    panel = np.concatenate([gt, gap, pred.get_image()], axis=1)
    cv2.imwrite(out_file, panel[:, :, ::-1])
    return len(instances), record["file_name"]


def pseudo_video_model(cfg, weights: str):
    """A video model for the bundled pseudo-videos: ``cfg`` (a ``QueryInstVIS`` config) with
    the frames tested at their own size, the scale of the image tiles, and the model built
    from it in eval mode with ``weights`` loaded strictly.

    Returns:
        (CfgNode, QueryInstVIS): the adjusted copy of ``cfg`` and the model.
    """
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TEST = NUCLEI_VIDEO_FRAME
    model = build_model(cfg).eval()
    QueryInstCheckpointer(model, strict=True).load(weights)
    return cfg, model


def track_video(cfg, weights: str, dataset_name: str, out_dir: str,
                score_threshold: float) -> tuple[dict, list[str], str]:
    """Track a video test set and draw its first video as MP4 and GIF.

    A ``QueryInstVIS`` config with ``dataset_name`` among its test sets is tracked as it is
    (its tracker, ``INPUT.MIN_SIZE_TEST``); an image model's config tracks the pseudo-videos
    with the training-free ``QueryCosineTracker`` at their own frame size
    (:func:`pseudo_video_model`).

    Args:
        cfg: the trained model's config.
        weights: its checkpoint (loaded strictly).
        dataset_name: a registered video dataset whose first video is drawn.
        out_dir: gets ``tracks.mp4``, ``tracks.gif`` and the evaluator's ``results.json`` /
            ``results.zip``.
        score_threshold: drawn detections score at least this.

    Returns:
        (dict, list[str], str): ``YTVISEvaluator``'s {"segm": {...}}, the drawn files, and
        the tracker's name.
    """
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model

    if cfg.MODEL.META_ARCHITECTURE == "QueryInstVIS" and dataset_name in cfg.DATASETS.TEST:
        model = build_model(cfg).eval()
        QueryInstCheckpointer(model, strict=True).load(weights)
        scale, fps = 1, 4
    else:
        cfg, model = pseudo_video_model(video.use_query_tracker(cfg), weights)
        scale, fps = 2, 3
    os.makedirs(out_dir, exist_ok=True)
    results, kept = video.track_dataset(
        model, video.build_vis_test_loader(cfg, dataset_name),
        video.YTVISEvaluator(dataset_name, output_dir=out_dir, distributed=False))
    inputs, output = kept[0]
    metadata = MetadataCatalog.get(dataset_name)
    frames = []
    for t, file_name in enumerate(inputs["file_names"]):
        instances = video.frame_instances(output["tracks"], t, output["image_size"])
        instances = instances[instances.scores >= score_threshold]
        frames.append(video.draw_tracked_frame(read_image(file_name, format="RGB"),
                                               instances, metadata, scale=scale))
    files = [os.path.join(out_dir, "tracks.mp4"), os.path.join(out_dir, "tracks.gif")]
    video.save_mp4(frames, files[0], fps=fps)
    video.save_gif(frames, files[1], fps=fps)
    return results, files, cfg.MODEL.QUERYINST_VIS.TRACKER


def finished_checkpoint(out_dir: str) -> str | None:
    """The ``model_final.pth`` of a finished training run in ``out_dir`` (its
    ``last_checkpoint`` names it, and it exists), else None: a new or interrupted run."""
    checkpointer = DetectionCheckpointer(None, save_dir=out_dir)
    if not checkpointer.has_checkpoint():
        return None
    path = checkpointer.get_checkpoint_file()
    return path if os.path.basename(path) == "model_final.pth" and os.path.isfile(path) else None


def timing_line(cfg, seconds: float, reused: str | None) -> str:
    """The run's time line: training + evaluation, or, when ``reused`` (a finished run's
    checkpoint, :func:`finished_checkpoint`) was only evaluated again, what was reused."""
    if reused:
        return (f"[demo] reused the trained model {reused} (a finished run of "
                f"{cfg.SOLVER.MAX_ITER} iterations: not trained again; delete "
                f"{cfg.OUTPUT_DIR} to retrain); evaluation wall time {seconds:.0f} s")
    return (f"[demo] training + evaluation wall time: {seconds / 60:.1f} min "
            f"({cfg.SOLVER.MAX_ITER} iterations, batch {cfg.SOLVER.IMS_PER_BATCH})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="drawn detections: score >= this (default 0.3; see above)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold {args.score_threshold:g} is outside [0, 1] "
                     "(scores are probabilities)")
    return args


def main(argv=None) -> dict:
    """Run the demo; see the module docstring.

    Returns:
        dict: the evaluation results, {"bbox": {"AP": ...}, "segm": {"AP": ...}}.
    """
    args = parse_args(argv)
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    out_dir = cfg.OUTPUT_DIR
    reused = finished_checkpoint(out_dir)
    # Training evaluates the image test sets; the video one is tracked below (metrics and
    # the drawn clip from one pass).
    image_tests = [d for d in cfg.DATASETS.TEST if not video.is_video_dataset(d)]
    video_tests = [d for d in cfg.DATASETS.TEST if video.is_video_dataset(d)]
    tests = ["DATASETS.TEST", str(tuple(image_tests))] if video_tests else []
    train_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file, "--resume", *args.opts, *tests]
    )
    start = time.perf_counter()
    # Resumes (or only evaluates a finished run); Detectron2 evaluates after the last iteration.
    results = train_net.main(train_args)
    elapsed = time.perf_counter() - start

    dataset = image_tests[0]
    checkpointer = DetectionCheckpointer(None, save_dir=out_dir)  # only to find the last checkpoint
    weights = checkpointer.get_checkpoint_file()
    if dataset in results:  # several test sets: results by dataset name
        results = results[dataset]

    predictions_png = os.path.join(out_dir, "val_predictions.png")
    drawn, image_file = draw_val_predictions(cfg, weights, dataset, predictions_png,
                                             args.score_threshold)
    losses_png = os.path.join(out_dir, "losses.png")
    plotted = plot_losses(os.path.join(out_dir, "metrics.json"), losses_png)

    print("\n" + timing_line(cfg, elapsed, reused))
    print(f"[demo] outputs in {out_dir}/:")
    print(f"  checkpoint        {weights}")
    print(f"  log, metrics      {os.path.join(out_dir, 'log.txt')}, "
          f"{os.path.join(out_dir, 'metrics.json')}")
    print(f"  COCO predictions  {os.path.join(out_dir, 'inference')}/")
    print(f"  predictions image {predictions_png} ({drawn} detections with score >= "
          f"{args.score_threshold}; left: ground truth)")
    print(f"  loss curves       {losses_png if plotted else '(no losses logged)'}")
    print(f"[demo] the same drawing with demo/demo.py: python demo/demo.py --config-file "
          f"{args.config_file} --input {image_file} --output {out_dir}/demo "
          f"--confidence-threshold {args.score_threshold} --opts MODEL.WEIGHTS {weights} "
          + " ".join(args.opts))
    for task, name in (("bbox", "box"), ("segm", "mask")):
        if task in results:
            r = results[task]
            print(f"[demo] {dataset} {name} AP {r['AP']:.1f}  AP50 {r['AP50']:.1f}  "
                  f"AP75 {r['AP75']:.1f}")
    video_dataset = video_tests[0] if video_tests else PSEUDO_VIDEO_DATASET
    vis, drawn_files, tracker = track_video(cfg, weights, video_dataset,
                                            os.path.join(out_dir, "video"), args.score_threshold)
    v = vis["segm"]
    print(f"[demo] tracked video ({tracker}): {', '.join(drawn_files)}")
    print(f"[demo] {video_dataset} VIS AP {v['AP']:.1f}  AP50 {v['AP50']:.1f}  "
          f"ID switches {v['ID switches']} (of {v['GT track-frames']} GT track-frames)")
    print(f"[demo] wall time in all (training, evaluation, drawing): "
          f"{(time.perf_counter() - start) / 60:.1f} min")
    return results


if __name__ == "__main__":
    try:
        main()
    except CONFIG_ERRORS as e:  # a missing --config-file, a misspelled key: one line
        sys.exit(f"ERROR: {e}")
