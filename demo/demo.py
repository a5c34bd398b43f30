#!/usr/bin/env python3
"""QueryInst demo: detect and segment objects in images, a video or a webcam, and draw them.

Examples::

    python demo/demo.py --config-file configs/queryinst_R50_FPN_1x_coco.yaml \\
        --input photo.jpg photos/ "more/*.png" --output out/ \\
        --opts MODEL.WEIGHTS queryinst_r50_fpn_1x_coco.pth
    python demo/demo.py --config-file ... --video-input clip.mp4 --output out/
    python demo/demo.py --config-file ... --webcam

Inputs (``--input``): image files, directories (their image files, sorted, not recursive)
and glob patterns (quote them). Each image gets a summary line on stdout (detections with
score >= ``--confidence-threshold``, and the model's time in seconds). ``--output``: a
directory gets one drawn image per input, same name (``.png`` or ``.jpg``, other formats
written as ``.png``); a file name (one input) gets that input's drawing. A video is drawn
frame by frame into an mp4 (``cv2.VideoWriter``, codec mp4v): ``--output`` is that file, or
a directory for ``<video name>.mp4``. Without ``--output`` nothing is written (webcam frames
are shown in a window instead; Esc quits).

Class names come from the metadata of ``DATASETS.TEST[0]``. ``MODEL.DEVICE`` defaults to
"cuda" where CUDA is available and "cpu" otherwise; the config file and ``--opts`` override
it.

Exit status: 0 if every input was drawn, 1 if any input failed (missing, unreadable or
corrupt: an ``ERROR: <file>: ...`` line on stderr; the other inputs are still processed) or
``MODEL.WEIGHTS`` cannot be used (unreadable, not downloadable, or a checkpoint of another
config: an ``ERROR:`` line; an empty ``MODEL.WEIGHTS`` only gets an "UNTRAINED MODEL"
warning), 2 for command-line errors.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger
from PIL import Image
from tqdm import tqdm

# The package of this checkout, installed or not; predictor.py next to this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "projects", "QueryInst"))
sys.path.insert(0, _HERE)

from predictor import VisualizationDemo  # noqa: E402

from queryinst import add_queryinst_config  # noqa: E402
from queryinst.checkpoint import CheckpointError, official_config_opts  # noqa: E402
from queryinst.data import read_image  # noqa: E402  (16-bit and float images too)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
WINDOW_NAME = "QueryInst"
# What reading a missing, truncated or non-image file raises (PIL, Detectron2's read_image).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

logger = logging.getLogger("queryinst.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="QueryInst demo (Detectron2 Visualizer)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a yaml config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files, directories or quoted glob patterns")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0 (cv2.VideoCapture)")
    parser.add_argument("--output", metavar="PATH",
                        help="directory (or a file name for one input) for the drawings")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of a drawn and counted detection (default 0.5)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides, KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def setup_cfg(args):
    """Frozen config: QueryInst keys, device default, ``--config-file``, then ``--opts``."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # An official checkpoint implies its own queries / classes / stages / depth.
    cfg.merge_from_list(official_config_opts(cfg.MODEL.WEIGHTS))
    cfg.freeze()
    return cfg


def expand_inputs(patterns: List[str]) -> Tuple[List[str], List[str]]:
    """Files to process, in order, without repeats, and error lines for patterns that failed.

    Args:
        patterns: file paths (any extension: reading decides), directories (their files
            with an extension in ``IMAGE_EXTENSIONS``, sorted) and glob patterns (sorted
            matches; ``**`` recursive).

    Returns:
        (files, errors): errors name each pattern that matched nothing.
    """
    files, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                errors.append(f"{pattern}: directory without image files "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(pattern):
            found = [pattern]
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                errors.append(f"{pattern}: no file matches this pattern")
        else:
            found = []
            errors.append(f"{pattern}: no such file or directory")
        files.extend(found)
    return list(dict.fromkeys(files)), errors


def _error(message: str) -> None:
    tqdm.write(f"ERROR: {message}", file=sys.stderr)


def _image_output_paths(files: List[str], output: Optional[str]) -> List[Optional[str]]:
    """Where each drawing goes: ``output`` itself (one input, image extension), else a file
    of the same name in the directory ``output`` (created); names made unique with _1, _2."""
    if output is None:
        return [None] * len(files)
    if (len(files) == 1 and output.lower().endswith(IMAGE_EXTENSIONS)
            and not os.path.isdir(output)):
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        return [output]
    os.makedirs(output, exist_ok=True)
    paths, used = [], set()
    for path in files:
        stem, ext = os.path.splitext(os.path.basename(path))
        ext = ext.lower() if ext.lower() in (".png", ".jpg", ".jpeg") else ".png"
        name, k = stem + ext, 0
        while name in used:
            k += 1
            name = f"{stem}_{k}{ext}"
        used.add(name)
        paths.append(os.path.join(output, name))
    return paths


def run_images(demo: VisualizationDemo, patterns: List[str], output: Optional[str]) -> int:
    """Draw every image of ``patterns``; returns the number of inputs that failed."""
    files, errors = expand_inputs(patterns)
    for message in errors:
        _error(message)
    failures = len(errors)
    for path, out_path in zip(tqdm(files, desc="images", unit="image"),
                              _image_output_paths(files, output)):
        try:
            image = read_image(path, format="BGR")
        except READ_ERRORS as exc:
            _error(f"{path}: cannot read the image ({type(exc).__name__}: {exc})")
            failures += 1
            continue
        start = time.perf_counter()
        instances = demo.predict(image)
        seconds = time.perf_counter() - start
        tqdm.write(f"{path}: {len(instances)} detections with score >= "
                   f"{demo.confidence_threshold:g} in {seconds:.2f}s")
        if out_path is not None:
            drawn = demo.draw(image, instances)
            if not cv2.imwrite(out_path, drawn):
                _error(f"{path}: cannot write {out_path}")
                failures += 1
    if failures:
        tqdm.write(f"{failures} of {len(files) + len(errors)} inputs failed", file=sys.stderr)
    return failures


def _frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _video_output_path(output: str, name: str) -> str:
    if output.lower().endswith(VIDEO_EXTENSIONS) and not os.path.isdir(output):
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.splitext(os.path.basename(name))[0] + ".mp4")


def run_stream(demo: VisualizationDemo, capture: cv2.VideoCapture, name: str,
               output: Optional[str], show: bool) -> int:
    """Draw every frame of an opened capture; returns 1 on failure (no frame), else 0.

    Args:
        output: where the drawn mp4 goes (see the module docstring), or None.
        show: also show each frame in a window (Esc stops).
    """
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, out_path, frames, detections = None, None, 0, 0
    start = time.perf_counter()
    try:
        for instances, drawn in tqdm(demo.run_on_frames(_frames(capture)), total=total,
                                     desc=os.path.basename(name), unit="frame"):
            frames += 1
            detections += len(instances)
            if output is not None:
                if writer is None:
                    out_path = _video_output_path(output, name)
                    height, width = drawn.shape[:2]
                    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (width, height))
                    if not writer.isOpened():
                        _error(f"{name}: cannot write the video {out_path}")
                        return 1
                writer.write(drawn)
            if show:
                cv2.imshow(WINDOW_NAME, drawn)
                if cv2.waitKey(1) == 27:  # Esc
                    break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    if frames == 0:
        _error(f"{name}: no frame could be read (not a video, or corrupt)")
        return 1
    seconds = time.perf_counter() - start
    tqdm.write(f"{name}: {frames} frames, {detections} detections with score >= "
               f"{demo.confidence_threshold:g}, {seconds:.2f}s ({frames / seconds:.1f} frames/s)"
               + (f" -> {out_path}" if out_path else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; returns the exit status (0 all inputs drawn, 1 some failed)."""
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="queryinst")  # e.g. the "UNTRAINED MODEL" warning, with its level
    setup_logger()
    cfg = setup_cfg(args)
    try:  # an empty MODEL.WEIGHTS only gets a warning (predictor.py)
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold)
    except CheckpointError as exc:  # unusable MODEL.WEIGHTS: the message says what to pass
        _error(str(exc))
        return 1

    if args.input:
        return 1 if run_images(demo, args.input, args.output) else 0
    if args.video_input:
        capture = cv2.VideoCapture(args.video_input)
        if not os.path.isfile(args.video_input) or not capture.isOpened():
            _error(f"{args.video_input}: cannot open the video")
            return 1
        return run_stream(demo, capture, args.video_input, args.output, show=False)
    capture = cv2.VideoCapture(0)
    if not capture.isOpened():
        _error("webcam 0: cannot open the camera")
        return 1
    return run_stream(demo, capture, "webcam", args.output, show=args.output is None)


if __name__ == "__main__":
    sys.exit(main())
