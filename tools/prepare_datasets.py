#!/usr/bin/env python3
"""Build QueryInst's bundled datasets and print what was built.

Downloads the source packages once (``$QUERYINST_CACHE/packages``), converts them under the
datasets root (``--root``, default ``$DETECTRON2_DATASETS`` or ``./datasets``), loads each one
with the validated COCO or YouTube-VIS loader and prints name, images (frames for the video
sets), instances (track-frames for the video sets) and json path.
It also writes a 5-image Cityscapes sample in Cityscapes' layout to ``<root>/cityscapes_sample/
cityscapes/`` (``DETECTRON2_DATASETS=<root>/cityscapes_sample`` makes Detectron2's
``cityscapes_fine_instance_seg_train`` / ``_val`` read it), counted with Detectron2's
Cityscapes loader; its last column is the gtFine folder.
Already-built datasets are only checked. Exit code 0 on success.

Usage: ``python tools/prepare_datasets.py [--root DIR]``
"""
import argparse
import os
import sys

# Use the package of this checkout, installed or not.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))

import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets.cityscapes import load_cityscapes_instances  # noqa: E402

from queryinst.data import (  # noqa: E402
    BUNDLED_DATASETS,
    datasets_root,
    prepare_bundled_datasets,
    register_bundled_datasets,
    write_cityscapes_sample,
)
from queryinst.video.data.builtin import (  # noqa: E402
    BUNDLED_VIDEO_DATASETS,
    prepare_bundled_video_datasets,
    register_bundled_video_datasets,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    args = parser.parse_args(argv)

    json_files = prepare_bundled_datasets(args.root)
    json_files.update(prepare_bundled_video_datasets(args.root))
    register_bundled_datasets(args.root)
    register_bundled_video_datasets(args.root)
    rows = [("name", "images", "instances", "json")]
    for name in BUNDLED_DATASETS:
        dicts = DatasetCatalog.get(name)  # validated, counts checked against the recorded ones
        rows.append((name, str(len(dicts)), str(sum(len(d["annotations"]) for d in dicts)),
                     json_files[name]))
    for name in BUNDLED_VIDEO_DATASETS:  # one dict per video, one object list per frame
        dicts = DatasetCatalog.get(name)
        rows.append((name, str(sum(d["length"] for d in dicts)),
                     str(sum(len(f) for d in dicts for f in d["annotations"])), json_files[name]))
    sample = write_cityscapes_sample(os.path.join(datasets_root(args.root), "cityscapes_sample"))
    for split in ("train", "val"):  # Detectron2's own loader, as its built-in datasets use it
        folder = os.path.join(sample["root"], "cityscapes")
        gt_dir = os.path.join(folder, "gtFine", split)
        dicts = load_cityscapes_instances(os.path.join(folder, "leftImg8bit", split), gt_dir)
        rows.append((f"cityscapes_sample ({split})", str(len(dicts)),
                     str(sum(len(d["annotations"]) for d in dicts)), gt_dir))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
