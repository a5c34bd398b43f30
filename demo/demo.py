#!/usr/bin/env python3
"""QueryInst demo: detect and segment objects in images, a video or a webcam, and draw them.

Examples::

    python demo/demo.py --config-file configs/queryinst_R50_FPN_1x_coco.yaml \\
        --input photo.jpg photos/ "more/*.png" --output out/ \\
        --opts MODEL.WEIGHTS queryinst_r50_fpn_1x_coco.pth
    python demo/demo.py --config-file ... --video-input clip.mp4 --output out.mp4 \
        --save-json tracks.json
    python demo/demo.py --config-file ... --webcam

Inputs (``--input``): image files, directories (their image files, sorted, not recursive)
and glob patterns (quote them). Each image gets a summary line on stdout (detections with
score >= ``--confidence-threshold``, and the model's time in seconds). ``--output``: a
directory gets one drawn image per input, same name (``.png`` or ``.jpg``, other formats
written as ``.png``); a file name (one input) gets that input's drawing. A video is drawn
frame by frame into an mp4 (``cv2.VideoWriter``, codec mp4v): ``--output`` is that file, or
a directory for ``<video name>.mp4``. Without ``--output`` nothing is written (webcam frames
are shown in a window instead; Esc quits). Video and webcam frames are tracked (docs/method.md
§6): each track is drawn in its own stable colour, labelled "#id class score"; a
``QueryInstVIS`` config (``configs/youtube_vis/``) tracks with its own tracker, an image config
with the training-free ``QueryCosineTracker`` (object queries matched by cosine similarity).
``--save-json`` writes the tracks (per frame boxes and RLE masks, None where absent);
``--no-tracking`` draws each frame on its own, as an image. Drawings of small images are
enlarged (an integer
factor up to a shorter side of 1024 px: a 256x256 image gives 1024x1024; see
``predictor.draw_scale``), so that the labels do not cover the objects; video frames keep
their size.

Config overrides go after ``--opts`` (``KEY VALUE`` pairs after the inputs are refused with
that hint). Inputs are checked before the model is loaded.

Exported models (``tools/export_model.py``): ``--exported DIR/model.onnx`` (onnxruntime),
``DIR/model.int8.onnx`` (the int8 graph of ``--quantize int8``) or ``DIR/model.ts``
(TorchScript) replaces ``--config-file`` and ``--opts``; the settings and
class names come from ``DIR/model.json``; video frames are drawn without tracking
(``--no-tracking`` is required for videos and the webcam). A ``.ts`` file is TorchScript:
loading and running it runs the code stored in it, so use ``.ts`` files you made yourself
and prefer ``.onnx`` (a graph of operators, no code) for files from others. Everything else
the demo reads (``MODEL.WEIGHTS``, the yaml config) is read without running code from it
(``queryinst.checkpoint.safe_load``, ``queryinst.config_loading``).

Class names are the model's: ``MODEL.QUERYINST.CLASS_NAMES`` (``train_net.py`` writes them into
its ``config.yaml``), else those stored in the ``MODEL.WEIGHTS`` checkpoint, else the metadata
of ``DATASETS.TEST[0]`` (``--dataset NAME:JSON:IMAGES`` registers a COCO json as in
``train_net.py``); without any, one warning and class indices. ``MODEL.DEVICE`` defaults to
"cuda" where CUDA is available and "cpu" otherwise; the config file and ``--opts`` override
it.

Exit status: 0 if every input was drawn, 1 if any input failed (missing, unreadable or
corrupt: an ``ERROR: <file>: ...`` line on stderr; the other inputs are still processed;
when no input is usable, the demo stops before loading the model) or ``MODEL.WEIGHTS``
cannot be used (unreadable, not downloadable, or a checkpoint of another config: an
``ERROR:`` line; an empty ``MODEL.WEIGHTS`` only gets an "UNTRAINED MODEL" warning), 2 for
command-line errors (also: a ``--confidence-threshold`` outside [0, 1], an image file as
``--output`` for several inputs, a misspelled config key: one ``ERROR:`` line with the closest
key, a ``--config-file`` that does not exist: one ``ERROR:`` line with the nearest config files).
Without a terminal (logs, CI) there is no progress bar and no colour codes, only the result
lines. Without ``--output`` each result line ends in "no --output: nothing written"; the video
line names the frame size and the size the model ran at (the test resize).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
from typing import Iterator, List, Optional, Tuple

# The package of this checkout, installed or not; predictor.py next to this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "projects", "QueryInst"))
sys.path.insert(0, _HERE)

# Before Detectron2: it imports Detectron2 without its torch.jit.script FutureWarnings.
import queryinst  # noqa: E402,F401  isort: skip

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from predictor import DEFAULT_CONFIDENCE_THRESHOLD, VisualizationDemo  # noqa: E402

from queryinst.checkpoint import CheckpointError  # noqa: E402
from queryinst.config_loading import CONFIG_ERRORS, device_note, inference_config  # noqa: E402
from queryinst.data import (  # noqa: E402
    add_dataset_argument,
    read_image,  # 16-bit and float images too
    register_dataset_specs,
)
from queryinst.engine.defaults import console_color  # noqa: E402
from queryinst.video import tracks_to_json  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
WINDOW_NAME = "QueryInst"
# An upper-case dotted name, e.g. MODEL.WEIGHTS: a config key, not a file.
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+$")
# What reading a missing, truncated or non-image file raises (PIL, Detectron2's read_image).
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# The end of a result line when there is no --output.
NOTHING_WRITTEN = "no --output: nothing written"


def _unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1] (scores are sigmoid probabilities)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1] (scores are probabilities)")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="QueryInst demo (Detectron2 Visualizer)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config-file", metavar="FILE", help="a yaml config")
    model.add_argument("--exported", metavar="FILE",
                       help="instead of --config-file: a model.onnx, model.int8.onnx or "
                            "model.ts written by "
                            "tools/export_model.py (its model.json beside it); a .ts file "
                            "is TorchScript and runs the code stored in it: use your own, "
                            "prefer .onnx for files from others")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files, directories or quoted glob patterns")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0 (cv2.VideoCapture)")
    parser.add_argument("--output", metavar="PATH",
                        help="directory (or a file name for one input) for the drawings")
    parser.add_argument("--confidence-threshold", type=_unit_interval, metavar="T",
                        default=DEFAULT_CONFIDENCE_THRESHOLD,
                        help="minimum score, in [0, 1], of a drawn and counted detection "
                             f"(default {DEFAULT_CONFIDENCE_THRESHOLD})")
    parser.add_argument("--save-json", metavar="FILE",
                        help="video/webcam: write the tracks to this json file at the end")
    parser.add_argument("--no-tracking", action="store_true",
                        help="video/webcam: draw each frame on its own, without tracks")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides, KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    # e.g. the test set of a training run's config.yaml, for its class names
    return add_dataset_argument(parser)


def _looks_like_key(token: str) -> bool:
    """A config key such as MODEL.WEIGHTS: not an existing path nor an image or video name."""
    return (bool(_CONFIG_KEY.match(token)) and not os.path.exists(token)
            and not token.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """:func:`get_parser`'s arguments, checked (argparse's error, exit 2, on each problem).

    Refused: config overrides without ``--opts`` (train_net.py style ``KEY VALUE`` after the
    inputs: without this check, ``MODEL.WEIGHTS m.pth`` would be read as two images), and a
    ``--confidence-threshold`` outside [0, 1].
    """
    parser = get_parser()
    args, extra = parser.parse_known_args(argv)
    tokens = list(args.input or []) + extra
    for i, token in enumerate(tokens):
        if _looks_like_key(token):
            pair = " ".join(tokens[i:i + 2])
            parser.error(f"{token!r} looks like a config key, not an input: put config "
                         f"overrides after --opts, e.g. --opts {pair}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.exported and args.opts:
        parser.error("--exported takes no --opts: the exported model's settings were fixed "
                     "at export (model.json); export again with the overrides")
    if args.exported and not (args.input or args.no_tracking):
        parser.error("--exported: an exported model cannot track video frames (its graph "
                     "does not return the queries); add --no-tracking, or use --config-file")
    if args.save_json and (args.input or args.no_tracking):
        parser.error("--save-json writes the tracks of a video: it needs --video-input or "
                     "--webcam, without --no-tracking")
    return args


def setup_cfg(args):
    """Frozen config: QueryInst keys, device default, ``--config-file``, then ``--opts``.

    ``MODEL.DEVICE`` defaults to "cuda" where CUDA is available, else "cpu"
    (``queryinst.config_loading.merge_config``); a misspelled key raises with a hint.
    """
    return inference_config(args.config_file, args.opts)


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


def run_images(demo: VisualizationDemo, files: List[str], output: Optional[str],
               failed_patterns: int = 0) -> int:
    """Draw every image of ``files`` (from :func:`expand_inputs`); returns the number of
    inputs that failed, ``failed_patterns`` (patterns that matched nothing) included."""
    failures = failed_patterns
    # disable=None: no bar when stderr is not a terminal (logs, CI), where its redraws
    # become blank lines between the result lines and a doubled final bar.
    for path, out_path in zip(tqdm(files, desc="images", unit="image", disable=None),
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
                   f"{demo.confidence_threshold:g} in {seconds:.2f}s"
                   + ("" if out_path else f"; {NOTHING_WRITTEN}"))
        if out_path is not None:
            drawn = demo.draw(image, instances)
            if not cv2.imwrite(out_path, drawn):
                _error(f"{path}: cannot write {out_path}")
                failures += 1
    if failures:
        tqdm.write(f"{failures} of {len(files) + failed_patterns} inputs failed",
                   file=sys.stderr)
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
    writer, out_path, frames, detections, size = None, None, 0, 0, None
    start = time.perf_counter()
    try:
        for instances, drawn in tqdm(demo.run_on_frames(_frames(capture)), total=total,
                                     desc=os.path.basename(name), unit="frame", disable=None):
            frames += 1
            detections += len(instances)
            size = size or drawn.shape[:2]  # frames are drawn at their own size
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
    run_h, run_w = demo.input_size(*size)
    tqdm.write(f"{name}: {frames} frames, {detections} detections with score >= "
               f"{demo.confidence_threshold:g}, {seconds:.2f}s ({frames / seconds:.1f} frames/s); "
               f"frames of {size[0]}x{size[1]} run at {run_h}x{run_w} (INPUT.MIN_SIZE_TEST / "
               "MAX_SIZE_TEST)" + (f" -> {out_path}" if out_path else f"; {NOTHING_WRITTEN}"))
    return 0


def _image_inputs(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """:func:`expand_inputs` of ``--input`` (error lines printed), before any model is built.

    Raises:
        SystemExit: 2 (argparse's error) for an image file name as ``--output`` with several
            inputs, where the drawings would overwrite each other.
    """
    files, errors = expand_inputs(args.input) if args.input else ([], [])
    several = args.input and (len(args.input) > 1 or len(files) > 1)
    if (several and args.output and args.output.lower().endswith(IMAGE_EXTENSIONS)
            and not os.path.isdir(args.output)):
        get_parser().error(f"--output {args.output} names one image file, but there are "
                           f"several inputs ({len(files)} images): give a directory")
    for message in errors:
        _error(message)
    return files, errors


def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo; returns the exit status (0 all inputs drawn, 1 some failed).

    Inputs are checked before the model is built: missing files are reported first, and
    when no input is usable the demo stops with status 1 without loading a model.
    """
    args = parse_args(argv)
    files, errors = _image_inputs(args)
    if args.input and not files:
        _error("no input to process (see the errors above); the model was not loaded")
        return 1
    capture = None
    if args.video_input:
        capture = cv2.VideoCapture(args.video_input)
        if not os.path.isfile(args.video_input) or not capture.isOpened():
            _error(f"{args.video_input}: cannot open the video")
            return 1

    color = console_color()  # no colour codes in a pipe or a file
    setup_logger(name="fvcore", color=color)
    setup_logger(name="queryinst", color=color)  # e.g. "UNTRAINED MODEL", with its level
    d2_logger = setup_logger(color=color)
    if args.exported:
        try:
            demo = VisualizationDemo(None, confidence_threshold=args.confidence_threshold,
                                     exported=args.exported)
        except (FileNotFoundError, ValueError) as exc:
            _error(str(exc))
            return 1
        d2_logger.info(f"running the exported model {args.exported} on the CPU")
        return _run_inputs(demo, args, files, errors, capture)
    try:
        register_dataset_specs(args.dataset)  # e.g. the test set named in a config.yaml
    except ValueError as exc:  # a --dataset name taken by another dataset
        _error(str(exc))
        return 2
    try:
        cfg = setup_cfg(args)
    except CONFIG_ERRORS as exc:  # a command-line error
        _error(str(exc))
        return 2
    d2_logger.info(device_note(cfg.MODEL.DEVICE))
    try:  # an empty MODEL.WEIGHTS only gets a warning (predictor.py)
        # Tracks keep their masks only for --save-json: a webcam stream would grow forever.
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold,
                                 tracking=not (args.input or args.no_tracking),
                                 keep_track_masks=bool(args.save_json))
    except CheckpointError as exc:  # unusable MODEL.WEIGHTS: the message says what to pass
        _error(str(exc))
        return 1
    return _run_inputs(demo, args, files, errors, capture)


def _run_inputs(demo: VisualizationDemo, args: argparse.Namespace, files: List[str],
                errors: List[str], capture: Optional[cv2.VideoCapture]) -> int:
    """Draw the images, the video or the webcam of ``args``; returns the exit status."""
    if args.input:
        return 1 if run_images(demo, files, args.output, len(errors)) else 0
    if capture is None:
        capture = cv2.VideoCapture(0)
        if not capture.isOpened():
            _error("webcam 0: cannot open the camera")
            return 1
    name = args.video_input or "webcam"
    status = run_stream(demo, capture, name, args.output,
                        show=args.video_input is None and args.output is None)
    if status == 0 and args.save_json:
        status = _save_tracks(demo, name, args.save_json)
    return status


def _save_tracks(demo: VisualizationDemo, name: str, path: str) -> int:
    """Write the video's tracks (``tracks_to_json``) to ``path``; 1 if it cannot be written."""
    tracks = demo.tracks()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(tracks_to_json(tracks, demo.metadata, video=name), f)
    except OSError as exc:
        _error(f"{path}: cannot write the tracks ({exc})")
        return 1
    tqdm.write(f"{name}: {len(tracks)} tracks -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
