#!/usr/bin/env python3
"""Convert a Cell Tracking Challenge sequence into YouTube-VIS and COCO json (with frames).

Reads the raw frames (``--frames``: TIFF files, or one (T, H, W) stack), the label images
(``--labels``: ``man_seg*.tif`` / ``man_track*.tif`` / ``mask*.tif``, integer or
integer-valued float ids, or one stack) and optionally the lineage file (``--lineage``:
``man_track.txt`` / ``res_track.txt``), with ``queryinst.data.ctc``. Writes under ``--out``::

    images/<name>/tTTT.png
    annotations/video_train.json, video_val.json   (YouTube-VIS 2019; one track per id)
    annotations/train.json, val.json               (COCO instances, the same frames)

split in time: the last ``--val-fraction`` of the frames (rounded up) are "val". Register
them with ``queryinst.video.register_ytvis_instances`` / Detectron2's
``register_coco_instances`` (image root ``<out>/images``). A bad input prints one
``ERROR:`` line naming the file and exits with status 1.

Usage::

    python tools/convert_ctc.py --frames "01/t*.tif" --labels "01_GT/TRA/man_track*.tif" \\
        --lineage 01_GT/TRA/man_track.txt --out datasets/my_cells [--crop Y0 Y1 X0 X1]
"""
import argparse
import glob
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))

from queryinst.data import ctc  # noqa: E402
from queryinst.data.builtin import write_converted_folder  # noqa: E402
from queryinst.data.coco_format import DatasetFormatError  # noqa: E402


def _files(pattern: str, what: str) -> list:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DatasetFormatError(f"{pattern}: no {what} file matches; give a glob of TIFF files "
                                 "(quoted) or one stack")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", required=True, help="glob of the raw frames (quote it)")
    parser.add_argument("--labels", required=True, help="glob of the label images (quote it)")
    parser.add_argument("--lineage", help="man_track.txt / res_track.txt (optional)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default="seq", help="the video's folder name (default seq)")
    parser.add_argument("--val-fraction", type=float, default=ctc.CTC_VAL_FRACTION,
                        help="held-out share of the frames, at the end (default 0.3)")
    parser.add_argument("--crop", type=int, nargs=4, metavar=("Y0", "Y1", "X0", "X1"),
                        help="keep only this box of every frame (e.g. unlabelled borders)")
    parser.add_argument("--min-area", type=int, default=1,
                        help="drop (cropped) cell masks under this many pixels (default 1)")
    args = parser.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction:g} is outside (0, 1)")
    try:
        frames, frame_names = ctc.read_ctc_frames(_files(args.frames, "frame"))
        labels, label_names = ctc.read_ctc_frames(_files(args.labels, "label"))
        lineage = None
        if args.lineage:
            try:
                with open(args.lineage, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise DatasetFormatError(f"{args.lineage}: cannot read it ({e.strerror})")
            lineage = ctc.read_ctc_lineage(text, args.lineage)
        out = ctc.convert_ctc_sequence(
            frames, labels, frame_names=frame_names, label_names=label_names,
            video_name=args.name, lineage=lineage, lineage_file=args.lineage or "",
            crop=tuple(args.crop) if args.crop else None, min_area=args.min_area,
            splits=ctc.temporal_split(len(frames), args.val_fraction),
            description=args.name, source=f"{args.frames} + {args.labels}")
    except (DatasetFormatError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    files = {os.path.join("images", n): b for d in out.values() for n, b in d.files.items()}
    jsons = {os.path.join("annotations", f"{k}.json"): out[k].coco
             for k in ("video_train", "video_val", "train", "val")}
    write_converted_folder(args.out, files, f"# {args.name}: converted by tools/convert_ctc.py\n",
                           jsons)
    for name, data in jsons.items():
        kind = "tracks" if "videos" in data else "instances"
        count = len(data["annotations"])
        frames_in = (len(data["videos"][0]["file_names"]) if "videos" in data
                     else len(data["images"]))
        print(f"{os.path.join(args.out, name)}: {frames_in} frames, {count} {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
